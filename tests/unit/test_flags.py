"""flanneld flag parsing: Go `flag` semantics, FLANNELD_* fallback, validation messages."""

from __future__ import annotations

import dataclasses

import pytest

from pyflannel.config.flags import (
    FLAG_SPECS,
    ConfigError,
    Flags,
    HelpRequested,
    help_text,
    parse_flags,
    parse_go_bool,
    parse_go_int,
)

UPSTREAM_DEFAULTS: dict[str, object] = {
    "etcd_endpoints": ("http://127.0.0.1:4001", "http://127.0.0.1:2379"),
    "etcd_prefix": "/coreos.com/network",
    "etcd_keyfile": "",
    "etcd_certfile": "",
    "etcd_cafile": "",
    "etcd_username": "",
    "etcd_password": "",
    "kube_subnet_mgr": False,
    "kube_api_url": "",
    "kubeconfig_file": "",
    "kube_annotation_prefix": "flannel.alpha.coreos.com",
    "iface": (),
    "iface_regex": (),
    "iface_can_reach": "",
    "public_ip": "",
    "public_ipv6": "",
    "subnet_file": "/run/flannel/subnet.env",
    "subnet_lease_renew_margin": 60,
    "ip_masq": False,
    "ip_masq_fully_random_disable": False,
    "healthz_ip": "0.0.0.0",
    "healthz_port": 0,
    "iptables_resync": 5,
    "iptables_forward_rules": True,
    "ip_blackhole_route": False,
    "net_config_path": "/etc/kube-flannel/net-conf.json",
    "set_node_network_unavailable": True,
    "version": False,
    "v": 0,
    "vmodule": "",
    "log_backtrace_at": "",
}


def test_every_flag_has_upstream_default() -> None:
    flags = parse_flags([], {})
    assert dataclasses.asdict(flags) == UPSTREAM_DEFAULTS
    assert flags == Flags()


def test_specs_cover_every_field() -> None:
    assert [s.attr for s in FLAG_SPECS] == [f.name for f in dataclasses.fields(Flags)]
    names = {s.name for s in FLAG_SPECS}
    assert {"log_backtrace_at", "v", "vmodule", "iface-regex"} <= names


@pytest.mark.parametrize("dash", ["-", "--"])
@pytest.mark.parametrize(
    ("args", "attr", "expected"),
    [
        (["etcd-prefix=/x"], "etcd_prefix", "/x"),
        (["etcd-prefix", "/x"], "etcd_prefix", "/x"),
        (["etcd-endpoints=http://a:2379,http://b:2379"], "etcd_endpoints",
         ("http://a:2379", "http://b:2379")),
        (["kube-subnet-mgr"], "kube_subnet_mgr", True),
        (["iptables-forward-rules=false"], "iptables_forward_rules", False),
        (["set-node-network-unavailable=0"], "set_node_network_unavailable", False),
        (["ip-masq=T"], "ip_masq", True),
        (["healthz-port=8081"], "healthz_port", 8081),
        (["healthz-port", "8081"], "healthz_port", 8081),
        (["iptables-resync=0x10"], "iptables_resync", 16),
        (["subnet-lease-renew-margin=010"], "subnet_lease_renew_margin", 8),  # Go: octal
        (["subnet-lease-renew-margin=1_000"], "subnet_lease_renew_margin", 1000),
        (["v=4"], "v", 4),
        (["v", "2"], "v", 2),
        (["public-ip=192.0.2.7"], "public_ip", "192.0.2.7"),
        (["public-ipv6=2001:db8::7"], "public_ipv6", "2001:db8::7"),
        (["iface-can-reach=192.0.2.1"], "iface_can_reach", "192.0.2.1"),
        (["vmodule=foo=2,bar*=3"], "vmodule", "foo=2,bar*=3"),
        (["log_backtrace_at=main.go:42"], "log_backtrace_at", "main.go:42"),
        (["version"], "version", True),
        (["etcd-password="], "etcd_password", ""),
    ],
)
def test_single_flag(dash: str, args: list[str], attr: str, expected: object) -> None:
    argv = [dash + args[0], *args[1:]]
    assert getattr(parse_flags(argv, {}), attr) == expected


@pytest.mark.parametrize("text", ["1", "t", "T", "true", "TRUE", "True"])
def test_go_bool_true(text: str) -> None:
    assert parse_flags([f"--ip-masq={text}"], {}).ip_masq is True


@pytest.mark.parametrize("text", ["0", "f", "F", "false", "FALSE", "False"])
def test_go_bool_false(text: str) -> None:
    assert parse_flags([f"--iptables-forward-rules={text}"], {}).iptables_forward_rules is False


@pytest.mark.parametrize("text", ["yes", "on", "tRUE", "", " true", "2"])
def test_go_bool_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_flags([f"--ip-masq={text}"], {})
    assert str(err.value) == (f'invalid value "{text}" for flag -ip-masq: '
                              "expected a boolean (1, 0, t, f, true, false)")


def test_bool_value_is_not_taken_from_next_argument() -> None:
    with pytest.raises(ConfigError, match='unexpected positional argument "false"'):
        parse_flags(["--ip-masq", "false"], {})


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("-5", -5), ("+7", 7), ("0x1F", 31), ("0X1f", 31), ("0b101", 5), ("0o17", 15),
     ("017", 15), ("0_7", 7), ("0x_1f", 31), ("1_0", 10), ("9223372036854775807", 2**63 - 1)],
)
def test_go_int_accepts(text: str, value: int) -> None:
    assert parse_go_int(text) == value


@pytest.mark.parametrize(
    "text", ["", "-", "abc", "1.5", " 1", "1 ", "08", "0x", "0x_", "1__0", "_1", "1_", "0b2",
             "9223372036854775808", "１"],
)
def test_go_int_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_int(text)


def test_go_bool_helper() -> None:
    assert parse_go_bool("t") and not parse_go_bool("F")
    with pytest.raises(ValueError):
        parse_go_bool("Yes")


def test_repeated_iface_accumulates_in_order() -> None:
    flags = parse_flags(["--iface", "eth1", "-iface=10.0.0.5", "--iface=eth0",
                         "-iface-regex", "^192\\.", "--iface-regex=eth[0-9]+"], {})
    assert flags.iface == ("eth1", "10.0.0.5", "eth0")
    assert flags.iface_regex == ("^192\\.", "eth[0-9]+")


def test_double_dash_ends_flags() -> None:
    assert parse_flags(["--ip-masq", "--"], {}).ip_masq is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--no-such-flag"], "flag provided but not defined: -no-such-flag"),
        (["-ip_masq"], "flag provided but not defined: -ip_masq"),
        (["--healthz-port=abc"], 'invalid value "abc" for flag -healthz-port: expected an integer'),
        (["-iptables-resync", "5s"],
         'invalid value "5s" for flag -iptables-resync: expected an integer'),
        (["-v=0x2"], 'invalid value "0x2" for flag -v: expected an integer'),
        (["--healthz-port"], "flag needs an argument: -healthz-port"),
        (["eth0"], 'unexpected positional argument "eth0": flanneld takes only flags'),
        (["--", "x"], 'unexpected positional argument "x": flanneld takes only flags'),
        (["---iface=x"], "bad flag syntax: ---iface=x"),
        (["-=x"], "bad flag syntax: -=x"),
        (["--subnet-lease-renew-margin=0"],
         "Invalid subnet-lease-renew-margin option, out of acceptable range: 0 "
         "(expected 1..1439 minutes)"),
        (["--subnet-lease-renew-margin=1440"],
         "Invalid subnet-lease-renew-margin option, out of acceptable range: 1440 "
         "(expected 1..1439 minutes)"),
        (["--iptables-resync=0"],
         'invalid value "0" for flag -iptables-resync: expected an integer >= 1 (seconds)'),
        (["--healthz-port=65536"],
         'invalid value "65536" for flag -healthz-port: expected a port in 0..65535'),
        (["--healthz-port=-1"],
         'invalid value "-1" for flag -healthz-port: expected a port in 0..65535'),
        (["--public-ip=2001:db8::1"],
         'invalid value "2001:db8::1" for flag -public-ip: expected an IPv4 address'),
        (["--public-ip=10.0.0.256"],
         'invalid value "10.0.0.256" for flag -public-ip: expected an IPv4 address'),
        (["--public-ipv6=10.0.0.1"],
         'invalid value "10.0.0.1" for flag -public-ipv6: expected an IPv6 address'),
        (["--iface-regex=eth[0"],
         'invalid value "eth[0" for flag -iface-regex: expected a valid regular expression '
         "(unterminated character set at position 3)"),
        (["-vmodule=foo"], 'invalid value "foo" for flag -vmodule: '
                           "expected a comma-separated list of pattern=N"),
        (["-log_backtrace_at=main.go"],
         'invalid value "main.go" for flag -log_backtrace_at: expected file.go:234'),
    ],
)
def test_errors_are_one_exact_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_flags(argv, {})
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_boundary_values_accepted() -> None:
    flags = parse_flags(["--subnet-lease-renew-margin=1", "--iptables-resync=1",
                         "--healthz-port=65535"], {})
    assert (flags.subnet_lease_renew_margin, flags.iptables_resync, flags.healthz_port) == (
        1, 1, 65535)
    assert parse_flags(["--subnet-lease-renew-margin=1439"], {}).subnet_lease_renew_margin == 1439


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["-help"], ["--ip-masq", "-h"]])
def test_help(argv: list[str]) -> None:
    with pytest.raises(HelpRequested):
        parse_flags(argv, {})


def test_help_text_lists_every_flag_with_defaults() -> None:
    text = help_text()
    assert text.startswith("Usage: flanneld [OPTION]...\n")
    for spec in FLAG_SPECS:
        assert f"\n  -{spec.name}" in text
    assert '(default "/run/flannel/subnet.env")' in text
    assert "(default 60)" in text
    assert "[env FLANNELD_IFACE_REGEX]" in text
    assert "FLANNELD_VERSION" not in text


# --- environment ------------------------------------------------------------------------


def test_env_fallback_for_every_kind() -> None:
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "https://e1:2379,https://e2:2379",
        "FLANNELD_KUBE_SUBNET_MGR": "true",
        "FLANNELD_IPTABLES_FORWARD_RULES": "false",
        "FLANNELD_HEALTHZ_PORT": "8081",
        "FLANNELD_IFACE": "eth0,eth1",          # exactly one value, no comma splitting
        "FLANNELD_IFACE_REGEX": "^10\\.",
        "FLANNELD_PUBLIC_IP": "192.0.2.9",
        "FLANNELD_V": "3",
        "FLANNELD_LOG_BACKTRACE_AT": "x.go:1",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
    }
    flags = parse_flags([], env)
    assert flags.etcd_endpoints == ("https://e1:2379", "https://e2:2379")
    assert flags.kube_subnet_mgr is True
    assert flags.iptables_forward_rules is False
    assert flags.healthz_port == 8081
    assert flags.iface == ("eth0,eth1",)
    assert flags.iface_regex == ("^10\\.",)
    assert flags.public_ip == "192.0.2.9"
    assert flags.v == 3
    assert flags.log_backtrace_at == "x.go:1"
    assert flags.subnet_lease_renew_margin == 30


def test_cli_wins_over_env() -> None:
    env = {"FLANNELD_HEALTHZ_PORT": "9999", "FLANNELD_IFACE": "env0", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_ETCD_PREFIX": "/env"}
    flags = parse_flags(["--healthz-port=1", "--iface=cli0", "--iface=cli1", "--ip-masq=false"],
                        env)
    assert flags.healthz_port == 1
    assert flags.iface == ("cli0", "cli1")
    assert flags.ip_masq is False
    assert flags.etcd_prefix == "/env"   # not on the CLI, so the env applies


def test_empty_env_values_are_ignored() -> None:
    env = {"FLANNELD_ETCD_PREFIX": "", "FLANNELD_IPTABLES_FORWARD_RULES": "",
           "FLANNELD_IFACE": ""}
    assert parse_flags([], env) == Flags()


def test_version_and_unrelated_env_are_ignored() -> None:
    env = {"FLANNELD_VERSION": "true", "FLANNEL_IP_MASQ": "true", "flanneld_ip_masq": "true",
           "FLANNELD_IP-MASQ": "true"}
    assert parse_flags([], env) == Flags()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLANNELD_HEALTHZ_PORT": "http"},
         'invalid value "http" for FLANNELD_HEALTHZ_PORT (flag -healthz-port): '
         "expected an integer"),
        ({"FLANNELD_IP_MASQ": "yes"},
         'invalid value "yes" for FLANNELD_IP_MASQ (flag -ip-masq): '
         "expected a boolean (1, 0, t, f, true, false)"),
        ({"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "2000"},
         "Invalid subnet-lease-renew-margin option, out of acceptable range: 2000 "
         "(expected 1..1439 minutes)"),
        ({"FLANNELD_PUBLIC_IPV6": "fe80::1%eth0"},
         'invalid value "fe80::1%eth0" for flag -public-ipv6: expected an IPv6 address'),
    ],
)
def test_bad_env_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_flags([], env)
    assert str(err.value) == message


# --- logging --------------------------------------------------------------------------


def test_redacted_hides_password_only() -> None:
    flags = parse_flags(["--etcd-password=s3cret", "--etcd-username=alice", "--iface=eth0",
                         "--iface=eth1"], {})
    line = flags.redacted()
    assert "s3cret" not in line
    assert "etcd_password:<redacted>" in line
    assert "etcd_username:alice" in line
    assert "iface:[eth0 eth1]" in line
    assert "iptables_forward_rules:true" in line
    assert "\n" not in line
    assert "etcd_password: " in Flags().redacted()   # empty stays visibly empty


def test_config_error_is_single_line() -> None:
    assert str(ConfigError("a\nb\n  c")) == "a b c"
