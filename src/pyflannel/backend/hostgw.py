"""host-gw: one route per peer, `<peer subnet> via <peer public IP> dev <external iface>`.

No device, no encapsulation: peers must share our L2 segment. The per-peer state is a
pure function of the lease; the KernelReconciler makes the kernel match it.
"""

from __future__ import annotations

from collections.abc import Container
from ipaddress import IPv4Network, IPv6Network

from pyflannel.backend.base import BackendError, BackendSetup, PeerState
from pyflannel.config.netconf import NetConf
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import Addr, LinkPort
from pyflannel.lease.model import Lease, StoredNodeState
from pyflannel.netlink import LinkEvent, Route
from pyflannel.reconcile.plan import KernelScope

BACKEND_TYPE = "host-gw"


def check_host_gw(ext: ExternalInterface) -> None:
    """host-gw cannot work behind NAT: peers route to our public IP directly."""
    if ext.ext_addr != ext.iface_addr or ext.ext_addr6 != ext.iface_addr6:
        raise BackendError(
            "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
            "which is not supported by host-gw backend (drop --public-ip / the node-public-ip "
            "annotation, or use the vxlan backend)")


def host_gw_peer_state(lease: Lease, oif: int, *, ipv4: bool = True,
                       ipv6: bool = False) -> PeerState:
    routes: list[Route] = []
    if ipv4 and lease.subnet is not None:
        routes.append(Route(lease.subnet, lease.attrs.public_ip, oif))
    if ipv6 and lease.ipv6_subnet is not None and lease.attrs.public_ipv6 is not None:
        routes.append(Route(dst=lease.ipv6_subnet, gateway=lease.attrs.public_ipv6, oif=oif))
    return PeerState(routes=tuple(routes))


class HostGwBackend:
    backend_type = BACKEND_TYPE
    own = PeerState()
    direct_routing = False

    def __init__(self) -> None:
        self._ext: ExternalInterface | None = None
        self._networks: tuple[IPv4Network | IPv6Network, ...] = ()
        self._ipv4 = True
        self._ipv6 = False

    async def register(self, ext: ExternalInterface, nc: NetConf, stored: StoredNodeState,
                       links: LinkPort, *, create: bool = True) -> BackendSetup:
        check_host_gw(ext)
        self._ext = ext
        self._ipv4, self._ipv6 = nc.enable_ipv4, nc.enable_ipv6
        self._networks = tuple(n for n in (nc.network if nc.enable_ipv4 else None,
                                           nc.ipv6_network if nc.enable_ipv6 else None) if n)
        return BackendSetup(backend_type=BACKEND_TYPE, mtu=ext.mtu)

    async def configure(self, lease: Lease) -> None:
        return None

    def scope(self) -> KernelScope:
        assert self._ext is not None
        return KernelScope(route_oifs=frozenset({self._ext.index}), networks=self._networks)

    def peer_state(self, lease: Lease, direct: Container[Addr] = ()) -> PeerState:
        assert self._ext is not None
        return host_gw_peer_state(lease, self._ext.index, ipv4=self._ipv4, ipv6=self._ipv6)

    async def on_link_event(self, kind: str, link: LinkEvent) -> bool:
        return False
