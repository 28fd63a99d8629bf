"""One assembly of the data plane, used by the daemon and by `pyflannel status --check`:

    store updates ──> LeaseTable ──> peer states ──> DesiredState ──> engine ──> RoutePort
                      (validated,    (backend,        (+ our own
                       conflicts)     pure)            blackhole)

The settings it is built from (which leases are acceptable, which rules we keep) are
derived here from net-conf.json, the flags and our lease, so status judges the kernel by
exactly the daemon's rules.
"""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.backend.base import Backend, DesiredTable, PeerState
from pyflannel.backend.vxlan import vtep_claims
from pyflannel.backend.wireguard import wg_claims
from pyflannel.config.flags import Flags
from pyflannel.config.netconf import NetConf
from pyflannel.kernel.ports import Addr, RoutePort
from pyflannel.lease.events import LeaseUpdate
from pyflannel.lease.model import Lease
from pyflannel.lease.table import LeasePolicy, LeaseTable, TableDelta
from pyflannel.netlink import RTN_BLACKHOLE, RTN_UNICAST, Route
from pyflannel.reconcile.hooks import PeerHook
from pyflannel.reconcile.plan import DesiredState, KernelScope
from pyflannel.traffic import TrafficConfig

BLACKHOLE_KEY = "\0blackhole"  # no lease ident can be this: our own entries
BACKEND_KEY = "\0backend"


def lease_policy(nc: NetConf, *, store: str, backend_type: str,
                 own_subnet: IPv4Network | None, own_ipv6_subnet: IPv6Network | None,
                 own_public_ip: IPv4Address | None,
                 own_public_ipv6: IPv6Address | None,
                 segments: tuple[IPv4Network | IPv6Network, ...] = ()) -> LeasePolicy:
    return LeasePolicy(
        network=nc.network if nc.enable_ipv4 else None,
        ipv6_network=nc.ipv6_network if nc.enable_ipv6 else None,
        # etcd leases all have SubnetLen; kube podCIDRs are sized by the controller.
        subnet_len=nc.subnet_len if nc.enable_ipv4 and store == "etcd" else None,
        ipv6_subnet_len=nc.ipv6_subnet_len if nc.enable_ipv6 and store == "etcd" else None,
        backend_type=backend_type, own_subnet=own_subnet, own_ipv6_subnet=own_ipv6_subnet,
        own_public_ip=own_public_ip if nc.enable_ipv4 else None,
        own_public_ipv6=own_public_ipv6 if nc.enable_ipv6 else None,
        unique={"vxlan": vtep_claims, "wireguard": wg_claims}.get(backend_type),
        segments=segments)


def traffic_config(flags: Flags, nc: NetConf, subnet: IPv4Network | None,
                   ipv6_subnet: IPv6Network | None) -> TrafficConfig:
    return TrafficConfig(
        network=nc.network if nc.enable_ipv4 else None,
        subnet=subnet if nc.enable_ipv4 else None,
        ipv6_network=nc.ipv6_network if nc.enable_ipv6 else None,
        ipv6_subnet=ipv6_subnet if nc.enable_ipv6 else None,
        masquerade=flags.ip_masq, forward=flags.iptables_forward_rules,
        fully_random=not flags.ip_masq_fully_random_disable)


class NodeDataplane:
    """Leases in, desired kernel state out, incrementally (one lease event costs O(1)).

    The one fact a backend needs from the kernel (with vxlan DirectRouting: is a peer's
    public IP on our segment?) is looked up here, asynchronously through the RoutePort,
    cached, and handed to the pure peer_state; `rebuild(facts=True)` asks again."""

    def __init__(self, backend: Backend, policy: LeasePolicy, own_ident: str,
                 port: RoutePort, *, blackhole: tuple[IPv4Network | IPv6Network, ...] = ()
                 ) -> None:
        self.backend = backend
        self.table = LeaseTable(own_ident, policy)
        self._port = port
        self._desired = DesiredTable()
        self._direct: dict[Addr, bool] = {}
        self._blackholes = frozenset(blackhole)
        if blackhole:
            # --ip-blackhole-route: pod traffic to our subnet that no local pod takes is
            # dropped here instead of following the default route.
            self._desired.put(BLACKHOLE_KEY, PeerState(routes=tuple(
                Route(dst=s, gateway=None, oif=None, type=RTN_BLACKHOLE) for s in blackhole)))
        self._desired.put(BACKEND_KEY, backend.own)

    @property
    def desired(self) -> DesiredState:
        return self._desired.state

    @property
    def hooks(self) -> dict[str, PeerHook]:
        """The peers' commands (extension backend), by lease ident."""
        return self._desired.hooks

    def take_hook_changes(self) -> set[str]:
        """The idents whose commands changed since the last call."""
        changed, self._desired.hooks_changed = self._desired.hooks_changed, set()
        return changed

    @property
    def scope(self) -> KernelScope:
        return replace(self.backend.scope(), blackholes=self._blackholes)

    async def apply(self, update: LeaseUpdate) -> TableDelta:
        delta = self.table.apply(update)
        for old in delta.removed:
            self._desired.remove(old.ident)
        if not delta.added:
            return delta
        if self.backend.direct_routing:
            await self._learn(delta.added)
        direct = self._direct_set()
        for new in delta.added:
            self._desired.put(new.ident, self.backend.peer_state(new, direct))
        return delta

    async def rebuild(self, *, facts: bool = False) -> None:
        """Every peer's state again: a device was recreated (new ifindex), or (facts) the
        routes that decide DirectRouting changed."""
        if facts:
            self._direct.clear()
        self._desired.put(BACKEND_KEY, self.backend.own)
        peers = list(self.table.peers.values())
        if self.backend.direct_routing:
            await self._learn(peers)
        direct = self._direct_set()
        for lease in peers:
            self._desired.put(lease.ident, self.backend.peer_state(lease, direct))

    async def _learn(self, leases: list[Lease]) -> None:
        for lease in leases:
            for ip in (lease.attrs.public_ip, lease.attrs.public_ipv6):
                if ip is None or ip.is_unspecified or ip in self._direct:
                    continue
                try:
                    r = await self._port.lookup(ip)
                except OSError:
                    r = None  # vxlan for this peer: always works, only slower
                # upstream's rule: one unicast route without a gateway (a connected subnet)
                self._direct[ip] = r is not None and r.gateway is None and r.type == RTN_UNICAST

    def _direct_set(self) -> frozenset[Addr]:
        if not self._direct:
            return frozenset()
        return frozenset(ip for ip, d in self._direct.items() if d)
