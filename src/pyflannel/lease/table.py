"""LeaseTable: the peers this node routes to, fed by snapshots and changes.

Like upstream's LeaseWatcher it drops our own lease; unlike it, every lease is validated
before it can reach the routing table, and a refused lease is logged once per distinct
reason instead of being programmed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import Lease

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeasePolicy:
    """What a peer lease must look like to be routed to."""

    network: IPv4Network | None
    ipv6_network: IPv6Network | None = None
    subnet_len: int | None = None  # None: any length (kube podCIDRs are set by the controller)
    ipv6_subnet_len: int | None = None
    backend_type: str | None = None
    own_subnet: IPv4Network | None = None
    own_ipv6_subnet: IPv6Network | None = None
    own_public_ip: IPv4Address | None = None
    own_public_ipv6: IPv6Address | None = None
    # What else a lease claims for itself alone, beside its subnets (vxlan: its VTEP MACs,
    # which key the FDB): two leases claiming the same token conflict like overlaps do.
    unique: Callable[[Lease], tuple[str, ...]] | None = None
    # Our external interface's connected prefixes (their network and broadcast addresses
    # are never a peer's address).
    segments: tuple[IPv4Network | IPv6Network, ...] = ()
    # derived: the IPv4-only policy as integers (None otherwise), see _surely_fine
    _v4: _V4Policy | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.ipv6_network is None and isinstance(self.network, IPv4Network):
            own = self.own_subnet
            object.__setattr__(self, "_v4", _V4Policy(
                backend_type=self.backend_type, addr=int(self.network.network_address),
                plen=self.network.prefixlen, subnet_len=self.subnet_len,
                own=(int(own.network_address), own.prefixlen) if own is not None else None,
                own_ip=int(self.own_public_ip) if self.own_public_ip is not None else None,
                segments=tuple((int(g.netmask), int(g.network_address),
                                int(g.broadcast_address), g.prefixlen < 31)
                               for g in self.segments if isinstance(g, IPv4Network))))


_V4_MASKS = tuple(((1 << n) - 1) << (32 - n) for n in range(33))
# What _unusable refuses of an IPv4 address, as (mask, network): unspecified, loopback,
# multicast, link-local, reserved (which holds 255.255.255.255).
_V4_UNUSABLE = tuple((int(n.netmask), int(n.network_address)) for n in map(IPv4Network, (
    "0.0.0.0/32", "127.0.0.0/8", "224.0.0.0/4", "169.254.0.0/16", "240.0.0.0/4")))


@dataclass(frozen=True, slots=True)
class _V4Policy:
    backend_type: str | None
    addr: int
    plen: int
    subnet_len: int | None
    own: tuple[int, int] | None
    own_ip: int | None
    segments: tuple[tuple[int, int, int, bool], ...]


def _surely_fine(lease: Lease, c: _V4Policy) -> bool:
    """True when `refusal` would find nothing wrong with `lease` under this IPv4-only
    policy; False when it may (refusal then looks again and says what). The same checks
    in integers: ipaddress's subnet_of/overlaps/is_* cost a start-up at 50k peers seconds,
    and the memory of the broadcast address each subnet_of caches on the network."""
    if c.backend_type is not None and lease.attrs.backend_type != c.backend_type:
        return False
    s = lease.subnet
    if not isinstance(s, IPv4Network):
        return False
    a = int(s.network_address)
    plen = s.prefixlen
    if plen < c.plen or a & _V4_MASKS[c.plen] != c.addr:
        return False
    if c.subnet_len is not None and plen != c.subnet_len:
        return False
    if c.own is not None and not (a ^ c.own[0]) & _V4_MASKS[min(plen, c.own[1])]:
        return False
    ip = int(lease.attrs.public_ip)
    for mask, net in _V4_UNUSABLE:
        if ip & mask == net:
            return False
    for mask, net, bcast, small in c.segments:
        if small and ip & mask == net and ip in (net, bcast):
            return False
    return ip != c.own_ip


@dataclass(frozen=True)
class Refusal:
    """Why a lease is not routed to: `kind` is a short label for metrics."""

    kind: str
    message: str


def refusal(lease: Lease, p: LeasePolicy) -> Refusal | None:
    """Why `lease` must not be programmed, or None when it is fine."""
    if p._v4 is not None and _surely_fine(lease, p._v4):
        return None
    return _refusal(lease, p)


def _refusal(lease: Lease, p: LeasePolicy) -> Refusal | None:
    if p.backend_type is not None and lease.attrs.backend_type != p.backend_type:
        return Refusal("backend-type", f"backend type {lease.attrs.backend_type!r} is not "
                       f"ours ({p.backend_type!r})")
    if p.network is not None:
        s = lease.subnet
        if s is None:
            return Refusal("missing-subnet", "it has no IPv4 subnet")
        if not s.subnet_of(p.network):
            return Refusal("outside-network", f"subnet {s} is outside the network {p.network}")
        if p.subnet_len is not None and s.prefixlen != p.subnet_len:
            return Refusal("prefix-length", f"subnet {s} is not a /{p.subnet_len}")
        if p.own_subnet is not None and s.overlaps(p.own_subnet):
            return Refusal("own-subnet", f"subnet {s} overlaps our own subnet {p.own_subnet}")
        ip = lease.attrs.public_ip
        bad = _unusable(ip, p.segments)
        if bad:
            return Refusal("public-ip", f"public IP {ip} is {bad}, not a node's address")
        if p.own_public_ip is not None and ip == p.own_public_ip:
            return Refusal("public-ip", f"public IP {ip} is our own")
    if p.ipv6_network is not None:
        s6 = lease.ipv6_subnet
        if s6 is None:
            return Refusal("missing-subnet", "it has no IPv6 subnet")
        if not s6.subnet_of(p.ipv6_network):
            return Refusal("outside-network",
                           f"IPv6 subnet {s6} is outside the network {p.ipv6_network}")
        if p.ipv6_subnet_len is not None and s6.prefixlen != p.ipv6_subnet_len:
            return Refusal("prefix-length", f"IPv6 subnet {s6} is not a /{p.ipv6_subnet_len}")
        if p.own_ipv6_subnet is not None and s6.overlaps(p.own_ipv6_subnet):
            return Refusal("own-subnet",
                           f"IPv6 subnet {s6} overlaps our own subnet {p.own_ipv6_subnet}")
        ip6 = lease.attrs.public_ipv6
        bad = "missing" if ip6 is None else _unusable(ip6, p.segments)
        if bad:
            return Refusal("public-ip", f"public IPv6 {ip6} is {bad}, not a node's address")
        if p.own_public_ipv6 is not None and ip6 == p.own_public_ipv6:
            return Refusal("public-ip", f"public IPv6 {ip6} is our own")
    return None


def _unusable(ip: IPv4Address | IPv6Address, segments: tuple[IPv4Network | IPv6Network, ...]
              ) -> str:
    """Why `ip` cannot be a peer's address (a gateway or tunnel endpoint), or ""."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.version == 4 and (ip.is_reserved or ip == IPv4Address("255.255.255.255")):
        return "a reserved address"
    for seg in segments:
        if seg.version != ip.version or ip not in seg:
            continue
        if seg.version == 4 and seg.prefixlen < 31 and ip in (seg.network_address,
                                                             seg.broadcast_address):
            return f"the {'network' if ip == seg.network_address else 'broadcast'} " \
                   f"address of this node's segment {seg}"
        if seg.version == 6 and seg.prefixlen < 127 and ip == seg.network_address:
            return f"the subnet-router anycast address of this node's segment {seg}"
    return ""


@dataclass
class TableDelta:
    """What one update changed: leases (by ident) whose desired state must be recomputed."""

    changed: set[str] = field(default_factory=set)
    added: list[Lease] = field(default_factory=list)
    removed: list[Lease] = field(default_factory=list)
    refused: list[tuple[Lease, Refusal]] = field(default_factory=list)


Net = IPv4Network | IPv6Network


@dataclass(frozen=True)
class _Claims:
    nets: tuple[Net, ...]
    tokens: tuple[str, ...]

    def clash(self, other: _Claims) -> bool:
        return bool(set(self.tokens) & set(other.tokens)) or any(
            a.version == b.version and a.overlaps(b)
            for a in self.nets for b in other.nets)


class _Owners:
    """Which accepted lease holds each subnet, so a new lease's overlaps are found without a
    scan: subnets are indexed by (version, prefix length), and a cluster uses one or two
    lengths, so a lookup is a dict probe per length in use."""

    _ENUMERATE_MAX = 256  # shorter new prefixes enumerate this many longer ones, else scan

    def __init__(self) -> None:
        self._by_len: dict[tuple[int, int], dict[int, str]] = {}
        self._tokens: dict[str, str] = {}

    def add(self, ident: str, c: _Claims) -> None:
        for n in c.nets:
            self._by_len.setdefault((n.version, n.prefixlen), {})[
                int(n.network_address)] = ident
        for t in c.tokens:
            self._tokens[t] = ident

    def remove(self, ident: str, c: _Claims) -> None:
        for n in c.nets:
            held = self._by_len.get((n.version, n.prefixlen))
            if held is not None and held.get(int(n.network_address)) == ident:
                del held[int(n.network_address)]
                if not held:
                    del self._by_len[(n.version, n.prefixlen)]
        for t in c.tokens:
            if self._tokens.get(t) == ident:
                del self._tokens[t]

    def overlapping(self, c: _Claims) -> set[str]:
        found = {h for t in c.tokens if (h := self._tokens.get(t)) is not None}
        for n in c.nets:
            bits = n.max_prefixlen
            addr = int(n.network_address)
            for (version, plen), held in self._by_len.items():
                if version != n.version:
                    continue
                if plen <= n.prefixlen:  # a held subnet that contains n (or equals it)
                    hit = held.get(addr >> (bits - plen) << (bits - plen))
                    if hit is not None:
                        found.add(hit)
                    continue
                step, count = 1 << (bits - plen), 1 << (plen - n.prefixlen)
                if count <= self._ENUMERATE_MAX:  # held subnets inside n
                    found.update(h for a in range(addr, addr + count * step, step)
                                 if (h := held.get(a)) is not None)
                else:
                    end = addr + (1 << (bits - n.prefixlen))
                    found.update(h for a, h in held.items() if addr <= a < end)
        return found


class LeaseTable:
    """The accepted peer leases, by ident (the etcd key, or the Node's name).

    At most one lease holds any address: when two leases overlap, the one with the lower
    rank (older create revision / creation time, then name) is routed and the other is
    refused until the winner goes. A later write can never win, so a planted lease cannot
    take a route over, and deleting it changes nothing."""

    def __init__(self, own_key: str, policy: LeasePolicy) -> None:
        self.own_key = own_key
        self.policy = policy
        self._peers: dict[str, Lease] = {}
        self._losers: dict[str, Lease] = {}  # valid, but overlapping an older lease
        self._owners = _Owners()
        self._refused: dict[str, tuple[int, str]] = {}  # ident -> (revision, reason) logged
        self.synced = False  # a first snapshot has been applied

    @property
    def peers(self) -> Mapping[str, Lease]:
        return self._peers

    @property
    def refused(self) -> Mapping[str, str]:
        return {k: msg for k, (_rev, msg) in self._refused.items()}

    def apply(self, update: LeaseUpdate) -> TableDelta:
        delta = TableDelta()
        if isinstance(update, LeaseSnapshot):
            seen = {lease.ident for lease in update.leases}
            for ident in [k for k in self._peers if k not in seen]:
                self._remove(ident, delta)
            for ident in [k for k in self._losers if k not in seen]:
                del self._losers[ident]
            for ident in [k for k in self._refused if k not in seen]:
                del self._refused[ident]
            # Oldest first: winners are placed before the leases they refuse, so a
            # snapshot causes no churn whatever order the store listed them in.
            for lease in sorted(update.leases, key=lambda le: le.rank):
                self._upsert(lease, delta)
            self.synced = True
        elif isinstance(update, LeaseChanges):
            for ident in update.removed:
                self._remove(ident, delta)
                self._refused.pop(ident, None)
            for lease in update.upserted:
                self._upsert(lease, delta)
        return delta

    def _claims(self, lease: Lease) -> _Claims:
        nets = tuple(n for n in (lease.subnet, lease.ipv6_subnet) if n is not None)
        unique = self.policy.unique
        return _Claims(nets, unique(lease) if unique is not None else ())

    def _refuse(self, lease: Lease, reason: Refusal, delta: TableDelta) -> None:
        ident = lease.ident
        if self._refused.get(ident) != (lease.revision, reason.message):
            log.warning("Refusing lease %s (public IP %s): %s", ident, lease.attrs.public_ip,
                        reason.message)
            delta.refused.append((lease, reason))
        self._refused[ident] = (lease.revision, reason.message)

    def _upsert(self, lease: Lease, delta: TableDelta) -> None:
        ident = lease.ident
        if ident == self.own_key:
            return
        reason = refusal(lease, self.policy)
        if reason is not None:
            self._refuse(lease, reason, delta)
            self._losers.pop(ident, None)
            self._remove(ident, delta)
            return
        old = self._peers.get(ident)
        if old is not None:
            self._owners.remove(ident, self._claims(old))
        self._losers.pop(ident, None)
        claims = self._claims(lease)
        holders = self._owners.overlapping(claims)
        senior = sorted((self._peers[h] for h in holders if self._peers[h].rank < lease.rank),
                        key=lambda le: le.rank)
        if senior:
            if old is not None:
                del self._peers[ident]
                delta.changed.add(ident)
                delta.removed.append(old)
            self._losers[ident] = lease
            self._refuse(lease, _conflict(lease, senior[0]), delta)
            if old is not None:
                self._promote(old, delta)
            return
        evicted = [self._peers.pop(h) for h in holders]
        for ev in evicted:
            self._owners.remove(ev.ident, self._claims(ev))
            delta.changed.add(ev.ident)
            delta.removed.append(ev)
            self._losers[ev.ident] = ev
            self._refuse(ev, _conflict(ev, lease), delta)
        self._refused.pop(ident, None)
        self._peers[ident] = lease  # keeps the newest expiration even when nothing else changed
        self._owners.add(ident, claims)
        if old != lease:
            delta.changed.add(ident)
            delta.added.append(lease)
        if old is not None and self._claims(old) != claims:
            self._promote(old, delta)
        for ev in evicted:
            self._promote(ev, delta)

    def _remove(self, ident: str, delta: TableDelta) -> None:
        self._losers.pop(ident, None)
        old = self._peers.pop(ident, None)
        if old is not None:
            self._owners.remove(ident, self._claims(old))
            delta.changed.add(ident)
            delta.removed.append(old)
            self._promote(old, delta)

    def _promote(self, gone: Lease, delta: TableDelta) -> None:
        """`gone` no longer holds its subnets: refused leases that overlapped it may now be
        routed, oldest first."""
        if not self._losers:
            return
        gone_claims = self._claims(gone)
        waiting = sorted((le for le in self._losers.values()
                          if self._claims(le).clash(gone_claims)), key=lambda le: le.rank)
        for lease in waiting:
            claims = self._claims(lease)
            if self._owners.overlapping(claims):
                continue
            del self._losers[lease.ident]
            self._refused.pop(lease.ident, None)
            self._peers[lease.ident] = lease
            self._owners.add(lease.ident, claims)
            delta.changed.add(lease.ident)
            delta.added.append(lease)
            log.info("Lease %s no longer conflicts with %s: routing it", lease.ident,
                     gone.ident)


def _conflict(loser: Lease, winner: Lease) -> Refusal:
    return Refusal("conflict", f"it claims what lease {winner.ident} (public IP "
                   f"{winner.attrs.public_ip}) holds (an overlapping subnet or the same "
                   "VTEP MAC); the older lease keeps it")
