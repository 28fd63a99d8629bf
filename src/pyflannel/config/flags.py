"""flanneld's command line flags and their `FLANNELD_*` environment equivalents.

The parser follows Go's `flag` package, which upstream flanneld uses on a private
FlagSet, rather than argparse conventions:

* `-name` and `--name` are the same; `-name=value` and `-name value` for flags that
  take a value; a bool only takes its value with `=` (`-ip-masq false` is the flag
  followed by a positional argument);
* bools accept what Go's `strconv.ParseBool` accepts;
* ints accept what `strconv.ParseInt(s, 0, 64)` accepts (`0x10`, `0o17`, `017`, `1_000`);
* `--` ends the flags; the first non-flag argument ends them too. flanneld takes no
  positional arguments, so anything left over is an error here.

Afterwards every flag that was not given on the command line may be set from
`FLANNELD_<NAME upper-cased, '-' → '_'>` (coreos/pkg `flagutil.SetFlagsFromEnv`):
empty values are ignored, the command line wins, and a repeatable flag gets exactly
one value from the environment (no comma splitting).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

FlagKind = Literal["string", "bool", "int", "list", "level"]

ENV_PREFIX = "FLANNELD"

_INT32_MIN = -(1 << 31)
_INT32_MAX = (1 << 31) - 1


class ConfigError(Exception):
    """A configuration value is wrong. `str()` is one line naming the flag or field."""

    def __init__(self, message: str) -> None:
        # Log lines and exit messages must stay on one line, whatever the cause says.
        super().__init__(" ".join(message.split()))


class HelpRequested(ConfigError):
    """`-h`, `-help` or `--help` was given: print `help_text()` and exit 0 (like Go's ErrHelp)."""

    def __init__(self) -> None:
        super().__init__("help requested")


@dataclass(frozen=True)
class FlagSpec:
    """One flanneld flag: its name (without dashes), value kind, default and help text."""

    name: str
    kind: FlagKind
    default: str | bool | int | tuple[str, ...]
    help: str
    # False for flags the environment cannot set (upstream reads --version before the env).
    from_env: bool = True

    @property
    def env_name(self) -> str:
        return f"{ENV_PREFIX}_{self.name.upper().replace('-', '_')}"

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


DEFAULT_ETCD_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"

FLAG_SPECS: tuple[FlagSpec, ...] = (
    FlagSpec("etcd-endpoints", "string", DEFAULT_ETCD_ENDPOINTS,
             "a comma-separated list of etcd endpoints"),
    FlagSpec("etcd-prefix", "string", "/coreos.com/network", "etcd key prefix of the network"),
    FlagSpec("etcd-keyfile", "string", "",
             "TLS key file for etcd (TLS needs keyfile and certfile)"),
    FlagSpec("etcd-certfile", "string", "", "TLS certificate file for etcd"),
    FlagSpec("etcd-cafile", "string", "", "CA bundle used to verify etcd's certificate"),
    FlagSpec("etcd-username", "string", "", "user name for etcd authentication"),
    FlagSpec("etcd-password", "string", "", "password for etcd authentication"),
    FlagSpec("kube-subnet-mgr", "bool", False,
             "take subnets from the Kubernetes API (node podCIDRs) instead of etcd"),
    FlagSpec("kube-api-url", "string", "",
             "Kubernetes API server URL; not needed when running in a pod"),
    FlagSpec("kubeconfig-file", "string", "",
             "kubeconfig file; not needed when running in a pod"),
    FlagSpec("kube-annotation-prefix", "string", "flannel.alpha.coreos.com",
             "prefix of the node annotations flannel writes"),
    FlagSpec("iface", "list", (),
             "interface (name or IP) for traffic between hosts; repeat to try several in order"),
    FlagSpec("iface-regex", "list", (),
             "regex matched against interface IPs, then names; repeatable, tried after --iface"),
    FlagSpec("iface-can-reach", "string", "",
             "use the interface the kernel would route this IP through"),
    FlagSpec("public-ip", "string", "", "IPv4 address other nodes use to reach this node"),
    FlagSpec("public-ipv6", "string", "", "IPv6 address other nodes use to reach this node"),
    FlagSpec("subnet-file", "string", "/run/flannel/subnet.env",
             "file the subnet, MTU and masquerade settings are written to"),
    FlagSpec("subnet-lease-renew-margin", "int", 60,
             "renew the lease this many minutes before it expires (1 to 1439)"),
    FlagSpec("ip-masq", "bool", False,
             "masquerade traffic leaving the overlay network"),
    FlagSpec("ip-masq-fully-random-disable", "bool", False,
             "do not use fully random source ports in the masquerade rules"),
    FlagSpec("healthz-ip", "string", "0.0.0.0", "address the health server listens on"),
    FlagSpec("healthz-port", "int", 0, "port the health server listens on (0 disables it)"),
    FlagSpec("iptables-resync", "int", 5,
             "seconds between checks of the firewall rules (and blackhole routes)"),
    FlagSpec("iptables-forward-rules", "bool", True,
             "add ACCEPT rules for the pod network to the FORWARD chain"),
    FlagSpec("ip-blackhole-route", "bool", False,
             "keep a blackhole route for this node's own subnet"),
    FlagSpec("net-config-path", "string", "/etc/kube-flannel/net-conf.json",
             "network configuration file (kube subnet manager only)"),
    FlagSpec("set-node-network-unavailable", "bool", True,
             "clear the node's NetworkUnavailable condition once ready (kube subnet manager only)"),
    FlagSpec("version", "bool", False, "print the version and exit", from_env=False),
    FlagSpec("v", "level", 0, "log level verbosity"),
    FlagSpec("vmodule", "string", "",
             "comma-separated list of pattern=N settings for file-filtered logging"),
    FlagSpec("log_backtrace_at", "string", "",
             "when logging hits line file:N, emit a stack trace"),
)

_SPECS_BY_NAME: dict[str, FlagSpec] = {spec.name: spec for spec in FLAG_SPECS}


@dataclass(frozen=True)
class Flags:
    """The parsed flanneld flags. Field names are the flag names with '-' → '_'."""

    etcd_endpoints: tuple[str, ...] = tuple(DEFAULT_ETCD_ENDPOINTS.split(","))
    etcd_prefix: str = "/coreos.com/network"
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    kube_subnet_mgr: bool = False
    kube_api_url: str = ""
    kubeconfig_file: str = ""
    kube_annotation_prefix: str = "flannel.alpha.coreos.com"
    iface: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    subnet_lease_renew_margin: int = 60
    ip_masq: bool = False
    ip_masq_fully_random_disable: bool = False
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    iptables_resync: int = 5
    iptables_forward_rules: bool = True
    ip_blackhole_route: bool = False
    net_config_path: str = "/etc/kube-flannel/net-conf.json"
    set_node_network_unavailable: bool = True
    version: bool = False
    v: int = 0
    vmodule: str = ""
    log_backtrace_at: str = ""

    def redacted(self) -> str:
        """The flags for the "CLI flags config:" log line, in Go's `%+v` style.

        Unlike upstream, the etcd password is never logged in clear text.
        """
        parts: list[str] = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "etcd_password" and value:
                text = "<redacted>"
            elif isinstance(value, tuple):
                text = "[" + " ".join(value) + "]"
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            parts.append(f"{field.name}:{text}")
        return "{" + " ".join(parts) + "}"


# --- value parsers (Go strconv semantics) -------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "false", "FALSE", "False"})


def parse_go_bool(text: str) -> bool:
    """`strconv.ParseBool`: raises ValueError for anything else (e.g. "yes", "on", " true")."""
    if text in _GO_TRUE:
        return True
    if text in _GO_FALSE:
        return False
    raise ValueError(text)


def _go_underscore_ok(text: str) -> bool:
    """Go's `underscoreOK`: '_' only between digits, or between a base prefix and a digit."""
    body = text[1:] if text[:1] in ("+", "-") else text
    saw = "^"
    i = 0
    hex_digits = False
    if len(body) >= 2 and body[0] == "0" and body[1].lower() in "box":
        i, saw, hex_digits = 2, "0", body[1].lower() == "x"
    for ch in body[i:]:
        if "0" <= ch <= "9" or hex_digits and "a" <= ch.lower() <= "f":
            saw = "0"
        elif ch == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def parse_go_int(text: str, *, base0: bool = True, bits: int = 64) -> int:
    """`strconv.ParseInt(text, 0, bits)` (or base 10 when not `base0`); ValueError on failure."""
    body = text
    negative = False
    if body[:1] in ("+", "-"):
        negative = body[0] == "-"
        body = body[1:]
    if not body:
        raise ValueError(text)
    base = 10
    if base0 and body[0] == "0":
        if len(body) >= 3 and body[1].lower() in "box":
            base = {"b": 2, "o": 8, "x": 16}[body[1].lower()]
            body = body[2:]
        else:
            base = 8
            body = body[1:]
    value = 0
    underscores = False
    for ch in body:
        if ch == "_" and base0:
            underscores = True
            continue
        if "0" <= ch <= "9":
            digit = ord(ch) - ord("0")
        elif "a" <= ch.lower() <= "z":
            digit = ord(ch.lower()) - ord("a") + 10
        else:
            raise ValueError(text)
        if digit >= base:
            raise ValueError(text)
        value = value * base + digit
    if underscores and not _go_underscore_ok(text):
        raise ValueError(text)
    if negative:
        value = -value
    if not -(1 << (bits - 1)) <= value <= (1 << (bits - 1)) - 1:
        raise ValueError(text)
    return value


def _invalid(value: str, flag: str, expected: str) -> ConfigError:
    return ConfigError(f'invalid value "{value}" for flag -{flag}: {expected}')


def _convert(spec: FlagSpec, value: str) -> str | bool | int:
    """Turn one textual value into the flag's type; ValueError carries what was expected."""
    if spec.kind == "bool":
        try:
            return parse_go_bool(value)
        except ValueError:
            raise ValueError("expected a boolean (1, 0, t, f, true, false)") from None
    if spec.kind in ("int", "level"):
        try:
            # klog's Level.Set (-v) is ParseInt(value, 10, 32); flag's Int is base 0, 64 bit.
            if spec.kind == "level":
                return parse_go_int(value, base0=False, bits=32)
            return parse_go_int(value)
        except ValueError:
            raise ValueError("expected an integer") from None
    return value


# --- the parser ------------------------------------------------------------------------


def _split_flag(arg: str) -> tuple[str, str | None] | None:
    """`-name[=value]` / `--name[=value]` → (name, value); None when `arg` is not a flag."""
    if len(arg) < 2 or arg[0] != "-":
        return None
    dashes = 2 if arg[1] == "-" else 1
    body = arg[dashes:]
    if not body or body[0] in "-=":
        raise ConfigError(f"bad flag syntax: {arg}")
    name, eq, value = body.partition("=")
    return name, (value if eq else None)


def _scan_argv(argv: Sequence[str]) -> list[tuple[FlagSpec, str]]:
    """The (flag, raw value) pairs of the command line, in order."""
    given: list[tuple[FlagSpec, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            if i < len(argv):
                raise ConfigError(f'unexpected positional argument "{argv[i]}": '
                                  "flanneld takes only flags")
            break
        split = _split_flag(arg)
        if split is None:
            raise ConfigError(f'unexpected positional argument "{arg}": flanneld takes only flags')
        name, value = split
        spec = _SPECS_BY_NAME.get(name)
        if spec is None:
            if name in ("h", "help"):
                raise HelpRequested()
            raise ConfigError(f"flag provided but not defined: -{name}")
        if value is None:
            if spec.kind == "bool":
                value = "true"
            elif i < len(argv):
                value = argv[i]
                i += 1
            else:
                raise ConfigError(f"flag needs an argument: -{name}")
        given.append((spec, value))
    return given


def parse_flags(argv: Sequence[str], env: Mapping[str, str]) -> Flags:
    """Parse flanneld's command line (without the program name), then the environment.

    Raises ConfigError (one line) for unknown flags, bad values, positional
    arguments and failed validation; HelpRequested for `-h`/`-help`.
    """
    values: dict[str, str | bool | int | tuple[str, ...]] = {}
    for spec, raw in _scan_argv(argv):
        try:
            converted = _convert(spec, raw)
        except ValueError as exc:
            raise _invalid(raw, spec.name, str(exc)) from None
        if spec.kind == "list":
            previous = values.get(spec.attr, ())
            assert isinstance(previous, tuple)
            values[spec.attr] = (*previous, raw)
        else:
            values[spec.attr] = converted

    for spec in FLAG_SPECS:
        if not spec.from_env or spec.attr in values:
            continue
        raw = env.get(spec.env_name, "")
        if raw == "":
            continue
        try:
            converted = _convert(spec, raw)
        except ValueError as exc:
            raise ConfigError(f'invalid value "{raw}" for {spec.env_name} '
                              f"(flag -{spec.name}): {exc}") from None
        values[spec.attr] = (raw,) if spec.kind == "list" else converted

    endpoints = values.pop("etcd_endpoints", DEFAULT_ETCD_ENDPOINTS)
    assert isinstance(endpoints, str)
    flags = Flags(etcd_endpoints=tuple(endpoints.split(",")), **values)  # type: ignore[arg-type]
    _validate(flags)
    return flags


# --- validation ------------------------------------------------------------------------


def _check_ip(value: str, flag: str, version: int) -> None:
    if not value:
        return
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        addr = None
    # Go's net.ParseIP knows no zones ("fe80::1%eth0").
    if addr is None or addr.version != version or "%" in value:
        raise _invalid(value, flag, f"expected an IPv{version} address")


_VMODULE_ITEM = re.compile(r"[^=]+=[+-]?[0-9]+")


def _validate(flags: Flags) -> None:
    margin = flags.subnet_lease_renew_margin
    if not 1 <= margin <= 1439:
        raise ConfigError("Invalid subnet-lease-renew-margin option, out of acceptable range: "
                          f"{margin} (expected 1..1439 minutes)")
    if flags.iptables_resync < 1:
        raise _invalid(str(flags.iptables_resync), "iptables-resync",
                       "expected an integer >= 1 (seconds)")
    if not 0 <= flags.healthz_port <= 65535:
        raise _invalid(str(flags.healthz_port), "healthz-port", "expected a port in 0..65535")
    _check_ip(flags.public_ip, "public-ip", 4)
    _check_ip(flags.public_ipv6, "public-ipv6", 6)
    for pattern in flags.iface_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _invalid(pattern, "iface-regex",
                           f"expected a valid regular expression ({exc})") from None
    # klog rejects malformed -vmodule / -log_backtrace_at values when they are set.
    if flags.vmodule:
        for item in flags.vmodule.split(","):
            if not _VMODULE_ITEM.fullmatch(item) or not _fits_int32(item.rsplit("=", 1)[1]):
                raise _invalid(flags.vmodule, "vmodule",
                               "expected a comma-separated list of pattern=N")
    if flags.log_backtrace_at:
        file, colon, line = flags.log_backtrace_at.rpartition(":")
        if not colon or not file or not line.isdigit():
            raise _invalid(flags.log_backtrace_at, "log_backtrace_at", "expected file.go:234")


def _fits_int32(text: str) -> bool:
    return _INT32_MIN <= int(text) <= _INT32_MAX


# --- help ------------------------------------------------------------------------------

_KIND_LABEL: dict[FlagKind, str] = {
    "string": "string", "bool": "", "int": "int", "list": "value", "level": "level",
}


def _default_label(spec: FlagSpec) -> str:
    default = spec.default
    if isinstance(default, bool):
        return " (default true)" if default else ""
    if isinstance(default, tuple) or default in ("", 0):
        return ""
    return f' (default "{default}")' if isinstance(default, str) else f" (default {default})"


def help_text(program: str = "flanneld") -> str:
    """Usage text in the layout of Go's `flag.PrintDefaults`, flags sorted by name."""
    lines = [f"Usage: {program} [OPTION]..."]
    for spec in sorted(FLAG_SPECS, key=lambda s: s.name):
        label = _KIND_LABEL[spec.kind]
        lines.append(f"  -{spec.name}" + (f" {label}" if label else ""))
        env = f" [env {spec.env_name}]" if spec.from_env else ""
        lines.append(f"    \t{spec.help}{_default_label(spec)}{env}")
    return "\n".join(lines) + "\n"

