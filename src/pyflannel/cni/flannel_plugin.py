#!/bin/sh
''':'
py="$(dirname -- "$0")/python3"; [ -x "$py" ] || py=python3
exec "$py" -I -S "$0" "$@"
'
The lines above make this file a shell script as well (sh stops at `exec`): pip
rewrites only a bare `#!python` shebang and drops its flags, so the packaged
`flannel` command starts as sh and re-runs itself under the python3 beside it with
-I -S. What `pyflannel install-cni` installs starts the interpreter only once: a
launcher with `#!<python> -IS` that imports this file from bytecode compiled at install.

The `flannel` CNI plugin: a meta-plugin that turns flanneld's subnet.env into a
`bridge` (or other delegate) config, saves it per container and delegates to it.

kubelet runs this file on every pod ADD/DEL/CHECK, as root, under `python3 -I -S`.
So it is stdlib-only, never imports pyflannel or asyncio, and imports as little as
it can: `_json`'s C scanner instead of the `json` package (which pulls in `re` and
`enum`, about 12 ms), the built-in `posix` instead of `os` (whose import, with
`_collections_abc`, costs 1.5-2 ms of a 10 ms start), `posix_spawn` with pipes
instead of `subprocess`, and no `__future__` import.

Upstream-compatible behaviour (flannel-io/cni-plugin), with these improvements:
- DEL removes the saved config only after the delegate DEL succeeded;
- CHECK really checks (saved config == config built now; then the delegate's CHECK);
- the saved config is written atomically (temp file, fsync, rename);
- a missing subnet.env is reported as "try again later" (code 11) with what to do;
- STATUS (CNI 1.1) reports whether subnet.env is usable;
- every input is bounded (stdin and the saved config 1 MiB and 64 levels of nesting,
  subnet.env 64 KiB) and every failure is a CNI error object, never a traceback;
- subnet.env values that upstream would misread are refused: FLANNEL_IPMASQ must be
  `true` or `false` (upstream reads anything else as false), FLANNEL_MTU in 68..65535.
'''

import posix
import sys

# No `from __future__ import annotations`: it imports __future__ at run time (0.15 ms
# of every call); annotations naming the types below are strings instead.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

PLUGIN_VERSION = "0.1.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
VERSIONS_WITHOUT_CHECK = ("0.3.0", "0.3.1")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
DEFAULT_DELEGATE = "bridge"
DEFAULT_IPAM = "host-local"

# CNI error codes (SPEC.md "Error codes"); 100 and up are ours.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_INTERNAL = 999
ERR_CONFIG_CHANGED = 100

# Bounds on what is read from outside. A CNI config (with a prevResult) is a few KB and
# nests about 5 levels; subnet.env is about 150 bytes. The depth limit also keeps our
# own recursive encoder (go_json) far below Python's recursion limit.
MAX_CONFIG_BYTES = 1 << 20
MAX_JSON_DEPTH = 64
MAX_SUBNET_ENV_BYTES = 64 * 1024
MAX_CONTAINER_ID = 250  # a file name in dataDir, and ".<id>.tmp" must fit NAME_MAX

JsonObject = dict[str, object]


class CniError(Exception):
    """A failure reported to the runtime as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


# --------------------------------------------------------------------------- JSON


def _reject_constant(name: str) -> object:
    # Go's encoding/json has no NaN/Infinity; Python's decoder would accept them.
    raise ValueError(f"invalid JSON value {name}")


def _go_float_value(text: str) -> float:
    value = float(text)
    if value - value != 0:  # inf; Go's decoder refuses numbers beyond float64
        raise ValueError(f"number {text[:40]} is out of range for a float64")
    return value


def _go_int(text: str) -> int | float:
    # Go decodes every JSON number into a float64; only integers that a float64
    # holds exactly may stay Python ints, or re-encoding would differ from Go.
    if len(text) > 400:  # beyond any float64 (and int() refuses 4300+ digits)
        raise ValueError(f"number {text[:40]}... is out of range for a float64")
    value = int(text)
    return value if -(2**53) <= value <= 2**53 else _go_float_value(text)


class _ScannerContext:
    """The attributes `_json.make_scanner` reads from a json.JSONDecoder."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_go_float_value)
    parse_int = staticmethod(_go_int)
    parse_constant = staticmethod(_reject_constant)
    memo: dict[str, str] = {}


_scan_once: "Callable[[str, int], tuple[object, int]] | None" = None

_JSON_SPACE = " \t\n\r"


def json_too_deep(text: str, limit: int) -> bool:
    """Whether arrays/objects in `text` nest deeper than `limit`, found without recursion
    (the C scanner recurses per level and would raise RecursionError). Brackets inside
    strings do not count. For text that is not JSON the answer still covers every
    level the scanner would enter before it stops at the first syntax error."""
    if text.count("[") + text.count("{") <= limit:
        return False  # the usual case: too few brackets to nest that deep
    depth = 0
    in_string = False
    # Splitting at quotes keeps the per-character loop to the text outside strings.
    for segment in text.split('"'):
        if in_string:
            # An odd number of trailing backslashes escapes the quote that ends it.
            if (len(segment) - len(segment.rstrip("\\"))) % 2 == 0:
                in_string = False
            continue
        in_string = True
        if "[" not in segment and "{" not in segment:
            depth -= segment.count("]") + segment.count("}")
            continue
        for ch in segment:
            if ch == "[" or ch == "{":
                depth += 1
                if depth > limit:
                    return True
            elif ch == "]" or ch == "}":
                depth -= 1
    return False


def load_json(data: bytes | str, max_bytes: int = MAX_CONFIG_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> object:
    """Decode one JSON document like Go's json.Unmarshal would (strict, no NaN, numbers
    within float64), refusing more than `max_bytes` or `max_depth` levels: ValueError."""
    global _scan_once
    if len(data) > max_bytes:  # checked on bytes before decoding; str only in tests
        raise ValueError(f"{len(data)} bytes is more than the limit of {max_bytes}")
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    if json_too_deep(text, max_depth):
        raise ValueError(f"arrays/objects nest deeper than the limit of {max_depth} levels")
    if _scan_once is None:
        _scan_once = _json_module().make_scanner(_ScannerContext())
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        value, end = _scan_once(text, start)
    except StopIteration as stop:
        raise ValueError(f"invalid JSON at offset {stop.value}") from None
    except RecursionError:  # cannot happen below the depth limit; never let it escape
        raise ValueError("arrays/objects nest too deeply") from None
    except SystemError:
        # _json reports most syntax errors as json.decoder.JSONDecodeError, but finds that
        # class only if json.decoder is loaded already. Provide it (on this error path
        # only) and scan again to get the real message.
        _provide_json_decode_error()
        try:
            value, end = _scan_once(text, start)
        except StopIteration as stop:
            raise ValueError(f"invalid JSON at offset {stop.value}") from None
    finally:
        _ScannerContext.memo.clear()
    if text[end:].strip(_JSON_SPACE):
        raise ValueError(f"invalid JSON: extra data at offset {end}")
    return value


def _json_module() -> "Any":
    """`_json`, the C scanner: imported, or under the image's launcher (whose Python has
    no path-based importer) loaded from the runtime's lib-dynload by its file name."""
    try:
        import _json

        return _json
    except ImportError:
        pass
    directory = globals().get("_FLANNEL_DYNLOAD")
    if not isinstance(directory, str):
        import json.scanner  # a Python built without the C accelerator

        return json.scanner
    import _imp

    class Spec:
        name = "_json"
        origin = f"{directory}/_json.cpython-311-x86_64-linux-gnu.so"

    module = _imp.create_dynamic(Spec)  # type: ignore[arg-type]  # it reads name, origin
    _imp.exec_dynamic(module)  # multi-phase initialisation (PEP 489)
    return module


class JSONDecodeError(ValueError):
    """What `_json` raises for a syntax error, formatted as json.decoder's (when the real
    one is not loaded: importing it pulls in `re`, and the launcher cannot import it)."""

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        lineno = doc.count("\n", 0, pos) + 1
        colno = pos - doc.rfind("\n", 0, pos)
        super().__init__(f"{msg}: line {lineno} column {colno} (char {pos})")


def _provide_json_decode_error() -> None:
    if "json.decoder" not in sys.modules:
        module = type(sys)("json.decoder")
        module.JSONDecodeError = JSONDecodeError  # type: ignore[attr-defined]
        sys.modules["json.decoder"] = module


class GoStruct(dict[str, object]):
    """A JSON object that Go marshals from a struct: keys in field order, not sorted."""


_GO_STRING_ESCAPES = {i: f"\\u{i:04x}" for i in range(0x20)}
_GO_STRING_ESCAPES.update({
    ord('"'): '\\"', ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r",
    ord("\t"): "\\t", ord("\b"): "\\b", ord("\f"): "\\f",
    # Go escapes HTML-significant characters and the JS line separators by default.
    ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
    0x2028: "\\u2028", 0x2029: "\\u2029",
})


def _go_string(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: Go would have decoded them to U+FFFD
        text = "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)
    return '"' + text.translate(_GO_STRING_ESCAPES) + '"'


def _go_float(value: float) -> str:
    """strconv.FormatFloat(v, 'f' or 'e', -1, 64) as encoding/json picks it."""
    if value != value or value - value != 0:
        raise ValueError("JSON cannot hold NaN or infinity")
    text = repr(value)
    negative = text.startswith("-")
    text = text.lstrip("-")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        mantissa, _, exponent = text.partition("e")
        if exponent.startswith("-0"):  # Go trims "e-07" to "e-7" but keeps "e+21"
            exponent = "-" + exponent[2:]
        return ("-" if negative else "") + f"{mantissa}e{exponent}"
    if "e" in text:  # repr chose exponent form where Go writes plain digits
        mantissa, _, exponent = text.partition("e")
        whole, _, fraction = mantissa.partition(".")
        digits = whole + fraction
        point = len(whole) + int(exponent)
        if point <= 0:
            text = "0." + "0" * -point + digits
        elif point >= len(digits):
            text = digits + "0" * (point - len(digits))
        else:
            text = digits[:point] + "." + digits[point:]
    elif text.endswith(".0"):
        text = text[:-2]
    return ("-" if negative else "") + text


def go_json(value: object) -> str:
    """Encode like Go's json.Marshal: compact, map keys sorted, HTML characters escaped."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(go_json(item) for item in value) + "]"
    if isinstance(value, GoStruct):
        return "{" + ",".join(f"{_go_string(k)}:{go_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(
            f"{_go_string(k)}:{go_json(value[k])}" for k in sorted(value)
        ) + "}"
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# --------------------------------------------------------------------------- addresses

_V4_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def _parse_ipv4(text: str) -> bytes | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    octets = []
    for part in parts:
        # Go rejects leading zeros (they would be octal elsewhere) and non-ASCII digits.
        if not (part.isascii() and part.isdigit()) or len(part) > 3:
            return None
        if len(part) > 1 and part[0] == "0":
            return None
        octets.append(int(part))
    if max(octets) > 255:
        return None
    return bytes(octets)


def _parse_ipv6(text: str) -> bytes | None:
    if "%" in text:  # zones are not allowed in a CIDR
        return None
    from _socket import AF_INET6, inet_pton  # only loaded when IPv6 is in use

    try:
        return inet_pton(AF_INET6, text)
    except OSError:
        return None


def parse_ip(text: str) -> bytes | None:
    """4 bytes for dotted IPv4, 16 for anything with a colon; None if invalid."""
    return _parse_ipv6(text) if ":" in text else _parse_ipv4(text)


def parse_cidr(text: str) -> tuple[bytes, int]:
    """net.ParseCIDR's address and prefix length, or ValueError like Go's."""
    address, slash, length = text.partition("/")
    raw = parse_ip(address) if slash else None
    if raw is None or not (length.isascii() and length.isdigit()) or len(length) > 3:
        raise ValueError(f"invalid CIDR address: {shown(text)}")
    prefix = int(length)
    if prefix > 8 * len(raw):
        raise ValueError(f"invalid CIDR address: {shown(text)}")
    return raw, prefix


def mask_address(raw: bytes, prefix: int) -> bytes:
    value = int.from_bytes(raw, "big")
    bits = 8 * len(raw)
    mask = ((1 << prefix) - 1) << (bits - prefix)
    return (value & mask).to_bytes(len(raw), "big")


def format_ip(raw: bytes) -> str:
    """net.IP.String(): dotted for IPv4 and IPv4-mapped, RFC 5952 for IPv6."""
    if len(raw) == 16 and raw[:12] == _V4_MAPPED_PREFIX:
        raw = raw[12:]
    if len(raw) == 4:
        return ".".join(str(octet) for octet in raw)
    groups = [int.from_bytes(raw[i:i + 2], "big") for i in range(0, 16, 2)]
    best_start, best_len, run_start = -1, 1, -1
    for i, group in enumerate([*groups, 1]):  # a sentinel closes a trailing run
        if group == 0 and run_start < 0:
            run_start = i
        elif group != 0 and run_start >= 0:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = -1
    hexes = [f"{group:x}" for group in groups]
    if best_start < 0:
        return ":".join(hexes)
    head = ":".join(hexes[:best_start])
    tail = ":".join(hexes[best_start + best_len:])
    return f"{head}::{tail}"


def format_cidr(raw: bytes, prefix: int) -> str:
    """net.IPNet.String(); an IPv4-mapped network prints as IPv4, like Go's."""
    if len(raw) == 16 and raw[:12] == _V4_MAPPED_PREFIX:
        prefix = max(prefix - 96, 0)
    return f"{format_ip(raw)}/{prefix}"


def network_of(text: str) -> tuple[str, bytes, int]:
    """The network a CIDR names, as Go's `_, n, _ := net.ParseCIDR(s); n.String()`."""
    raw, prefix = parse_cidr(text)
    net = mask_address(raw, prefix)
    return format_cidr(net, prefix), net, prefix


# --------------------------------------------------------------------------- subnet.env


class SubnetEnv:
    """What flanneld wrote to subnet.env; networks and subnets are Go-normalised CIDRs."""

    def __init__(self) -> None:
        self.networks: list[str] = []
        self.subnet: str | None = None
        self.ipv6_networks: list[str] = []
        self.ipv6_subnet: str | None = None
        self.mtu: int | None = None
        self.ipmasq: bool | None = None

    def missing(self) -> list[str]:
        names: list[str] = []
        if not self.networks and not self.ipv6_networks:
            names += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
        if self.subnet is None and self.ipv6_subnet is None:
            names += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
        if self.mtu is None:
            names.append("FLANNEL_MTU")
        if self.ipmasq is None:
            names.append("FLANNEL_IPMASQ")
        return names


def shown(text: str, limit: int = 80) -> str:
    """A value from outside as it appears in a message: control characters escaped (the
    message stays one line) and cut to `limit` characters."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in cut)
    return cut + ("..." if len(text) > limit else "")


def _network_list(key: str, value: str) -> list[str]:
    """A comma list of CIDRs, normalised and deduplicated in order (as upstream)."""
    seen: set[tuple[bytes, int]] = set()
    networks: list[str] = []
    for item in value.split(","):
        text, net, prefix = _checked_network(key, item)
        if (net, prefix) not in seen:
            seen.add((net, prefix))
            networks.append(text)
    return networks


_EXAMPLES = {"FLANNEL_NETWORK": "10.244.0.0/16", "FLANNEL_SUBNET": "10.244.1.1/24",
             "FLANNEL_IPV6_NETWORK": "2001:cafe:42::/56",
             "FLANNEL_IPV6_SUBNET": "2001:cafe:42:1::1/64"}


def _checked_network(key: str, value: str) -> tuple[str, bytes, int]:
    try:
        return network_of(value)
    except ValueError as exc:
        many = ", or a comma list of them" if key.endswith("_NETWORK") else ""
        raise ValueError(f"{key}: {exc} (expected a CIDR such as {_EXAMPLES[key]}{many})"
                         ) from None


def parse_subnet_env(data: str | bytes, path: str) -> SubnetEnv:
    """Parse subnet.env the way the upstream plugin does: one KEY=VALUE per line,
    split at the first '=', values taken verbatim, unknown keys ignored, the last
    occurrence of a key wins. Stricter than upstream where a value would otherwise be
    misread: FLANNEL_IPMASQ must be true or false, FLANNEL_MTU an MTU (68..65535).
    ValueError names the file, the key and what is expected, in one line."""
    path = shown(path, 200)
    if len(data) > MAX_SUBNET_ENV_BYTES:  # bytes as read; str only from tests
        raise ValueError(f"{path}: {len(data)} bytes is more than the limit of "
                         f"{MAX_SUBNET_ENV_BYTES} (flanneld writes about 150)")
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    env = SubnetEnv()
    for line in text.split("\n"):
        line = line.removesuffix("\r")
        key, equals, value = line.partition("=")
        known = key in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK",
                        "FLANNEL_IPV6_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ")
        if not known:
            continue
        try:
            if not equals:
                raise ValueError(f"{key}: the line has no '='")
            if key == "FLANNEL_NETWORK":
                env.networks = _network_list(key, value)
            elif key == "FLANNEL_IPV6_NETWORK":
                env.ipv6_networks = _network_list(key, value)
            elif key == "FLANNEL_SUBNET":
                env.subnet = _checked_network(key, value)[0]
            elif key == "FLANNEL_IPV6_SUBNET":
                env.ipv6_subnet = _checked_network(key, value)[0]
            elif key == "FLANNEL_MTU":
                # Upstream's strconv.ParseUint(v, 10, 32) takes ASCII digits only; an MTU
                # outside what Linux allows would only fail later in the delegate.
                if not (value.isascii() and value.isdigit() and len(value) <= 5
                        and 68 <= int(value) <= 65535):
                    raise ValueError(f"FLANNEL_MTU: expected an MTU in 68..65535, "
                                     f'got "{shown(value)}"')
                env.mtu = int(value)
            else:
                # Upstream reads anything but "true" as false, which would silently turn
                # masquerading on in the delegate; flanneld writes Go's %t.
                if value not in ("true", "false"):
                    raise ValueError(f"FLANNEL_IPMASQ: expected true or false, "
                                     f'got "{shown(value)}"')
                env.ipmasq = value == "true"
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    missing = env.missing()
    if missing:
        raise ValueError(f"{path} is missing {', '.join(missing)}")
    return env


def load_subnet_env(path: str) -> SubnetEnv:
    try:
        # Bytes, split at "\n" only (as Go's bufio.Scanner); at most one byte over the
        # limit is read, so a huge file costs nothing.
        data = read_file(path, MAX_SUBNET_ENV_BYTES + 1)
    except FileNotFoundError:
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"flanneld is not ready on this node: {path} does not exist; check the flannel "
            "pod log on this node (kubectl -n kube-flannel logs <pod> -c kube-flannel) "
            "or journalctl -u flanneld",
        ) from None
    except OSError as exc:
        raise CniError(
            ERR_IO,
            f"failed to load flannel 'subnet.env' file {path}: {exc.strerror}. "
            "Check the flannel pod log for this node.",
        ) from None
    try:
        return parse_subnet_env(data, path)
    except ValueError as exc:
        raise CniError(
            ERR_INVALID_CONFIG,
            f"loadFlannelSubnetEnv failed: {exc}; flanneld writes this file, so check "
            "that the running flanneld and this plugin belong together",
        ) from None


# --------------------------------------------------------------------------- configs


class NetConf:
    """The plugin's own network config (stdin), with upstream's defaults."""

    def __init__(self, raw: JsonObject) -> None:
        self.raw = raw
        self.cni_version = _optional_str(raw, "cniVersion", "")
        self.name = _optional_str(raw, "name", "")
        self.subnet_file = _optional_str(raw, "subnetFile", DEFAULT_SUBNET_FILE)
        self.data_dir = _optional_str(raw, "dataDir", DEFAULT_DATA_DIR)
        self.delegate = _optional_object(raw, "delegate")
        self.ipam = _optional_object(raw, "ipam")
        self.runtime_config = _optional_object(raw, "runtimeConfig")
        if not self.subnet_file or not self.data_dir:
            # An empty dataDir would make the saved config land in the working directory.
            raise CniError(ERR_INVALID_CONFIG, "subnetFile and dataDir must not be empty")
        for key, path in (("subnetFile", self.subnet_file), ("dataDir", self.data_dir)):
            if "\0" in path:  # no file name can hold one; open() would raise ValueError
                raise CniError(ERR_INVALID_CONFIG, f"failed to load netconf: {key!r} must be "
                               f"a path without NUL characters, got \"{shown(path)}\"")


def _optional_str(raw: JsonObject, key: str, default: str) -> str:
    value = raw.get(key)
    if value is None:  # absent or null: Go leaves the default in place
        return default
    if not isinstance(value, str):
        raise CniError(ERR_DECODING, f"failed to load netconf: {key!r} must be a string")
    return value


def _optional_object(raw: JsonObject, key: str) -> JsonObject | None:
    value = raw.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise CniError(ERR_DECODING, f"failed to load netconf: {key!r} must be an object")


def load_netconf(stdin: bytes) -> NetConf:
    try:
        raw = load_json(stdin)
    except ValueError as exc:
        raise CniError(ERR_DECODING, f"failed to load netconf from stdin: {exc}") from None
    if not isinstance(raw, dict):
        raise CniError(ERR_DECODING, "failed to load netconf: the config is not a JSON object")
    return NetConf(raw)


def validate_delegate(delegate: JsonObject) -> None:
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CniError(ERR_INVALID_CONFIG,
                       "'delegate' dictionary, if present, must have (string) 'type' field")
    if "name" in delegate:
        raise CniError(ERR_INVALID_CONFIG,
                       "'delegate' dictionary must not have 'name' field, it'll be set by flannel")
    if "ipam" in delegate:
        raise CniError(ERR_INVALID_CONFIG,
                       "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel")


_ROUTE_INT_FIELDS = ("mtu", "advmss", "priority")


def _parse_route(index: int, item: object) -> GoStruct:
    """One ipam.routes entry as libcni's types.Route re-marshals it: known fields in
    struct order, zero values omitted, unknown keys dropped, dst keeps its host bits."""
    where = f"failed to parse ipam.routes[{index}]"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: not an object")
    dst = item.get("dst")
    if not isinstance(dst, str):
        raise ValueError(f"{where}: 'dst' must be a CIDR string")
    raw, prefix = parse_cidr(dst)
    route = GoStruct(dst=format_cidr(raw, prefix))
    gateway = item.get("gw")
    if gateway not in (None, ""):
        gateway_raw = parse_ip(gateway) if isinstance(gateway, str) else None
        if gateway_raw is None:
            raise ValueError(f"{where}: invalid 'gw' {gateway!r}")
        route["gw"] = format_ip(gateway_raw)
    for field in (*_ROUTE_INT_FIELDS, "table", "scope"):
        value = item.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {field!r} must be an integer")
        if value != 0 or field in ("table", "scope"):  # *int fields keep an explicit 0
            route[field] = value
    return route


def build_ipam(netconf: NetConf, env: SubnetEnv) -> JsonObject:
    ipam: JsonObject = dict(netconf.ipam or {})
    ipam.setdefault("type", DEFAULT_IPAM)
    ranges: list[list[JsonObject]] = []
    if env.subnet is not None:
        ranges.append([{"subnet": env.subnet}])
    if env.ipv6_subnet is not None:
        ranges.append([{"subnet": env.ipv6_subnet}])
    ipam["ranges"] = ranges
    routes: list[JsonObject] = []
    if "routes" in ipam and ipam["routes"] is not None:
        given = ipam["routes"]
        if not isinstance(given, list):
            raise CniError(ERR_INVALID_CONFIG, "failed to assemble Delegate IPAM: failed to "
                           "read IPAM routes: ipam.routes must be a list")
        try:
            routes = [_parse_route(i, item) for i, item in enumerate(given)]
        except ValueError as exc:
            raise CniError(ERR_INVALID_CONFIG, "failed to assemble Delegate IPAM: failed to "
                           f"read IPAM routes: {exc}") from None
    routes += [GoStruct(dst=network) for network in (*env.networks, *env.ipv6_networks)]
    ipam["routes"] = routes
    return ipam


def build_delegate(netconf: NetConf, env: SubnetEnv) -> JsonObject:
    """The config flannel hands to its delegate; go_json() of it is byte-identical to
    what the Go plugin saves and sends."""
    delegate: JsonObject = dict(netconf.delegate or {})
    validate_delegate(delegate)
    if netconf.runtime_config is not None:
        delegate["runtimeConfig"] = netconf.runtime_config
    delegate["name"] = netconf.name
    delegate.setdefault("type", DEFAULT_DELEGATE)
    if "ipMasq" not in delegate:
        # If flanneld does not masquerade, the delegate should.
        delegate["ipMasq"] = not env.ipmasq
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if netconf.cni_version:
        delegate["cniVersion"] = netconf.cni_version
    delegate["ipam"] = build_ipam(netconf, env)
    return delegate


_MAX_DIFFERENCES = 10  # listed in CHECK's message; the rest are counted


def describe_differences(saved: object, now: object, path: str = "") -> list[str]:
    """Human-readable differences between two JSON values, one line per leaf."""
    if isinstance(saved, dict) and isinstance(now, dict):
        lines: list[str] = []
        for key in sorted(set(saved) | set(now)):
            where = f"{path}.{shown(key, 40)}" if path else shown(key, 40)
            if key not in now:
                lines.append(f"{where}: saved {shown(go_json(saved[key]), 200)}, now absent")
            elif key not in saved:
                lines.append(f"{where}: not saved, now {shown(go_json(now[key]), 200)}")
            else:
                lines += describe_differences(saved[key], now[key], where)
        return lines
    if saved == now and type(saved) is type(now):
        return []
    if isinstance(saved, int | float) and isinstance(now, int | float) and saved == now:
        return []  # 1450 vs 1450.0: Go does not tell them apart either
    return [f"{path or '<config>'}: saved {shown(go_json(saved), 200)}, "
            f"now {shown(go_json(now), 200)}"]


# --------------------------------------------------------------------------- saved configs


def join_path(directory: str, name: str) -> str:
    """os.path.join for a `name` without slashes (container IDs and plugin names are
    checked to have none)."""
    return directory + name if not directory or directory.endswith("/") else \
        f"{directory}/{name}"


def read_fd(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`, until its end (posix, not io: see _json_module)."""
    chunks = []
    left = limit
    while left > 0 and (chunk := posix.read(fd, min(left, 65536))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_file(path: str, limit: int) -> bytes:
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        return read_fd(fd, limit)
    finally:
        posix.close(fd)


def write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[posix.write(fd, view):]


def log(text: str) -> None:
    """To stderr: sys.stderr when there is one (not under the image's launcher)."""
    if sys.stderr is not None:
        sys.stderr.write(text)
        sys.stderr.flush()
    else:
        write_fd(2, text.encode("utf-8", "replace"))


def make_dirs(path: str, mode: int) -> None:
    """os.makedirs(path, mode, exist_ok=True): parents get the default mode (as os's do
    since 3.7); FileExistsError if `path` is no directory."""
    try:
        posix.mkdir(path, mode)
    except FileNotFoundError:
        parent = path.rstrip("/").rpartition("/")[0]
        if not parent or parent == path:
            raise
        make_dirs(parent, 0o777)  # less the umask
        make_dirs(path, mode)  # not mkdir: a concurrent ADD may have made it meanwhile
    except FileExistsError:
        if not is_directory(path):
            raise


def _file_type(path: str) -> int:
    try:
        return posix.stat(path).st_mode & 0o170000  # S_IFMT, without the `stat` module
    except (OSError, ValueError):
        return 0


def is_directory(path: str) -> bool:
    return _file_type(path) == 0o040000  # S_IFDIR


def is_file(path: str) -> bool:
    return _file_type(path) == 0o100000  # S_IFREG


def environment() -> dict[str, str]:
    """os.environ as a dict: Linux's file system encoding, undecodable bytes kept."""
    return {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
            for key, value in posix.environ.items()}


def saved_config_path(data_dir: str, container_id: str) -> str:
    return join_path(data_dir, container_id)


def save_config(data_dir: str, container_id: str, content: bytes) -> None:
    """Write <dataDir>/<containerID> (dir 0700, file 0600) durably before delegating,
    so that DEL can always undo what ADD started."""
    make_dirs(data_dir, 0o700)
    path = saved_config_path(data_dir, container_id)
    # Container IDs never start with '.', so the temp name cannot be another container's.
    temp = saved_config_path(data_dir, f".{container_id}.tmp")
    flags = posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC | posix.O_CLOEXEC | posix.O_NOFOLLOW
    fd = posix.open(temp, flags, 0o600)
    try:
        view = memoryview(content)
        while view:
            view = view[posix.write(fd, view):]
        posix.fsync(fd)
    finally:
        posix.close(fd)
    posix.rename(temp, path)


def read_saved_config(data_dir: str, container_id: str) -> bytes | None:
    try:
        # One byte over the limit is enough for load_json to refuse it.
        return read_file(saved_config_path(data_dir, container_id), MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CniError(ERR_IO, f"cannot read the saved config for {container_id}: {exc}") from None


# --------------------------------------------------------------------------- delegating


def find_plugin(plugin: str, cni_path: str) -> str:
    if not plugin or "/" in plugin or plugin in (".", ".."):
        raise CniError(ERR_INVALID_CONFIG, f"invalid plugin name: {plugin!r}")
    dirs = [d for d in cni_path.split(":") if d]
    for directory in dirs:
        candidate = join_path(directory, plugin)
        if is_file(candidate):
            return candidate
    raise CniError(ERR_INVALID_CONFIG, f"failed to find plugin {plugin!r} in path {dirs}")


class Delegate:
    """A delegate plugin run with our stderr and CNI_COMMAND=`command`, started before
    its config is ready so that its start-up (the Go runtime's own, a few ms) overlaps
    with ours: ADD's config save and fsync. A plugin reads all of stdin before it acts,
    so nothing happens until finish() writes the config and closes the pipe; abandon()
    kills it before that (as does our own death, which closes the pipe empty)."""

    def __init__(self, command: str, plugin: str, environ: "Mapping[str, str]") -> None:
        self.command = command
        self.plugin = plugin
        path = find_plugin(plugin, environ.get("CNI_PATH", ""))
        env = dict(environ)
        env["CNI_COMMAND"] = command
        # posix.pipe() fds are close-on-exec: the plugin gets only the two dup2()ed ends.
        in_read, self._stdin = posix.pipe()
        self._stdout, out_write = posix.pipe()
        try:
            # posix_spawn is vfork+exec: no copy of our memory, no Python in the child.
            self.pid = posix.posix_spawn(path, [path], env, file_actions=[
                (posix.POSIX_SPAWN_DUP2, in_read, 0),
                (posix.POSIX_SPAWN_DUP2, out_write, 1),
            ])
        except OSError as exc:
            posix.close(self._stdin)
            posix.close(self._stdout)
            raise CniError(ERR_INTERNAL, f"cannot run {path}: {exc.strerror}") from None
        finally:
            posix.close(in_read)
            posix.close(out_write)

    def abandon(self) -> None:
        """Stop the plugin before it was given a config (it has done nothing)."""
        posix.close(self._stdin)
        posix.close(self._stdout)
        posix.kill(self.pid, 9)  # SIGKILL; the `signal` module would cost an import of enum
        posix.waitpid(self.pid, 0)

    def finish(self, config: bytes) -> bytes:
        """Give the plugin its config; return its stdout, or raise its own CNI error,
        prefixed with what we did."""
        # A config is far below the 64 KiB pipe buffer and plugins read all of stdin
        # before writing, so writing first and reading after cannot deadlock.
        try:
            view = memoryview(config)
            while view:
                view = view[posix.write(self._stdin, view):]
        except BrokenPipeError:
            pass  # the plugin exited without reading; its status says why
        finally:
            posix.close(self._stdin)
        chunks = []
        # EOF comes when the plugin exits (with anything it handed its stdout to), as
        # libcni's exec waits too; waitpid then returns at once.
        while chunk := posix.read(self._stdout, 65536):
            chunks.append(chunk)
        posix.close(self._stdout)
        _, wait_status = posix.waitpid(self.pid, 0)
        status = posix.waitstatus_to_exitcode(wait_status)
        output = b"".join(chunks)
        if status == 0:
            return output
        action = f"failed to delegate {self.command.lower()}"
        try:
            error = load_json(output)
        except ValueError:
            error = None
        if isinstance(error, dict) and isinstance(error.get("msg"), str):
            code = error.get("code")
            details = error.get("details")
            raise CniError(code if isinstance(code, int) and code > 0 else ERR_INTERNAL,
                           f"{action}: {self.plugin}: {error['msg']}",
                           details if isinstance(details, str) else "")
        text = output.decode("utf-8", "replace").strip()
        raise CniError(ERR_INTERNAL, f"{action}: {self.plugin} exited with status {status}"
                       + (f": {text}" if text else ""))


def delegate(command: str, plugin: str, config: bytes, environ: "Mapping[str, str]") -> bytes:
    """Run the delegate with `config`; its stdout, or its CNI error raised."""
    return Delegate(command, plugin, environ).finish(config)


# --------------------------------------------------------------------------- commands


class Invocation:
    """One plugin run: the CNI_* variables and the stdin config."""

    def __init__(self, environ: "Mapping[str, str]", stdin: bytes) -> None:
        self.environ = environ
        self.stdin = stdin
        self.command = environ.get("CNI_COMMAND", "")
        self.container_id = environ.get("CNI_CONTAINERID", "")
        self.netns = environ.get("CNI_NETNS", "")
        self.ifname = environ.get("CNI_IFNAME", "")


def cmd_add(call: Invocation, netconf: NetConf) -> bytes:
    env = load_subnet_env(netconf.subnet_file)
    config = build_delegate(netconf, env)
    rendered = go_json(config).encode("utf-8")
    log("delegateAdd: netconf sent to delegate plugin:\n" + rendered.decode("utf-8") + "\n")
    running = Delegate("ADD", str(config["type"]), call.environ)
    try:
        save_config(netconf.data_dir, call.container_id, rendered)
    except OSError as exc:
        running.abandon()
        raise CniError(ERR_IO, f"cannot save the delegate config in {netconf.data_dir}: "
                       f"{exc.strerror}") from None
    except BaseException:
        running.abandon()
        raise
    # Saved (durably) before the delegate acts: DEL can always undo what ADD started.
    return running.finish(rendered)


def cmd_del(call: Invocation, netconf: NetConf) -> bytes:
    saved = read_saved_config(netconf.data_dir, call.container_id)
    if saved is None:
        return b""  # never added here, or already deleted: DEL must succeed
    try:
        parsed = load_json(saved)
        if not isinstance(parsed, dict) or not isinstance(parsed.get("type"), str):
            raise ValueError("no string 'type'")
    except ValueError as exc:
        # As upstream: nothing can be undone without the config; keep the file for a human.
        log(f"failed to parse netconf: {exc}\n")
        return b""
    delegate("DEL", str(parsed["type"]), saved, call.environ)
    # Only now: if the delegate failed, the next DEL retry still has the config.
    try:
        posix.unlink(saved_config_path(netconf.data_dir, call.container_id))
    except FileNotFoundError:
        return b""  # a concurrent DEL removed it first
    return b""


def cmd_check(call: Invocation, netconf: NetConf) -> bytes:
    if "prevResult" not in netconf.raw:
        raise CniError(ERR_INVALID_CONFIG, "CHECK needs prevResult (the ADD result) in the config")
    env = load_subnet_env(netconf.subnet_file)
    expected = build_delegate(netconf, env)
    saved = read_saved_config(netconf.data_dir, call.container_id)
    saved_path = saved_config_path(netconf.data_dir, call.container_id)
    if saved is None:
        raise CniError(ERR_UNKNOWN_CONTAINER,
                       f"no saved config for container {call.container_id} at {saved_path}: "
                       "ADD did not run on this node or DEL already removed it")
    try:
        saved_config = load_json(saved)
    except ValueError as exc:
        raise CniError(ERR_DECODING, f"the saved config {saved_path} is not JSON: {exc}") from None
    if not isinstance(saved_config, dict):
        raise CniError(ERR_DECODING, f"the saved config {saved_path} is not a JSON object")
    differences = describe_differences(saved_config, expected)
    if differences:
        raise CniError(
            ERR_CONFIG_CHANGED,
            f"the pod's network config differs from what {shown(netconf.subnet_file)} gives "
            "now: " + "; ".join(differences[:_MAX_DIFFERENCES])
            + (f"; and {len(differences) - _MAX_DIFFERENCES} more"
               if len(differences) > _MAX_DIFFERENCES else "")
            + ". The pod was set up by an earlier flanneld configuration; recreate it",
            details=f"saved config: {saved_path}",
        )
    checked = dict(saved_config)
    checked["prevResult"] = with_route_gateways(netconf.raw["prevResult"])
    delegate("CHECK", str(saved_config["type"]), go_json(checked).encode("utf-8"),
             call.environ)
    return b""


def with_route_gateways(prev_result: object) -> object:
    """prevResult with each gateway-less route given the gateway the delegate used.

    flannel's routes have no `gw`; the delegate installs them via the interface's
    gateway of the same family (ipam.ConfigureIface). containernetworking/plugins
    before 1.3.0 then CHECKed for a route *without* a gateway and always failed
    (plugins#886, fixed by #887). Spelling the gateway out is what the kernel holds,
    so newer plugins check exactly the same thing, only more strictly."""
    if not isinstance(prev_result, dict):
        return prev_result
    routes, ips = prev_result.get("routes"), prev_result.get("ips")
    if not isinstance(routes, list) or not isinstance(ips, list):
        return prev_result
    gateways: dict[bool, str] = {}  # keyed by "is IPv6"
    for ip in ips:
        gateway = ip.get("gateway") if isinstance(ip, dict) else None
        if isinstance(gateway, str) and gateway:
            gateways.setdefault(":" in gateway, gateway)
    completed: list[object] = []
    for route in routes:
        if isinstance(route, dict) and not route.get("gw") and isinstance(route.get("dst"), str):
            gateway = gateways.get(":" in route["dst"])
            if gateway is not None:
                route = {**route, "gw": gateway}
        completed.append(route)
    return {**prev_result, "routes": completed}


def cmd_status(call: Invocation, netconf: NetConf) -> bytes:
    try:
        load_subnet_env(netconf.subnet_file)
    except CniError as exc:
        raise CniError(ERR_PLUGIN_NOT_AVAILABLE, exc.msg) from None
    return b""


def cmd_gc(call: Invocation, netconf: NetConf) -> bytes:
    return b""  # as upstream: nothing to collect beyond what DEL removes


def version_info(stdin: bytes) -> bytes:
    """VERSION answers in the version the runtime asked in, if it is one we speak."""
    asked: object = None
    try:
        config = load_json(stdin) if stdin.strip() else None
        asked = config.get("cniVersion") if isinstance(config, dict) else None
    except ValueError:
        pass
    version = asked if isinstance(asked, str) and asked in SUPPORTED_VERSIONS else LATEST_VERSION
    return go_json(GoStruct(cniVersion=version,
                            supportedVersions=list(SUPPORTED_VERSIONS))).encode("utf-8")


# CNI_NETNS is optional for DEL (the namespace may be gone) and absent for GC/STATUS.
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
}
_COMMANDS: "dict[str, Callable[[Invocation, NetConf], bytes]]" = {
    "ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status, "GC": cmd_gc,
}
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def validate_environment(call: Invocation) -> None:
    missing = [name for name in _REQUIRED_ENV[call.command] if not call.environ.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")
    if "CNI_CONTAINERID" in _REQUIRED_ENV[call.command]:
        cid = call.container_id
        # The ID becomes a file name in dataDir: this rule (libcni's) keeps it inside.
        if not (cid[0].isascii() and cid[0].isalnum()) or not _ID_CHARS.issuperset(cid):
            raise CniError(ERR_INVALID_ENV, "invalid characters in containerID", shown(cid))
        if len(cid) > MAX_CONTAINER_ID:
            raise CniError(ERR_INVALID_ENV, f"containerID is longer than {MAX_CONTAINER_ID} "
                           "characters", shown(cid))
    if "CNI_IFNAME" in _REQUIRED_ENV[call.command]:
        name = call.ifname
        if len(name) > 15:
            raise CniError(ERR_INVALID_ENV, "interface name is too long", shown(name))
        if name in (".", "..") or any(ch in "/:" or ch.isspace() for ch in name):
            raise CniError(ERR_INVALID_ENV,
                           "interface name contains / or : or whitespace characters",
                           shown(name))


def check_version(command: str, netconf: NetConf) -> None:
    version = netconf.cni_version or "0.1.0"  # libcni's reading of an absent cniVersion
    if version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}")
    if command == "CHECK" and version in VERSIONS_WITHOUT_CHECK:
        raise CniError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK")
    if command in ("GC", "STATUS") and version != "1.1.0":
        raise CniError(ERR_INCOMPATIBLE_VERSION, f"config version does not allow {command}")


def run(environ: "Mapping[str, str]", stdin: bytes) -> tuple[int, bytes]:
    """Execute one invocation; return (exit status, stdout bytes)."""
    call = Invocation(environ, stdin)
    if not call.command:
        log(f"CNI Plugin flannel version v{PLUGIN_VERSION} (pyflannel)\n"
            f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
        return 0, b""
    version = ""
    try:
        if call.command == "VERSION":
            return 0, version_info(stdin)
        if call.command not in _COMMANDS:
            raise CniError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {shown(call.command)}")
        validate_environment(call)
        netconf = load_netconf(stdin)
        version = netconf.cni_version
        check_version(call.command, netconf)
        return 0, _COMMANDS[call.command](call, netconf)
    except CniError as exc:
        return 1, error_result(version, exc)
    except Exception as exc:  # a bug of ours: still a CNI error, never a traceback
        return 1, error_result(version, CniError(
            ERR_INTERNAL, f"internal error in the flannel plugin: {type(exc).__name__}: "
                          f"{shown(str(exc), 200)}"))


def error_result(version: str, exc: CniError) -> bytes:
    """The CNI error object (SPEC.md "Error"), in the config's version when we know it."""
    error = GoStruct(cniVersion=version if version in SUPPORTED_VERSIONS else LATEST_VERSION,
                     code=exc.code, msg=exc.msg)
    if exc.details:
        error["details"] = exc.details
    return go_json(error).encode("utf-8")


def main() -> int:
    # One byte over the limit is enough to refuse the config; never read more.
    status, output = run(environment(), read_fd(0, MAX_CONFIG_BYTES + 1))
    if output:
        write_fd(1, output)
    return status


def run_and_exit() -> None:
    """main(), then exit without the interpreter's shutdown (freeing every object and
    module, a millisecond or more that nobody waits for usefully): all output is flushed
    and every file we wrote is closed by then."""
    status = main()
    if sys.stderr is not None:
        sys.stderr.flush()
    posix._exit(status)


if __name__ == "__main__":
    run_and_exit()
