"""net-conf.json: the cluster network configuration (upstream `pkg/subnet/config.go`).

Decoding follows Go's `encoding/json` into upstream's `subnet.Config`, so files that
work with flannel work here:

* keys match the Go field names case-insensitively (Go's folding: per character
  upper(lower(c)), so "network", "NETWORK" and "Network" are the same key); unknown
  keys are ignored; when a key occurs twice the last one wins;
* bools must be JSON booleans, lengths must be non-negative JSON integers
  (`24.0` and `"24"` are errors), addresses and CIDRs are JSON strings;
* CIDRs are parsed like `net.ParseCIDR` (an explicit `/N` is required) and masked,
  so `10.244.1.7/16` means `10.244.0.0/16`;
* `EnableIPv4` defaults to true, everything else to false / unset;
* a JSON `null` value leaves the field at its default (as Go does for plain fields).

**Default backend.** Upstream's code uses `udp` when `Backend` is absent, while its
documentation says `vxlan`. We do not implement udp, and every manifest sets
`"Type": "vxlan"`, so an absent `Backend` means `{"Type": "vxlan"}` here. A `Backend`
object without a (non-empty) `Type` is an error naming `Backend.Type`; upstream
fails later with "unknown backend type: ".

Every error is a `NetConfError` whose text is one line starting with the field name.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pyflannel.config.flags import ConfigError
from pyflannel.jsonlimits import JsonLimitError, loads_bounded, one_line

DEFAULT_BACKEND_TYPE = "vxlan"

# A real net-conf.json is a few hundred bytes nesting two objects (the config and its
# Backend). The limits leave room for any backend's options while keeping a hostile
# value in etcd or the ConfigMap from costing memory or recursion.
MAX_BYTES = 64 * 1024
MAX_DEPTH = 16
_EXAMPLE = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'

_UINT64_MAX = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


class NetConfError(ConfigError):
    """net-conf.json is malformed or invalid; one line naming the field and what is expected."""


def _default_backend() -> dict[str, Any]:
    return {"Type": DEFAULT_BACKEND_TYPE}


@dataclass(frozen=True, kw_only=True)
class NetConf:
    """The decoded network configuration. Immutable; derive with `dataclasses.replace`.

    Construction checks every attribute's type strictly (no coercion: `True` is not an
    int, a string is not a CIDR) and that the lengths are non-negative, raising
    `ValueError` naming the attribute, so a hand-built NetConf obeys the same invariants
    as one from `parse_netconf`.
    """

    network: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    enable_nftables: bool = False
    subnet_len: int = 0
    subnet_min: IPv4Address | None = None
    subnet_max: IPv4Address | None = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    backend_type: str = DEFAULT_BACKEND_TYPE
    backend: dict[str, Any] = dataclasses.field(default_factory=_default_backend)

    def __post_init__(self) -> None:
        for name, (kind, optional) in _NETCONF_TYPES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            # bool is an int subclass; a strict int field must still refuse it.
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                expected = kind.__name__ + (" or None" if optional else "")
                raise ValueError(f"NetConf.{name}: expected {expected}, "
                                 f"got {type(value).__name__} {value!r}")
        for name in ("subnet_len", "ipv6_subnet_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"NetConf.{name}: expected a non-negative integer, "
                                 f"got {getattr(self, name)}")
        if not all(isinstance(key, str) for key in self.backend):
            raise ValueError("NetConf.backend: expected string keys")
        # Our own copy, so the caller mutating its dict cannot change a frozen NetConf.
        object.__setattr__(self, "backend", dict(self.backend))

    def model_copy(self, *, update: Mapping[str, Any] | None = None) -> NetConf:
        """A copy with `update` applied; kept for callers written against the earlier
        pydantic model. Unlike pydantic's, the result is validated."""
        return dataclasses.replace(self, **(update or {}))


# attribute -> (required type, None allowed); checked by NetConf.__post_init__.
_NETCONF_TYPES: dict[str, tuple[type, bool]] = {
    "network": (IPv4Network, True),
    "ipv6_network": (IPv6Network, True),
    "enable_ipv4": (bool, False),
    "enable_ipv6": (bool, False),
    "enable_nftables": (bool, False),
    "subnet_len": (int, False),
    "subnet_min": (IPv4Address, True),
    "subnet_max": (IPv4Address, True),
    "ipv6_subnet_len": (int, False),
    "ipv6_subnet_min": (IPv6Address, True),
    "ipv6_subnet_max": (IPv6Address, True),
    "backend_type": (str, False),
    "backend": (dict, False),
}


# --- Go encoding/json compatibility ----------------------------------------------------


def go_fold(name: str) -> str:
    """Go's `foldName`: the key under which encoding/json matches names case-insensitively."""
    out: list[str] = []
    for ch in name:
        if ch < "\x80":
            out.append(ch.upper())
            continue
        # Go applies the *simple* one-rune case mappings; Python's may expand a
        # character (e.g. 'ß'.upper() == 'SS'), in which case the rune stays as is.
        lower = "i" if ch == "\u0130" else ch.lower()
        if len(lower) != 1:
            lower = ch
        upper = lower.upper()
        out.append(upper if len(upper) == 1 else lower)
    return "".join(out)


class _Pairs(dict[str, Any]):
    """A decoded JSON object that also remembers its key/value pairs in file order."""

    pairs: list[tuple[str, Any]]


def _object_hook(pairs: list[tuple[str, Any]]) -> _Pairs:
    obj = _Pairs(pairs)
    obj.pairs = pairs
    return obj


def _decode_json(text: str | bytes, name: str) -> Any:
    try:
        return loads_bounded(text, what=name, max_bytes=MAX_BYTES, max_depth=MAX_DEPTH,
                             object_pairs_hook=_object_hook)
    except JsonLimitError as exc:
        hint = f" (expected a JSON object such as {_EXAMPLE})" if "invalid JSON" in str(exc) else ""
        raise NetConfError(f"{exc}{hint}") from None


def _match_fields(obj: _Pairs, names: tuple[str, ...]) -> dict[str, Any]:
    """Map the object's keys onto `names` the way Go does; unknown keys are dropped."""
    by_fold = {go_fold(name): name for name in names}
    matched: dict[str, Any] = {}
    for key, value in obj.pairs:
        name = by_fold.get(go_fold(key))
        if name is not None:
            matched[name] = value
    return matched


def _quote(text: str, limit: int = 80) -> str:
    """`text` as a JSON string for a message, cut to `limit` characters."""
    if len(text) <= limit:
        return json.dumps(text)
    return json.dumps(text[:limit])[:-1] + '..."'


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, int | float):
        return f"number {_quote(repr(value))[1:-1]}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _as_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise NetConfError(f"{field}: expected a JSON boolean (true or false), "
                           f"got {_json_kind(value)}")
    return value


def _as_uint(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise NetConfError(f"{field}: expected a non-negative integer, got {_json_kind(value)}")
    return value


def _as_int(field: str, value: Any, low: int = _INT64_MIN, high: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NetConfError(f"{field}: expected an integer, got {_json_kind(value)}")
    if not low <= value <= high:
        raise NetConfError(f"{field}: expected an integer in {low}..{high}, got {value}")
    return value


def _as_string(field: str, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise NetConfError(f"{field}: expected a string with {what}, got {_json_kind(value)}")
    return value


def _parse_cidr(field: str, value: Any, version: int) -> IPv4Network | IPv6Network:
    """Like Go's `net.ParseCIDR` followed by masking; the family must be `version`."""
    what = f"an IPv{version} CIDR"
    text = _as_string(field, value, what)
    addr_text, slash, bits = text.partition("/")
    try:
        if not slash or "%" in addr_text or not (bits.isascii() and bits.isdigit()):
            raise ValueError(text)
        addr = ip_address(addr_text)
        if addr.version != version or int(bits) > addr.max_prefixlen:
            raise ValueError(text)
    except ValueError:
        example = "10.244.0.0/16" if version == 4 else "2001:cafe:42::/56"
        raise NetConfError(f"{field}: invalid IPv{version} CIDR format: {_quote(text)} "
                           f"(expected e.g. {example})") from None
    return ip_network((addr, int(bits)), strict=False)


def _parse_ip4(field: str, value: Any) -> IPv4Address:
    text = _as_string(field, value, "an IPv4 address")
    try:
        addr = ip_address(text)
    except ValueError:
        addr = None
    # Go's To4() also accepts the IPv4-mapped IPv6 form.
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None and "%" not in text:
        addr = addr.ipv4_mapped
    if not isinstance(addr, IPv4Address):
        raise NetConfError(f"{field}: invalid IP address format: {_quote(text)} "
                           "(expected an IPv4 address such as 10.10.0.0)")
    return addr


def _parse_ip6(field: str, value: Any) -> IPv6Address:
    text = _as_string(field, value, "an IPv6 address")
    try:
        addr = ip_address(text)
    except ValueError:
        addr = None
    if not isinstance(addr, IPv6Address) or "%" in text:
        raise NetConfError(f"{field}: invalid IPv6 address format: {_quote(text)} "
                           "(expected an IPv6 address such as 2001:cafe:42:1::)")
    return addr


_CONFIG_FIELDS = (
    "Network", "IPv6Network", "EnableIPv4", "EnableIPv6", "EnableNFTables", "SubnetLen",
    "SubnetMin", "SubnetMax", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend",
)


def _parse_backend(value: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(value, dict):
        raise NetConfError(f"Backend: expected a JSON object such as {{\"Type\": \"vxlan\"}}, "
                           f"got {_json_kind(value)}")
    assert isinstance(value, _Pairs)
    backend_type = _match_fields(value, ("Type",)).get("Type")
    if backend_type is None or backend_type == "":
        raise NetConfError('Backend.Type: expected the backend name such as "vxlan" '
                           "(unknown backend type: )")
    if not isinstance(backend_type, str):
        raise NetConfError(f"Backend.Type: expected a string naming the backend, "
                           f"got {_json_kind(backend_type)}")
    return backend_type.lower(), dict(value)


def parse_netconf(text: str | bytes, *, source: str | None = None) -> NetConf:
    """Decode net-conf.json (Go-compatible, see the module docstring). No range checks here:
    kube mode uses the file as is, etcd mode runs `check_network_config` afterwards.

    `source` says where the text came from (e.g. "network config at etcd key
    /coreos.com/network/config"); when given, every error starts with it. Without it,
    document errors start with "net-conf.json" and field errors with the field name."""
    name = source or "net-conf.json"
    obj = _decode_json(text, name)
    if not isinstance(obj, _Pairs):  # every JSON object decodes to one
        raise NetConfError(f"{one_line(name)}: expected a JSON object such as {_EXAMPLE}, "
                           f"got {_json_kind(obj)}")
    try:
        return _decode_config(obj)
    except NetConfError as exc:
        if source is None:
            raise
        raise NetConfError(f"{one_line(source)}: {exc}") from None


def _decode_config(obj: _Pairs) -> NetConf:
    # null keeps the default, as Go's decoder does for plain fields; Backend is raw JSON
    # in Go, so a null there is "present" (and not an object).
    raw = {k: v for k, v in _match_fields(obj, _CONFIG_FIELDS).items()
           if v is not None or k == "Backend"}
    values: dict[str, Any] = {}
    if "Network" in raw:
        values["network"] = _parse_cidr("Network", raw["Network"], 4)
    if "IPv6Network" in raw:
        values["ipv6_network"] = _parse_cidr("IPv6Network", raw["IPv6Network"], 6)
    for field, attr in (("EnableIPv4", "enable_ipv4"), ("EnableIPv6", "enable_ipv6"),
                        ("EnableNFTables", "enable_nftables")):
        if field in raw:
            values[attr] = _as_bool(field, raw[field])
    for field, attr in (("SubnetLen", "subnet_len"), ("IPv6SubnetLen", "ipv6_subnet_len")):
        if field in raw:
            values[attr] = _as_uint(field, raw[field])
    for field, attr in (("SubnetMin", "subnet_min"), ("SubnetMax", "subnet_max")):
        if field in raw:
            values[attr] = _parse_ip4(field, raw[field])
    for field, attr in (("IPv6SubnetMin", "ipv6_subnet_min"),
                        ("IPv6SubnetMax", "ipv6_subnet_max")):
        if field in raw:
            values[attr] = _parse_ip6(field, raw[field])
    if "Backend" in raw:
        values["backend_type"], values["backend"] = _parse_backend(raw["Backend"])
    return NetConf(**values)


# --- CheckNetworkConfig (etcd mode) -----------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """Field names and numbers that differ between the IPv4 and IPv6 rules."""

    network: str
    subnet_len: str
    subnet_min: str
    subnet_max: str
    max_subnet_len: int      # the longest SubnetLen that still leaves room for a /30 (/126)
    default_len: int         # 24 or 64
    min_useful_prefix: int   # /28 or /124


_V4 = _Family("Network", "SubnetLen", "SubnetMin", "SubnetMax", 30, 24, 28)
_V6 = _Family("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", 126, 64, 124)


def _check_family(
    fam: _Family,
    network: IPv4Network | IPv6Network | None,
    subnet_len: int,
    subnet_min: IPv4Address | IPv6Address | None,
    subnet_max: IPv4Address | IPv6Address | None,
) -> tuple[int, int, int]:
    """Upstream's rules for one family; returns (SubnetLen, SubnetMin, SubnetMax) as ints."""
    if network is None:
        raise NetConfError(f"{fam.network}: please define a correct {fam.network} parameter "
                           "in the flannel config")
    prefix = network.prefixlen
    if subnet_len > 0:
        if subnet_len > fam.max_subnet_len:
            raise NetConfError(f"{fam.subnet_len}: {fam.subnet_len} must be less than "
                               f"/{fam.max_subnet_len + 1} (got {subnet_len})")
        if subnet_len < prefix + 2:
            raise NetConfError(f"{fam.subnet_len}: {fam.network} must be able to accommodate at "
                               f"least four subnets ({fam.subnet_len} {subnet_len} needs a "
                               f"{fam.network} of /{subnet_len - 2} or larger, got {network})")
    elif prefix > fam.min_useful_prefix:
        raise NetConfError(f"{fam.network}: {fam.network} is too small. Minimum useful network "
                           f"prefix is /{fam.min_useful_prefix} (got {network})")
    elif prefix <= fam.default_len - 2:
        subnet_len = fam.default_len
    else:
        subnet_len = prefix + 2

    bits = network.max_prefixlen
    size = 1 << (bits - subnet_len)
    first = int(network.network_address)
    # The first subnet is skipped by default: with 10.100.0.0/16 a host holding
    # 10.100.0.0 would collide with the network's own address.
    low = first + size if subnet_min is None else int(subnet_min)
    high = first + network.num_addresses - size if subnet_max is None else int(subnet_max)
    for field, given in ((fam.subnet_min, subnet_min), (fam.subnet_max, subnet_max)):
        if given is not None and given not in network:
            raise NetConfError(f"{field}: {field} is not in the range of the {fam.network} "
                               f"({given} is outside {network})")
    for field, value in ((fam.subnet_min, low), (fam.subnet_max, high)):
        if value % size:
            addr = type(network.network_address)(value)
            raise NetConfError(f"{field}: {field} is not on a {fam.subnet_len} boundary: {addr} "
                               f"(expected a multiple of /{subnet_len})")
    if low > high:
        # Upstream accepts this and then finds no free subnet; failing here is clearer.
        raise NetConfError(f"{fam.subnet_min}: {fam.subnet_min} must not be above "
                           f"{fam.subnet_max}")
    return subnet_len, low, high


def check_network_config(nc: NetConf, *, source: str | None = None) -> NetConf:
    """Upstream's `CheckNetworkConfig` (etcd mode only): validate and fill in the defaults
    for SubnetLen/SubnetMin/SubnetMax (and the IPv6 trio) of every enabled family.
    `source` as for `parse_netconf`: when given, errors start with it."""
    try:
        return _check_network_config(nc)
    except NetConfError as exc:
        if source is None:
            raise
        raise NetConfError(f"{one_line(source)}: {exc}") from None


def _check_network_config(nc: NetConf) -> NetConf:
    update: dict[str, Any] = {}
    if nc.enable_ipv4:
        # Go cannot tell an explicit 0.0.0.0 from "unset" (IP4 is a uint32).
        given_min = nc.subnet_min if nc.subnet_min != IPv4Address(0) else None
        given_max = nc.subnet_max if nc.subnet_max != IPv4Address(0) else None
        length, low, high = _check_family(_V4, nc.network, nc.subnet_len, given_min, given_max)
        update.update(subnet_len=length, subnet_min=IPv4Address(low),
                      subnet_max=IPv4Address(high))
    if nc.enable_ipv6:
        length, low, high = _check_family(_V6, nc.ipv6_network, nc.ipv6_subnet_len,
                                          nc.ipv6_subnet_min, nc.ipv6_subnet_max)
        update.update(ipv6_subnet_len=length, ipv6_subnet_min=IPv6Address(low),
                      ipv6_subnet_max=IPv6Address(high))
    return dataclasses.replace(nc, **update)


# --- vxlan backend options --------------------------------------------------------------


@dataclass(frozen=True)
class VxlanOptions:
    """`Backend` options of the vxlan backend. `port` 0 leaves the kernel default (8472);
    `mtu` 0 means "the external interface's MTU" (50 is subtracted for the device)."""

    vni: int = 1
    port: int = 0
    gbp: bool = False
    learning: bool = False
    mtu: int = 0
    direct_routing: bool = False


_VXLAN_FIELDS = ("VNI", "Port", "GBP", "Learning", "MTU", "DirectRouting")


def vxlan_options(nc: NetConf) -> VxlanOptions:
    """Decode the vxlan options from `nc.backend` (keys case-insensitive, unknown ignored)."""
    backend = _object_hook(list(nc.backend.items()))
    raw = {k: v for k, v in _match_fields(backend, _VXLAN_FIELDS).items() if v is not None}
    values: dict[str, Any] = {}
    if "VNI" in raw:
        values["vni"] = _as_int("Backend.VNI", raw["VNI"], 0, (1 << 24) - 1)
    if "Port" in raw:
        values["port"] = _as_int("Backend.Port", raw["Port"], 0, 65535)
    if "MTU" in raw:
        values["mtu"] = _as_int("Backend.MTU", raw["MTU"], 0, _INT64_MAX)
    for field, attr in (("GBP", "gbp"), ("Learning", "learning"),
                        ("DirectRouting", "direct_routing")):
        if field in raw:
            values[attr] = _as_bool(f"Backend.{field}", raw[field])
    return VxlanOptions(**values)


# --- wireguard backend options -----------------------------------------------------------

WIREGUARD_MODES = ("separate", "auto", "ipv4", "ipv6")


@dataclass(frozen=True)
class WireguardOptions:
    """`Backend` options of the wireguard backend, upstream's defaults. `mtu` 0 means "the
    external interface's MTU" (80 is subtracted for the device); `psk` is base64 or ""."""

    listen_port: int = 51820
    listen_port_v6: int = 51821
    psk: str = ""
    keepalive: int = 0
    mode: str = "separate"
    mtu: int = 0


_WIREGUARD_FIELDS = ("ListenPort", "ListenPortV6", "PSK", "PersistentKeepaliveInterval",
                     "Mode", "MTU")


def wireguard_options(nc: NetConf) -> WireguardOptions:
    """Decode the wireguard options from `nc.backend` (keys case-insensitive, as Go)."""
    backend = _object_hook(list(nc.backend.items()))
    raw = {k: v for k, v in _match_fields(backend, _WIREGUARD_FIELDS).items() if v is not None}
    values: dict[str, Any] = {}
    for field, attr in (("ListenPort", "listen_port"), ("ListenPortV6", "listen_port_v6")):
        if field in raw:
            values[attr] = _as_int(f"Backend.{field}", raw[field], 1, 65535)
    if "PersistentKeepaliveInterval" in raw:
        # upstream: a time.Duration given in seconds; the wire format holds 16 bits
        values["keepalive"] = _as_int("Backend.PersistentKeepaliveInterval",
                                      raw["PersistentKeepaliveInterval"], 0, 65535)
    if "MTU" in raw:
        values["mtu"] = _as_int("Backend.MTU", raw["MTU"], 0, _INT64_MAX)
    if "PSK" in raw:
        psk = _as_string("Backend.PSK", raw["PSK"], "a base64 WireGuard key")
        if psk:
            try:
                ok = len(base64.b64decode(psk, validate=True)) == 32
            except ValueError:
                ok = False
            if not ok:
                raise NetConfError("Backend.PSK: expected a base64 WireGuard key (32 bytes, "
                                   "44 characters, as `wg genpsk` prints)")
        values["psk"] = psk
    if "Mode" in raw:
        mode = _as_string("Backend.Mode", raw["Mode"], "the mode")
        if mode not in WIREGUARD_MODES:
            raise NetConfError(f"Backend.Mode: no valid Mode configured: {_quote(mode)} "
                               f"(expected {', '.join(WIREGUARD_MODES)})")
        values["mode"] = mode
    return WireguardOptions(**values)


# --- extension backend options ----------------------------------------------------------


@dataclass(frozen=True)
class ExtensionOptions:
    """`Backend` options of the extension backend: command lines ("" for none)."""

    pre_startup_command: str = ""
    post_startup_command: str = ""
    subnet_add_command: str = ""
    subnet_remove_command: str = ""


_EXTENSION_FIELDS = ("PreStartupCommand", "PostStartupCommand", "SubnetAddCommand",
                     "SubnetRemoveCommand")


def extension_options(nc: NetConf) -> ExtensionOptions:
    """Decode the extension options (keys case-insensitive, unknown ignored, null = unset,
    as Go's json.Unmarshal into strings). A blank command (white space only) is refused:
    upstream would crash on it at its first use."""
    backend = _object_hook(list(nc.backend.items()))
    raw = {k: v for k, v in _match_fields(backend, _EXTENSION_FIELDS).items() if v is not None}
    values: dict[str, str] = {}
    for field in _EXTENSION_FIELDS:
        if field not in raw:
            continue
        text = _as_string(f"Backend.{field}", raw[field], "a command line")
        if text and not text.split():
            raise NetConfError(f"Backend.{field}: expected a command line, got only white "
                               "space (leave the field out for none)")
        values[_snake(field)] = text
    return ExtensionOptions(**values)


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
