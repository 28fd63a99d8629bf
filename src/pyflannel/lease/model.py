"""The lease value types and their wire formats, shared by every subnet manager.

A lease binds a pod subnet (IPv4, IPv6 or both) to a node's public address and backend
data. The etcd key and the JSON value are upstream flannel's, byte for byte, so an
upstream node and a pyflannel node read each other's leases.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

UNSET_IPV4 = IPv4Address("0.0.0.0")

# Upstream's parse regex for subnet keys (pkg/subnet/subnet.go), including its quirk of an
# unescaped dot in the third position, so that we accept exactly the keys it accepts.
_SUBNET_KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")


class LeaseFormatError(ValueError):
    """A key or value in the store that is not a flannel lease."""


_CANONICAL_KEYS = frozenset({"PublicIP", "PublicIPv6", "BackendType", "BackendData",
                             "BackendV6Data"})
_CANONICAL_BY_LOWER = {k.lower(): k for k in _CANONICAL_KEYS}


def parse_ipv4(text: str) -> IPv4Address:
    """IPv4Address(text), 5x faster: start-up parses one address per peer (10k+).
    inet_pton is as strict as ipaddress (four decimal parts, no leading zeros)."""
    try:
        return IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, TypeError):
        return IPv4Address(text)  # raises ipaddress's own, clearer error


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
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise LeaseFormatError(f"lease value is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise LeaseFormatError("lease value is not a JSON object")
        # Go's encoding/json matches keys case-insensitively; Go itself writes them in
        # canonical case, which is the fast path.
        if not obj.keys() <= _CANONICAL_KEYS:
            obj = {_CANONICAL_BY_LOWER.get(k.lower(), k): v for k, v in obj.items()}
        try:
            pub = obj.get("PublicIP")
            pub4 = parse_ipv4(pub) if isinstance(pub, str) and pub else (
                IPv4Address(pub) if pub else UNSET_IPV4)
            pub6_raw = obj.get("PublicIPv6")
            pub6 = IPv6Address(pub6_raw) if pub6_raw else None
        except ValueError as e:
            raise LeaseFormatError(f"lease PublicIP: {e}") from None
        btype = obj.get("BackendType") or ""
        if not isinstance(btype, str):
            raise LeaseFormatError("lease BackendType is not a string")
        return cls(
            public_ip=pub4,
            public_ipv6=pub6,
            backend_type=btype,
            backend_data=_compact(obj.get("BackendData")),
            backend_v6_data=_compact(obj.get("BackendV6Data")),
        )

    def backend_data_obj(self) -> Any:
        return json.loads(self.backend_data) if self.backend_data else None


def _compact(value: Any) -> str:
    # Go re-emits a RawMessage compacted; absent and JSON null both mean "no data".
    if value is None:
        return ""
    return json.dumps(value, separators=(",", ":"))


def compact_json(value: Any) -> str:
    """Backend data as Go would write it inside a lease."""
    return _compact(value)


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

    @property
    def key(self) -> str:
        return subnet_key(self.subnet, self.ipv6_subnet)


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


_V6_ONLY_KEY = re.compile(r"^&([a-f\d:]+)-(\d+)$")


def parse_subnet_key(key: str) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Inverse of subnet_key for a full store key or its last component. An IPv6-only key
    (`&fd00:10::-64`, which upstream writes but cannot read back) gives (None, v6)."""
    last = key.rsplit("/", 1)[-1]
    if last.startswith("&"):
        m6 = _V6_ONLY_KEY.match(last)
        try:
            if m6:
                return None, IPv6Network(f"{m6.group(1)}/{m6.group(2)}")
        except ValueError as e:
            raise LeaseFormatError(f"not a subnet key: {key!r}: {e}") from None
        raise LeaseFormatError(f"not a subnet key: {key!r}")
    if "&" not in last:
        # Fast path for the common v4-only key; anything unusual goes to the regex.
        addr, _, plen = last.rpartition("-")
        if plen.isdigit() and len(plen) <= 2 and addr.count(".") == 3:
            try:
                return IPv4Network((int(parse_ipv4(addr)), int(plen))), None
            except ValueError:
                pass
    m = _SUBNET_KEY.search(key)
    if not m:
        raise LeaseFormatError(f"not a subnet key: {key!r}")
    try:
        v4 = IPv4Network(f"{m.group(1)}/{m.group(2)}")
        v6 = IPv6Network(f"{m.group(3)}/{m.group(4)}") if m.group(3) else None
    except ValueError as e:
        raise LeaseFormatError(f"not a subnet key: {key!r}: {e}") from None
    return v4, v6
