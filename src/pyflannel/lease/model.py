"""The lease value types and their wire formats, shared by every subnet manager.

A lease binds a pod subnet (IPv4, IPv6 or both) to a node's public address and backend
data. The etcd key and the JSON value are upstream flannel's, byte for byte, so an
upstream node and a pyflannel node read each other's leases.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from pyflannel.jsonlimits import JsonLimitError, loads_bounded

UNSET_IPV4 = IPv4Address("0.0.0.0")
# Upstream's leases are 100-300 bytes with BackendData two levels deep; the limits leave
# room for any backend while a hostile value cannot cost more than a bounded parse.
MAX_LEASE_BYTES = 64 * 1024
MAX_LEASE_DEPTH = 16

class LeaseFormatError(ValueError):
    """A key or value in the store that is not a flannel lease."""


_CANONICAL_KEYS = frozenset({"PublicIP", "PublicIPv6", "BackendType", "BackendData",
                             "BackendV6Data"})
_CANONICAL_BY_LOWER = {k.lower(): k for k in _CANONICAL_KEYS}


def parse_ipv4(text: str) -> IPv4Address:
    """IPv4Address(text), 5x faster: start-up parses one address per peer (10k+).
    Dotted-quad only, as Go's parser: four decimal parts, no leading zeros; ValueError
    otherwise."""
    try:
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, TypeError):
        raise ValueError(f"{str(text)[:45]!r} is not an IPv4 address") from None


@dataclass(frozen=True, slots=True)
class LeaseAttrs:
    """lease.LeaseAttrs: what a node publishes about itself."""

    public_ip: IPv4Address = UNSET_IPV4
    public_ipv6: IPv6Address | None = None
    backend_type: str = ""
    # Raw, compact JSON text ("" when absent), kept as text so it round-trips unchanged.
    backend_data: str = ""
    backend_v6_data: str = ""

    def to_json(self) -> str:
        """Go's json.Marshal of LeaseAttrs: field order, null for an unset v6 address,
        omitempty on BackendType/BackendData/BackendV6Data, no spaces."""
        parts = [f'"PublicIP":{json.dumps(str(self.public_ip))}']
        parts.append(
            '"PublicIPv6":null' if self.public_ipv6 is None
            else f'"PublicIPv6":{json.dumps(str(self.public_ipv6))}'
        )
        if self.backend_type:
            parts.append(f'"BackendType":{json.dumps(self.backend_type)}')
        if self.backend_data:
            parts.append(f'"BackendData":{self.backend_data}')
        if self.backend_v6_data:
            parts.append(f'"BackendV6Data":{self.backend_v6_data}')
        return "{" + ",".join(parts) + "}"

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        fast = _attrs_fast(text)
        if fast is not None:
            return fast
        return cls._from_json_slow(text)

    @classmethod
    def _from_json_slow(cls, text: str | bytes) -> LeaseAttrs:
        try:
            obj = loads_bounded(text, what="lease value", max_bytes=MAX_LEASE_BYTES,
                                max_depth=MAX_LEASE_DEPTH)
        except JsonLimitError as e:
            raise LeaseFormatError(str(e)) from None
        if not isinstance(obj, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        # Go's encoding/json matches keys case-insensitively; Go itself writes them in
        # canonical case, which is the fast path.
        if not obj.keys() <= _CANONICAL_KEYS:
            obj = {_CANONICAL_BY_LOWER.get(k.lower(), k): v for k, v in obj.items()}
        pub4 = _public_ip(obj.get("PublicIP"), socket.AF_INET, "PublicIP")
        pub6 = _public_ip(obj.get("PublicIPv6"), socket.AF_INET6, "PublicIPv6")
        btype = obj.get("BackendType") or ""
        if not isinstance(btype, str):
            raise LeaseFormatError("lease BackendType is not a string")
        return cls(
            public_ip=pub4,
            public_ipv6=pub6,
            backend_type=sys.intern(btype),
            backend_data=_compact(obj.get("BackendData")),
            backend_v6_data=_compact(obj.get("BackendV6Data")),
        )

    def backend_data_obj(self) -> Any:
        return json.loads(self.backend_data) if self.backend_data else None


# What upstream's json.Marshal writes for host-gw, vxlan and every backend without data
# (ipv4 only), byte for byte: the bulk of a cold start's 10k-50k leases. Anything this
# matches, the general parser (_from_json_slow) accepts with the same result: the fields
# are in canonical case, once each, the address is checked by inet_pton as there, and the
# BackendData text is already what _compact would re-emit (compact, no escapes, an
# integer without leading zeros). Everything else takes the general path.
_UPSTREAM_FORM = re.compile(
    rb'\{"PublicIP":"([0-9.]{7,15})","PublicIPv6":null,"BackendType":"([a-z0-9-]{1,32})"'
    rb'(?:,"BackendData":(\{"VNI":(?:0|[1-9][0-9]{0,8}),"VtepMAC":"[0-9a-f:]{17}"\}))?\}')


def _attrs_fast(text: str | bytes) -> LeaseAttrs | None:
    if not isinstance(text, bytes):
        return None
    m = _UPSTREAM_FORM.fullmatch(text)
    if m is None:
        return None
    ip, btype, data = m.groups()
    try:
        packed = socket.inet_pton(socket.AF_INET, ip.decode())
    except OSError:
        return None  # the general path says why
    # Interned: every lease names one of a few types (a mortal intern, freed with them).
    return LeaseAttrs(IPv4Address(packed), None, sys.intern(btype.decode()),
                      data.decode() if data else "", "")


def _public_ip(value: Any, family: int, field_name: str) -> Any:
    """Go's ip.IP4/IP6 UnmarshalJSON: a JSON string in dotted-quad / RFC 4291 text form, or
    null/absent. A number (`3232255290`) or any other type is refused, as Go refuses it."""
    if value is None or value == "":
        return UNSET_IPV4 if family == socket.AF_INET else None
    if not isinstance(value, str) or len(value) > 45:
        raise LeaseFormatError(f"lease {field_name}: expected an IP address string, got "
                               f"{type(value).__name__} {str(value)[:40]!r}")
    try:
        packed = socket.inet_pton(family, value)
    except OSError:
        raise LeaseFormatError(f"lease {field_name}: {value[:45]!r} is not an IPv"
                               f"{4 if family == socket.AF_INET else 6} address") from None
    return IPv4Address(packed) if family == socket.AF_INET else IPv6Address(packed)


def _compact(value: Any) -> str:
    # Go re-emits a RawMessage compacted; absent and JSON null both mean "no data".
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def compact_json(value: Any) -> str:
    """Backend data as Go would write it inside a lease."""
    return _compact(value)


@dataclass(frozen=True)
class StoredNodeState:
    """What the store remembers about this node from before (VTEP MACs, so peers' neighbour
    entries stay valid across restarts)."""

    backend_data: str = ""
    backend_v6_data: str = ""


@dataclass(frozen=True, slots=True)
class Lease:
    """One node's lease. `expiration` is a Unix time, or None when unknown (peers'
    expirations are not looked up: that would cost one etcd call per peer). A
    reservation is an etcd key without an etcd lease: it never expires."""

    subnet: IPv4Network | None
    attrs: LeaseAttrs
    ipv6_subnet: IPv6Network | None = None
    expiration: float | None = field(default=None, compare=False)
    reservation: bool = False
    # etcd's lease ID or the Kubernetes node name: where the lease came from.
    origin: str = field(default="", compare=False)
    # The store's own name for the lease when it is not the subnet key: the Node's name in
    # kube mode, where two Nodes can claim overlapping podCIDRs. "" in etcd mode, where
    # the (canonical) key is the identity.
    node: str = ""
    # Seniority for conflicts: etcd's create revision, a Node's creation time (Unix s).
    # Rewriting a key keeps it, so a later writer can never out-rank an older lease.
    created: int = field(default=0, compare=False)
    # etcd's mod revision / the Node's resourceVersion: refusals are logged once each.
    revision: int = field(default=0, compare=False)

    # subnet_key, computed once: the table, the data plane and the logs ask for it often.
    _key: str = field(default="", init=False, compare=False, repr=False)

    @property
    def key(self) -> str:
        k = self._key
        if not k:
            k = subnet_key(self.subnet, self.ipv6_subnet)
            object.__setattr__(self, "_key", k)
        return k

    @property
    def ident(self) -> str:
        """What the store calls this lease: the key its removal is announced by."""
        return self.node or self.key

    @property
    def rank(self) -> tuple[int, str]:
        """Lower wins a conflict: older first, then by name (deterministic)."""
        return (self.created, self.ident)


def subnet_key(subnet: IPv4Network | None, ipv6_subnet: IPv6Network | None = None) -> str:
    """The store key suffix: `10.5.34.0-24`, or `10.5.34.0-24&fd00:12:13::-56` for dual stack."""
    if subnet is None and ipv6_subnet is None:
        raise ValueError("a lease needs an IPv4 or an IPv6 subnet")
    v4 = f"{subnet.network_address}-{subnet.prefixlen}" if subnet is not None else ""
    if ipv6_subnet is None:
        return v4
    # IPv6-only leases are keyed by upstream with an empty v4 part; it cannot parse them
    # back either, so a v6-only etcd cluster is unusual but we stay symmetrical.
    return f"{v4}&{ipv6_subnet.network_address.compressed}-{ipv6_subnet.prefixlen}"


_KEY_FORM = "<network address>-<prefix length>, then &<IPv6 network>-<length> for dual stack"
MAX_KEY_LEN = 100  # the longest canonical key, v4 + v6, is 62 characters


# A canonical IPv4-only key: dotted quad without leading zeros, a prefix length 0-32
# without one (ASCII digits only: `\\d` would take other scripts' digits).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_V4_KEY = re.compile(rf"({_OCTET}(?:\.{_OCTET}){{3}})-(3[0-2]|[12]?[0-9])")


def _v4_key_fast(key: str) -> IPv4Network | None:
    """The network of a canonical IPv4-only key, or None when the key is anything else
    (parse_subnet_key then decides, with its messages). Host bits must be clear: the
    canonical key names the network address."""
    m = _V4_KEY.fullmatch(key)
    if m is None:
        return None
    addr = int.from_bytes(socket.inet_aton(m[1]), "big")
    plen = int(m[2])
    if addr & ((1 << (32 - plen)) - 1):
        return None
    return IPv4Network((addr, plen))


def stored_lease(key: str, value: str | bytes, *, reservation: bool, origin: str,
                 created: int, revision: int) -> Lease:
    """A lease as a store holds it: `key` the part after `<prefix>/subnets/`, `value` its
    JSON. Raises LeaseFormatError for anything that is not a flannel lease."""
    v4 = _v4_key_fast(key)
    v6: IPv6Network | None = None
    if v4 is None:
        v4, v6 = parse_subnet_key(key)
    lease = Lease(subnet=v4, attrs=LeaseAttrs.from_json(value), ipv6_subnet=v6,
                  expiration=None, reservation=reservation, origin=origin, created=created,
                  revision=revision)
    # The key is canonical (checked above), so it is the lease's key as subnet_key writes it.
    object.__setattr__(lease, "_key", key)
    return lease


def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Inverse of subnet_key for the part of a store key after `<prefix>/subnets/`,
    anchored: it must be exactly what subnet_key (upstream's MakeSubnetKey) writes for the
    subnets it names, so no path, prefix, suffix, leading zero, host bit, upper-case hex or
    uncompressed IPv6 form is accepted. Otherwise two keys could name one subnet, and the
    second one could take the first one's route (or remove it when deleted)."""
    last = key
    if len(last) > MAX_KEY_LEN:
        raise LeaseFormatError(f"not a subnet key: {key[:MAX_KEY_LEN]!r}... (too long)")
    v4_text, amp, v6_text = last.partition("&")
    try:
        v4 = _key_net(v4_text, 4) if v4_text else None
        v6 = _key_net(v6_text, 6) if amp else None
    except ValueError:
        raise LeaseFormatError(f"not a subnet key: {key!r} (expected {_KEY_FORM})") from None
    if v4 is None and v6 is None:
        raise LeaseFormatError(f"not a subnet key: {key!r} (expected {_KEY_FORM})")
    if subnet_key(v4, v6) != last:
        raise LeaseFormatError(f"not a canonical subnet key: {key!r} (upstream writes "
                               f"{subnet_key(v4, v6)!r} for these subnets)")
    return v4, v6


def _key_net(text: str, version: int) -> Any:
    addr, dash, plen = text.rpartition("-")
    if not dash or not plen.isdigit() or not plen.isascii() or len(plen) > 3:
        raise ValueError(text)
    if version == 4:
        return IPv4Network((int(parse_ipv4(addr)), int(plen)))
    try:
        packed = socket.inet_pton(socket.AF_INET6, addr)
    except OSError:
        raise ValueError(text) from None
    return IPv6Network((IPv6Address(packed), int(plen)))
