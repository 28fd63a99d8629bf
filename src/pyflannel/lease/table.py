"""LeaseTable: the peers this node routes to, fed by snapshots and changes.

Like upstream's LeaseWatcher it drops our own lease; unlike it, every lease is validated
before it can reach the routing table, and a refused lease is logged once per distinct
reason instead of being programmed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import UNSET_IPV4, Lease

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


@dataclass(frozen=True)
class Refusal:
    """Why a lease is not routed to: `kind` is a short label for metrics."""

    kind: str
    message: str


def refusal(lease: Lease, p: LeasePolicy) -> Refusal | None:
    """Why `lease` must not be programmed, or None when it is fine."""
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
        if ip == UNSET_IPV4 or ip.is_loopback or ip.is_multicast or ip.is_reserved:
            return Refusal("public-ip", f"public IP {ip} is not a usable unicast address")
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
        if ip6 is None or ip6.is_unspecified or ip6.is_loopback or ip6.is_multicast:
            return Refusal("public-ip", f"public IPv6 {ip6} is not a usable unicast address")
        if p.own_public_ipv6 is not None and ip6 == p.own_public_ipv6:
            return Refusal("public-ip", f"public IPv6 {ip6} is our own")
    return None


@dataclass
class TableDelta:
    """What one update changed: keys whose desired state must be recomputed."""

    changed: set[str] = field(default_factory=set)
    added: list[Lease] = field(default_factory=list)
    removed: list[Lease] = field(default_factory=list)
    refused: list[tuple[Lease, Refusal]] = field(default_factory=list)


class LeaseTable:
    """The accepted peer leases, keyed by subnet key."""

    def __init__(self, own_key: str, policy: LeasePolicy) -> None:
        self.own_key = own_key
        self.policy = policy
        self._peers: dict[str, Lease] = {}
        self._refused: dict[str, str] = {}  # key -> last reason logged
        self.synced = False  # a first snapshot has been applied

    @property
    def peers(self) -> Mapping[str, Lease]:
        return self._peers

    @property
    def refused(self) -> Mapping[str, str]:
        return self._refused

    def apply(self, update: LeaseUpdate) -> TableDelta:
        delta = TableDelta()
        if isinstance(update, LeaseSnapshot):
            seen = {lease.key for lease in update.leases}
            for key in [k for k in self._peers if k not in seen]:
                self._remove(key, delta)
            for key in [k for k in self._refused if k not in seen]:
                del self._refused[key]
            for lease in update.leases:
                self._upsert(lease, delta)
            self.synced = True
        elif isinstance(update, LeaseChanges):
            for key in update.removed:
                self._remove(key, delta)
                self._refused.pop(key, None)
            for lease in update.upserted:
                self._upsert(lease, delta)
        return delta

    def _upsert(self, lease: Lease, delta: TableDelta) -> None:
        key = lease.key
        if key == self.own_key:
            return
        reason = refusal(lease, self.policy)
        if reason is not None:
            if self._refused.get(key) != reason.message:
                log.warning("Refusing lease %s (public IP %s): %s", key,
                            lease.attrs.public_ip, reason.message)
                delta.refused.append((lease, reason))
            self._refused[key] = reason.message
            self._remove(key, delta)
            return
        self._refused.pop(key, None)
        old = self._peers.get(key)
        self._peers[key] = lease  # keeps the newest expiration even when nothing else changed
        if old != lease:
            delta.changed.add(key)
            delta.added.append(lease)

    def _remove(self, key: str, delta: TableDelta) -> None:
        old = self._peers.pop(key, None)
        if old is not None:
            delta.changed.add(key)
            delta.removed.append(old)
