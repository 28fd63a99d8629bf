"""The pure half of reconciliation: what we own in the kernel (KernelScope), what the
backends want (DesiredState), and `plan`, the diff that turns what is there (Observed) into
what is wanted. No I/O, no clock: property-tested on its own (tests/unit/test_route_plan.py)
and shared by the engine and `pyflannel status --check`.

Ownership. We own the routes in our table whose destination lies in the cluster
network(s) and which go through our interfaces or one of our nexthop objects (plus the
blackhole routes of --ip-blackhole-route); the permanent neighbours and the FDB entries on
our own devices (the vxlan device); and the nexthop objects in our id range on our
interfaces. Owned objects that no lease wants are removed: that also clears what nodes that
left while the daemon was down left behind (upstream #2554), and our nexthop objects when
routes are plain (PYFLANNEL_NEXTHOP_OBJECTS=off, nexthop_compat_mode=0).

Nexthop objects. With one gateway per route the kernel's fib_info lookup makes classic
route creation quadratic (10k peers take ~2.5 s, 50k ~200 s). When the kernel supports
nexthop objects, each distinct (gateway, device) becomes one nexthop and the route points
at it by id (`10.244.2.0/24 nhid 253886465 via 192.168.1.12 dev eth0`): creation is linear.
Backends still describe classic routes; the id mapping is ours alone.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from pyflannel.netlink import (
    NUD_PERMANENT,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    FdbEntry,
    Neighbour,
    Nexthop,
    Op,
    Route,
)

NHID_BASE = 0x0F1A0000  # our nexthop ids: NHID_BASE .. NHID_BASE + NHID_SPAN - 1
NHID_SPAN = 1 << 20
IPV6_DEFAULT_METRIC = 1024  # the kernel's metric for an IPv6 route added with none

Gateway = IPv4Address | IPv6Address


def is_our_nhid(nhid: int) -> bool:
    """Nexthop ids in our range are ours: the engine allocates only these, and nobody
    else is expected to (`pyflannel cleanup-nexthops` removes only these)."""
    return NHID_BASE <= nhid < NHID_BASE + NHID_SPAN

K = TypeVar("K")
T = TypeVar("T", Neighbour, FdbEntry)
NhKey = tuple[Gateway | None, int | None, bool]


@dataclass(frozen=True)
class KernelScope:
    """What this reconciler owns in the kernel."""

    route_oifs: frozenset[int]
    networks: tuple[IPv4Network | IPv6Network, ...]
    neighbour_ifindexes: frozenset[int] = frozenset()
    table: int = 254
    # --ip-blackhole-route: our own subnet(s), as `blackhole <subnet>` routes.
    blackholes: frozenset[IPv4Network | IPv6Network] = frozenset()
    # networks as (version, prefix length, mask, address) integers, derived
    _nets: tuple[tuple[int, int, int, int], ...] = field(
        default=(), init=False, compare=False, repr=False)

    def owns_route(self, r: Route) -> bool:
        if r.table != self.table:
            return False
        if r.type == RTN_BLACKHOLE:
            return r.dst in self.blackholes
        if r.type != RTN_UNICAST:
            return False
        if r.oif not in self.route_oifs and not (
                r.oif is None and r.nhid is not None and is_our_nhid(r.nhid)):
            # (a route on one of our nexthops shows no device when nexthop_compat_mode is 0)
            return False
        # subnet_of by integers: called for every dumped route (50k at start-up).
        d = r.dst
        addr, plen, version = int(d.network_address), d.prefixlen, d.version
        return any(version == v and plen >= nlen and addr & mask == net
                   for v, nlen, mask, net in self._nets)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_nets", tuple(
            (n.version, n.prefixlen, int(n.netmask), int(n.network_address))
            for n in self.networks))

    def owns_nexthop(self, nh: Nexthop) -> bool:
        return is_our_nhid(nh.id) and nh.oif in self.route_oifs

    def owns_neighbour(self, n: Neighbour) -> bool:
        return n.ifindex in self.neighbour_ifindexes and bool(n.state & NUD_PERMANENT)

    def owns_fdb(self, f: FdbEntry) -> bool:
        return f.ifindex in self.neighbour_ifindexes

    @property
    def families(self) -> tuple[int, ...]:
        fams = {socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in self.networks}
        return tuple(sorted(fams))


def endpoint_text(ep: tuple[Gateway, int]) -> str:
    ip, port = ep
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


@dataclass(frozen=True)
class WgPeer:
    """One peer of one of our devices, as we want it (and as it is read back)."""

    device: str
    public_key: str  # base64
    endpoint: tuple[Gateway, int] | None = None
    allowed_ips: frozenset[IPv4Network | IPv6Network] = frozenset()
    preshared_key: str | None = None  # base64; None: none
    keepalive: int = 0  # seconds, 0 off

    def describe(self) -> str:
        ep = endpoint_text(self.endpoint) if self.endpoint else "none"
        ips = ",".join(sorted(str(n) for n in self.allowed_ips)) or "none"
        return f"peer {self.public_key[:8]}… endpoint {ep} allowed-ips {ips} on {self.device}"


@dataclass(frozen=True)
class WgDevice:
    """What one of our devices must be: its name, key and port (the engine repairs them)."""

    name: str
    private_key: str  # base64
    listen_port: int
    mtu: int


@dataclass(slots=True)
class ChangedKeys:
    """Keys of a DesiredState (or of the kernel) that changed since the engine last looked:
    what an incremental pass works on, so it costs O(changes)."""

    routes: set[str] = field(default_factory=set)
    neighbours: set[tuple[int, str]] = field(default_factory=set)
    fdb: set[tuple[int, str]] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.routes or self.neighbours or self.fdb)

    def update(self, other: ChangedKeys) -> None:
        self.routes |= other.routes
        self.neighbours |= other.neighbours
        self.fdb |= other.fdb

    def drain(self) -> ChangedKeys:
        """The keys so far, leaving this set empty."""
        out = ChangedKeys(self.routes, self.neighbours, self.fdb)
        self.routes, self.neighbours, self.fdb = set(), set(), set()
        return out


@dataclass(slots=True)
class DesiredState:
    """Everything the backend wants, keyed for cheap diffs. Routes are in classic form
    (gateway + oif); nexthop objects are derived from them here. Whoever mutates the dicts
    records the key in `changed` (DesiredTable does), so the engine can look at those keys
    only; a new DesiredState handed to the engine is diffed whole."""

    routes: dict[str, Route] = field(default_factory=dict)
    neighbours: dict[tuple[int, str], Neighbour] = field(default_factory=dict)
    fdb: dict[tuple[int, str], FdbEntry] = field(default_factory=dict)
    changed: ChangedKeys = field(default_factory=ChangedKeys, compare=False, repr=False)
    # WireGuard (reconcile/wgsync.py): peers by (device, public key), our devices by name,
    # and the peer keys changed since the WireGuard reconciler last looked.
    wg: dict[tuple[str, str], WgPeer] = field(default_factory=dict)
    wg_devices: dict[str, WgDevice] = field(default_factory=dict)
    wg_changed: set[tuple[str, str]] = field(default_factory=set, compare=False, repr=False)


@dataclass(slots=True)
class Observed:
    routes: list[Route] = field(default_factory=list)
    nexthops: list[Nexthop] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    fdb: list[FdbEntry] = field(default_factory=list)


def uses_nexthop(r: Route) -> bool:
    """Whether `r` goes through one of our nexthop objects: routes via a gateway. Blackholes
    have no nexthop, and a device route (wireguard's network route) is one per device."""
    return r.type == RTN_UNICAST and r.gateway is not None


def route_key(r: Route) -> str:
    return net_key(r.dst)


def net_key(n: IPv4Network | IPv6Network) -> str:
    """str(n), in half the time for IPv4: every desired, planned and cached route is keyed
    by it (50k of each at a cold start)."""
    if isinstance(n, IPv4Network):
        return f"{socket.inet_ntoa(n.network_address.packed)}/{n.prefixlen}"
    return str(n)


def neighbour_key(n: Neighbour) -> tuple[int, str]:
    ip = n.ip
    # str(ip) for IPv4 in a third of the time: every desired, planned and cached
    # neighbour is keyed by it.
    return (n.ifindex, socket.inet_ntoa(ip.packed) if isinstance(ip, IPv4Address) else str(ip))


def fdb_key(f: FdbEntry) -> tuple[int, str]:
    return (f.ifindex, f.lladdr.lower())


def nh_key(r: Route | Nexthop) -> NhKey:
    return (r.gateway, r.oif, r.onlink)


def same_route(want: Route, have: Route) -> bool:
    """upstream's routeEqual (dst, gateway, oif) plus the onlink flag; with nexthop objects
    the route is right when it points at the right nexthop (which is diffed itself)."""
    if want.nhid is not None:
        return want.dst == have.dst and want.nhid == have.nhid
    return (want.dst == have.dst and want.gateway == have.gateway and want.oif == have.oif
            and want.onlink == have.onlink and have.nhid is None)


def same_neighbour(a: Neighbour, b: Neighbour) -> bool:
    return a.lladdr.lower() == b.lladdr.lower() and bool(b.state & NUD_PERMANENT)


def _diff_keyed(desired: Mapping[K, T], observed: Iterable[T], owns: Callable[[T], bool],
                key: Callable[[T], K], same: Callable[[T, T], bool]) -> tuple[list[Op], list[Op]]:
    """(replaces, deletes) for objects identified by a key (neighbours, FDB entries)."""
    adds: list[Op] = []
    dels: list[Op] = []
    seen: set[K] = set()
    for have in observed:
        if not owns(have):
            continue
        k = key(have)
        want = desired.get(k)
        if want is None:
            dels.append(Op("delete", have))
        else:
            seen.add(k)
            if not same(want, have):
                adds.append(Op("replace", want))
    adds.extend(Op("replace", w) for k, w in desired.items() if k not in seen)
    return adds, dels


def plan(desired: DesiredState, observed: Observed, scope: KernelScope, *,
         nexthops: bool) -> list[Op]:
    """The ops that turn `observed` into `desired`, in a safe order: nexthops, neighbours
    and FDB entries before the routes that use them (the kernel never has to resolve a
    gateway), deletions of routes before the objects they used. A route that `desired`
    wants is replaced in place, never deleted first (also when its form changes between a
    nexthop object and a plain gateway)."""
    nh_adds: list[Op] = []
    nh_dels: list[Op] = []
    want_routes = desired.routes
    if nexthops:
        owned_nh = [nh for nh in observed.nexthops if scope.owns_nexthop(nh)]
        by_key: dict[NhKey, int] = {}
        used_ids = {nh.id for nh in owned_nh}
        for nh in owned_nh:
            by_key.setdefault(nh_key(nh), nh.id)
        next_id = NHID_BASE
        want_routes = {}
        needed: set[int] = set()
        for key, r in desired.routes.items():
            if not uses_nexthop(r):
                want_routes[key] = r
                continue
            k = nh_key(r)
            nhid = by_key.get(k)
            if nhid is None:
                while next_id in used_ids:
                    next_id += 1
                if next_id >= NHID_BASE + NHID_SPAN:
                    raise RuntimeError("out of nexthop ids")
                nhid = next_id
                used_ids.add(nhid)
                by_key[k] = nhid
                nh_adds.append(Op("replace", Nexthop(nhid, r.gateway, r.oif, r.protocol,
                                                     r.onlink)))
            needed.add(nhid)
            # positional: twice as fast as by keyword (50k routes at a cold start)
            want_routes[key] = Route(r.dst, r.gateway, r.oif, r.table, r.protocol, r.onlink,
                                     r.scope, r.type, nhid)
        nh_dels = [Op("delete", nh) for nh in owned_nh if nh.id not in needed]
        owned_ids = {nh.id for nh in owned_nh}
    else:
        # Classic routes (PYFLANNEL_NEXTHOP_OBJECTS=off, nexthop_compat_mode=0): a route
        # still on one of our nexthops is replaced by its plain form in place (no gap),
        # then the nexthops go, so switching modes leaves nothing of ours behind.
        owned = [nh for nh in observed.nexthops if scope.owns_nexthop(nh)]
        owned_ids = {nh.id for nh in owned}
        nh_dels = [Op("delete", nh) for nh in owned]

    route_adds: list[Op] = []
    route_dels: list[Op] = []
    seen: set[str] = set()
    for r in observed.routes:
        if not (scope.owns_route(r) or (r.nhid is not None and r.nhid in owned_ids)):
            continue
        key = net_key(r.dst)
        want = want_routes.get(key)
        if want is None or key in seen:
            # no lease wants it, or a second route for the prefix (another metric)
            route_dels.append(Op("delete", r))
            continue
        seen.add(key)
        if not same_route(want, r):
            route_adds.append(Op("replace", want))
    route_adds.extend(Op("replace", w) for k, w in want_routes.items() if k not in seen)

    neigh_adds, neigh_dels = _diff_keyed(desired.neighbours, observed.neighbours,
                                         scope.owns_neighbour, neighbour_key, same_neighbour)
    fdb_adds, fdb_dels = _diff_keyed(desired.fdb, observed.fdb, scope.owns_fdb, fdb_key,
                                     lambda want, have: want.dst == have.dst)
    return (nh_adds + neigh_adds + fdb_adds + route_adds + route_dels + nh_dels + neigh_dels
            + fdb_dels)
