"""alloc: a lease and nothing else (upstream pkg/backend/alloc). No device, no route, no
peer state: FLANNEL_MTU is the external interface's MTU and the lease publishes no
BackendType (upstream's alloc leaves it empty).

Upstream's alloc network never watches leases, and in kube mode the node informer is not
even started (#1617, #1656: 1000+ node clusters). Here: `watch_peers=False`, so the daemon
never asks the store for peers (etcd: no prefix watch; kube: no node list/watch); the
lease is still renewed (etcd) and the traffic rules still kept.
"""

from __future__ import annotations

from collections.abc import Container
from ipaddress import IPv4Network, IPv6Network

from pyflannel.backend.base import BackendSetup, PeerState
from pyflannel.config.netconf import NetConf
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import Addr, LinkPort
from pyflannel.lease.model import Lease, StoredNodeState
from pyflannel.netlink import LinkEvent
from pyflannel.reconcile.plan import KernelScope

BACKEND_TYPE = "alloc"


class AllocBackend:
    backend_type = ""  # what our lease publishes: upstream's alloc sets no BackendType
    own = PeerState()
    direct_routing = False

    def __init__(self) -> None:
        self._networks: tuple[IPv4Network | IPv6Network, ...] = ()

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        self._networks = tuple(n for n in (nc.network if nc.enable_ipv4 else None,
                                           nc.ipv6_network if nc.enable_ipv6 else None) if n)
        return BackendSetup(backend_type="", mtu=ext.mtu, watch_peers=False)

    async def configure(self, lease: Lease) -> None:
        return None

    def scope(self) -> KernelScope:
        return KernelScope(route_oifs=frozenset(), networks=self._networks)

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        return PeerState()

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        return False
