"""net-conf.json decoding (Go encoding/json rules), CheckNetworkConfig and vxlan options."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from pyflannel.config.flags import ConfigError
from pyflannel.config.netconf import (
    NetConf,
    NetConfError,
    VxlanOptions,
    check_network_config,
    go_fold,
    parse_netconf,
    vxlan_options,
)

DOCS_EXAMPLE = ('{"Network":"10.0.0.0/8","SubnetLen":20,"SubnetMin":"10.10.0.0",'
                '"SubnetMax":"10.99.0.0","Backend":{"Type":"udp","Port":7890}}')
MANIFEST_DEFAULT = ('{\n  "Network": "10.244.0.0/16",\n  "EnableNFTables": false,\n'
                    '  "Backend": {\n    "Type": "vxlan"\n  }\n}\n')


EXAMPLE = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
HINT = f" (expected a JSON object such as {EXAMPLE})"


def conf(**fields: Any) -> NetConf:
    return parse_netconf(json.dumps(fields))


def error_of(text: str | bytes) -> str:
    with pytest.raises(NetConfError) as err:
        parse_netconf(text)
    message = str(err.value)
    assert "\n" not in message
    return message


def check_error(nc: NetConf) -> str:
    with pytest.raises(NetConfError) as err:
        check_network_config(nc)
    assert "\n" not in str(err.value)
    return str(err.value)


# --- decoding ---------------------------------------------------------------------------


def test_docs_example() -> None:
    nc = parse_netconf(DOCS_EXAMPLE)
    assert nc.network == IPv4Network("10.0.0.0/8")
    assert nc.subnet_len == 20
    assert nc.subnet_min == IPv4Address("10.10.0.0")
    assert nc.subnet_max == IPv4Address("10.99.0.0")
    assert nc.backend_type == "udp"
    assert nc.backend == {"Type": "udp", "Port": 7890}
    checked = check_network_config(nc)
    assert (checked.subnet_len, checked.subnet_min, checked.subnet_max) == (
        20, IPv4Address("10.10.0.0"), IPv4Address("10.99.0.0"))


def test_manifest_default() -> None:
    nc = parse_netconf(MANIFEST_DEFAULT.encode())
    assert nc == NetConf(network=IPv4Network("10.244.0.0/16"), backend_type="vxlan",
                         backend={"Type": "vxlan"})
    assert nc.enable_ipv4 and not nc.enable_ipv6 and not nc.enable_nftables
    checked = check_network_config(nc)
    assert checked.subnet_len == 24
    assert checked.subnet_min == IPv4Address("10.244.1.0")     # first subnet skipped
    assert checked.subnet_max == IPv4Address("10.244.255.0")
    assert nc.subnet_len == 0   # the input is not modified


def test_keys_are_case_insensitive_and_unknown_keys_ignored() -> None:
    nc = parse_netconf('{"network":"10.1.0.0/16","ENABLEIPV6":true,"ipv6NETWORK":"fd00::/48",'
                       '"enablenftables":true,"subnetlen":26,"Foo":1,'
                       '"backend":{"type":"Host-GW","Extra":[1]}}')
    assert nc.network == IPv4Network("10.1.0.0/16")
    assert nc.enable_ipv6 and nc.ipv6_network == IPv6Network("fd00::/48")
    assert nc.enable_nftables
    assert nc.subnet_len == 26
    assert nc.backend_type == "host-gw"
    assert nc.backend == {"type": "Host-GW", "Extra": [1]}


def test_go_unicode_folding() -> None:
    # Go folds the Kelvin sign to 'K' and the long s to 'S'; Python's plain lower() would not
    # match these the same way.
    assert go_fold("Bac\u212aend") == "BACKEND"
    assert go_fold("\u017fubnetLen") == "SUBNETLEN"
    assert go_fold("Stra\u00dfe") != go_fold("STRASSE")
    nc = parse_netconf('{"Network":"10.1.0.0/16","\u017fubnetLen":20,'
                       '"Bac\u212aend":{"Type":"vxlan","V\u0130":5}}')
    assert nc.subnet_len == 20 and nc.backend_type == "vxlan"


def test_last_duplicate_key_wins() -> None:
    nc = parse_netconf('{"network":"10.1.0.0/16","Network":"10.2.0.0/16","network":"10.3.0.0/16"}')
    assert nc.network == IPv4Network("10.3.0.0/16")


def test_cidrs_are_masked() -> None:
    nc = conf(Network="10.244.7.9/16", EnableIPv6=True, IPv6Network="2001:cafe:42::99/56")
    assert nc.network == IPv4Network("10.244.0.0/16")
    assert nc.ipv6_network == IPv6Network("2001:cafe:42::/56")


def test_prefix_with_leading_zero_is_accepted_like_go() -> None:
    assert conf(Network="10.0.0.0/016").network == IPv4Network("10.0.0.0/16")


def test_null_keeps_default() -> None:
    nc = parse_netconf('{"Network":"10.0.0.0/16","EnableIPv4":null,"SubnetLen":null}')
    assert nc.enable_ipv4 is True and nc.subnet_len == 0


def test_enable_ipv4_can_be_turned_off() -> None:
    nc = conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::/48")
    assert not nc.enable_ipv4 and nc.network is None


def test_backend_absent_defaults_to_vxlan() -> None:
    nc = conf(Network="10.0.0.0/16")
    assert nc.backend_type == "vxlan"
    assert nc.backend == {"Type": "vxlan"}


def test_subnet_min_accepts_ipv4_mapped_form() -> None:
    assert conf(SubnetMin="::ffff:10.0.4.0").subnet_min == IPv4Address("10.0.4.0")


def test_config_error_hierarchy() -> None:
    assert issubclass(NetConfError, ConfigError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "net-conf.json: invalid JSON: Expecting value: line 1 column 1 (char 0)" + HINT),
        ('{"Network": "10.0.0.0/8",}', "net-conf.json: invalid JSON: Expecting property name "
         "enclosed in double quotes: line 1 column 26 (char 25)" + HINT),
        ('{"SubnetLen": NaN}', "net-conf.json: invalid JSON: NaN is not valid JSON "
         "(Go refuses NaN and infinities)" + HINT),
        ('["Network"]', f"net-conf.json: expected a JSON object such as {EXAMPLE}, got array"),
        ("null", f"net-conf.json: expected a JSON object such as {EXAMPLE}, got null"),
        ('{"Network": 10}', "Network: expected a string with an IPv4 CIDR, got number 10"),
        ('{"Network": "10.0.0.0"}', 'Network: invalid IPv4 CIDR format: "10.0.0.0" '
         "(expected e.g. 10.244.0.0/16)"),
        ('{"Network": "10.0.0.0/33"}', 'Network: invalid IPv4 CIDR format: "10.0.0.0/33" '
         "(expected e.g. 10.244.0.0/16)"),
        ('{"Network": "10.0.0.0/255.0.0.0"}', 'Network: invalid IPv4 CIDR format: '
         '"10.0.0.0/255.0.0.0" (expected e.g. 10.244.0.0/16)'),
        ('{"Network": "fd00::/48"}', 'Network: invalid IPv4 CIDR format: "fd00::/48" '
         "(expected e.g. 10.244.0.0/16)"),
        ('{"Network": "010.0.0.0/8"}', 'Network: invalid IPv4 CIDR format: "010.0.0.0/8" '
         "(expected e.g. 10.244.0.0/16)"),
        ('{"IPv6Network": "10.0.0.0/8"}', 'IPv6Network: invalid IPv6 CIDR format: '
         '"10.0.0.0/8" (expected e.g. 2001:cafe:42::/56)'),
        ('{"IPv6Network": "fe80::%eth0/64"}', 'IPv6Network: invalid IPv6 CIDR format: '
         '"fe80::%eth0/64" (expected e.g. 2001:cafe:42::/56)'),
        ('{"EnableIPv6": "true"}',
         'EnableIPv6: expected a JSON boolean (true or false), got string "true"'),
        ('{"EnableIPv4": 1}', "EnableIPv4: expected a JSON boolean (true or false), got number 1"),
        ('{"EnableNFTables": "yes"}',
         'EnableNFTables: expected a JSON boolean (true or false), got string "yes"'),
        ('{"SubnetLen": 24.0}', "SubnetLen: expected a non-negative integer, got number 24.0"),
        ('{"SubnetLen": 24.5}', "SubnetLen: expected a non-negative integer, got number 24.5"),
        ('{"SubnetLen": "24"}', 'SubnetLen: expected a non-negative integer, got string "24"'),
        ('{"SubnetLen": -1}', "SubnetLen: expected a non-negative integer, got number -1"),
        ('{"SubnetLen": true}', "SubnetLen: expected a non-negative integer, got boolean true"),
        ('{"IPv6SubnetLen": 1e2}',
         "IPv6SubnetLen: expected a non-negative integer, got number 100.0"),
        ('{"SubnetMin": "10.0.0"}', 'SubnetMin: invalid IP address format: "10.0.0" '
         "(expected an IPv4 address such as 10.10.0.0)"),
        ('{"SubnetMax": "fd00::1"}', 'SubnetMax: invalid IP address format: "fd00::1" '
         "(expected an IPv4 address such as 10.10.0.0)"),
        ('{"SubnetMin": 5}', "SubnetMin: expected a string with an IPv4 address, got number 5"),
        ('{"IPv6SubnetMin": "10.0.0.1"}', 'IPv6SubnetMin: invalid IPv6 address format: '
         '"10.0.0.1" (expected an IPv6 address such as 2001:cafe:42:1::)'),
        ('{"Backend": "vxlan"}', 'Backend: expected a JSON object such as {"Type": "vxlan"}, '
         'got string "vxlan"'),
        ('{"Backend": null}', 'Backend: expected a JSON object such as {"Type": "vxlan"}, '
         "got null"),
        ('{"Backend": {}}',
         'Backend.Type: expected the backend name such as "vxlan" (unknown backend type: )'),
        ('{"Backend": {"Port": 1}}',
         'Backend.Type: expected the backend name such as "vxlan" (unknown backend type: )'),
        ('{"Backend": {"Type": ""}}',
         'Backend.Type: expected the backend name such as "vxlan" (unknown backend type: )'),
        ('{"Backend": {"Type": 1}}',
         "Backend.Type: expected a string naming the backend, got number 1"),
    ],
)
def test_decode_errors(text: str, message: str) -> None:
    assert error_of(text) == message


def test_source_names_where_the_config_came_from() -> None:
    where = "network config at etcd key /coreos.com/network/config"
    for text, reason in (("garbage", "invalid JSON: Expecting value"),
                         ('{"Network": 10}', "Network: expected a string with an IPv4 CIDR"),
                         ("[]", "expected a JSON object such as")):
        with pytest.raises(NetConfError) as err:
            parse_netconf(text, source=where)
        assert str(err.value).startswith(f"{where}: {reason}")
    with pytest.raises(NetConfError) as err:
        check_network_config(conf(Network="10.0.0.0/8", SubnetLen=31), source=where)
    assert str(err.value) == f"{where}: SubnetLen: SubnetLen must be less than /31 (got 31)"
    # a hostile source cannot break the line
    with pytest.raises(NetConfError) as err:
        parse_netconf("[]", source="key /a\nb")
    assert "\n" not in str(err.value) and str(err.value).startswith("key /a\\nb: ")


def test_size_and_depth_limits() -> None:
    nested = '{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan", "x": ' + "[" * 14
    assert parse_netconf(nested + "]" * 14 + "}}").backend_type == "vxlan"  # 16 levels
    assert error_of(nested + "[]" + "]" * 14 + "}}") == (
        "net-conf.json: nested too deeply: 17 levels of arrays/objects (the limit is 16)")
    # the case: this raised RecursionError
    assert "nested too deeply" in error_of("[" * 1500 + "]" * 1500)
    padded = '{"Network": "10.0.0.0/8"}'.ljust(64 * 1024)
    assert parse_netconf(padded).network == IPv4Network("10.0.0.0/8")
    assert error_of(padded + " ") == (
        "net-conf.json: too large: 65537 bytes (the limit is 65536)")


def test_long_values_are_cut_in_messages() -> None:
    message = error_of(json.dumps({"Network": "x" * 10_000}))
    assert len(message) < 200 and message.endswith('..." (expected e.g. 10.244.0.0/16)')


def test_backend_null_is_not_treated_as_absent() -> None:
    # Backend is a raw JSON field in Go, so null is "present"; key folding still applies.
    assert error_of('{"backend": null}').startswith("Backend: ")


# --- CheckNetworkConfig: IPv4 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0"),
        ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ("10.0.0.0/22", 24, "10.0.1.0", "10.0.3.0"),       # prefix <= 22: /24
        ("10.0.0.0/23", 25, "10.0.0.128", "10.0.1.128"),   # else prefix + 2
        ("10.0.0.0/28", 30, "10.0.0.4", "10.0.0.12"),
    ],
)
def test_v4_defaults(network: str, subnet_len: int, smin: str, smax: str) -> None:
    nc = check_network_config(conf(Network=network))
    assert (nc.subnet_len, nc.subnet_min, nc.subnet_max) == (
        subnet_len, IPv4Address(smin), IPv4Address(smax))


def test_v4_explicit_values_kept() -> None:
    nc = check_network_config(conf(Network="10.0.0.0/16", SubnetLen=18,
                                   SubnetMin="10.0.0.0", SubnetMax="10.0.128.0"))
    # 10.0.0.0 equals the Go zero value only for 0.0.0.0; here it is a real, kept value.
    assert (nc.subnet_len, nc.subnet_min, nc.subnet_max) == (
        18, IPv4Address("10.0.0.0"), IPv4Address("10.0.128.0"))


def test_v4_zero_address_means_unset() -> None:
    nc = check_network_config(conf(Network="10.0.0.0/16", SubnetMin="0.0.0.0",
                                   SubnetMax="0.0.0.0"))
    assert (nc.subnet_min, nc.subnet_max) == (IPv4Address("10.0.1.0"), IPv4Address("10.0.255.0"))


def test_subnet_len_zero_means_default() -> None:
    assert check_network_config(conf(Network="10.0.0.0/16", SubnetLen=0)).subnet_len == 24


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "Network: please define a correct Network parameter in the flannel config"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 31},
         "SubnetLen: SubnetLen must be less than /31 (got 31)"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 17},
         "SubnetLen: Network must be able to accommodate at least four subnets "
         "(SubnetLen 17 needs a Network of /15 or larger, got 10.0.0.0/16)"),
        ({"Network": "10.0.0.0/29"},
         "Network: Network is too small. Minimum useful network prefix is /28 "
         "(got 10.0.0.0/29)"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"},
         "SubnetMin: SubnetMin is not in the range of the Network (10.1.0.0 is outside "
         "10.0.0.0/16)"),
        ({"Network": "10.0.0.0/16", "SubnetMax": "192.168.0.0"},
         "SubnetMax: SubnetMax is not in the range of the Network (192.168.0.0 is outside "
         "10.0.0.0/16)"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.1"},
         "SubnetMin: SubnetMin is not on a SubnetLen boundary: 10.0.1.1 (expected a multiple "
         "of /24)"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 20, "SubnetMax": "10.0.255.0"},
         "SubnetMax: SubnetMax is not on a SubnetLen boundary: 10.0.255.0 (expected a "
         "multiple of /20)"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.8.0"},
         "SubnetMin: SubnetMin must not be above SubnetMax"),
    ],
)
def test_v4_check_errors(fields: dict[str, Any], message: str) -> None:
    assert check_error(conf(**fields)) == message


def test_upstream_messages_are_contained() -> None:
    # The exact upstream strings (§2) must appear, so people can search for them.
    upstream = {
        "please define a correct Network parameter in the flannel config": {},
        "SubnetLen must be less than /31": {"Network": "10.0.0.0/8", "SubnetLen": 31},
        "must be able to accommodate at least four subnets":
            {"Network": "10.0.0.0/8", "SubnetLen": 9},
        "is too small. Minimum useful network prefix is /28": {"Network": "10.0.0.0/30"},
        "SubnetMin is not on a SubnetLen boundary: 10.0.0.128":
            {"Network": "10.0.0.0/8", "SubnetMin": "10.0.0.128"},
    }
    for text, fields in upstream.items():
        assert text in check_error(conf(**fields))


def test_v4_disabled_skips_v4_rules() -> None:
    nc = check_network_config(conf(EnableIPv4=False, EnableIPv6=True,
                                   IPv6Network="fd00::/48"))
    assert nc.subnet_len == 0 and nc.subnet_min is None
    assert nc.ipv6_subnet_len == 64


# --- CheckNetworkConfig: IPv6 -----------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "subnet_len", "smin", "smax"),
    [
        ("2001:cafe:42::/56", 64, "2001:cafe:42:1::", "2001:cafe:42:ff::"),
        ("fd00::/62", 64, "fd00:0:0:1::", "fd00:0:0:3::"),
        ("fd00::/63", 65, "fd00::8000:0:0:0", "fd00:0:0:1:8000::"),
        ("fd00::/124", 126, "fd00::4", "fd00::c"),
    ],
)
def test_v6_defaults(network: str, subnet_len: int, smin: str, smax: str) -> None:
    nc = check_network_config(conf(Network="10.0.0.0/16", EnableIPv6=True, IPv6Network=network))
    assert (nc.ipv6_subnet_len, nc.ipv6_subnet_min, nc.ipv6_subnet_max) == (
        subnet_len, IPv6Address(smin), IPv6Address(smax))
    assert nc.subnet_len == 24   # dual stack fills both families


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "IPv6Network: please define a correct IPv6Network parameter in the flannel config"),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetLen": 127},
         "IPv6SubnetLen: IPv6SubnetLen must be less than /127 (got 127)"),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetLen": 49},
         "IPv6SubnetLen: IPv6Network must be able to accommodate at least four subnets "
         "(IPv6SubnetLen 49 needs a IPv6Network of /47 or larger, got fd00::/48)"),
        ({"IPv6Network": "fd00::/125"},
         "IPv6Network: IPv6Network is too small. Minimum useful network prefix is /124 "
         "(got fd00::/125)"),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd01::"},
         "IPv6SubnetMin: IPv6SubnetMin is not in the range of the IPv6Network (fd01:: is "
         "outside fd00::/48)"),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMax": "fd00:0:0:5::1"},
         "IPv6SubnetMax: IPv6SubnetMax is not on a IPv6SubnetLen boundary: fd00:0:0:5::1 "
         "(expected a multiple of /64)"),
        ({"IPv6Network": "fd00::/48", "IPv6SubnetMin": "fd00:0:0:9::",
          "IPv6SubnetMax": "fd00:0:0:8::"},
         "IPv6SubnetMin: IPv6SubnetMin must not be above IPv6SubnetMax"),
    ],
)
def test_v6_check_errors(fields: dict[str, Any], message: str) -> None:
    nc = conf(EnableIPv4=False, EnableIPv6=True, **fields)
    assert check_error(nc) == message


def test_v6_explicit_values_kept() -> None:
    nc = check_network_config(conf(EnableIPv4=False, EnableIPv6=True, IPv6Network="fd00::/48",
                                   IPv6SubnetLen=56, IPv6SubnetMin="fd00:0:0:100::",
                                   IPv6SubnetMax="fd00:0:0:200::"))
    assert (nc.ipv6_subnet_len, nc.ipv6_subnet_min, nc.ipv6_subnet_max) == (
        56, IPv6Address("fd00:0:0:100::"), IPv6Address("fd00:0:0:200::"))


def test_v6_not_checked_when_disabled() -> None:
    nc = check_network_config(conf(Network="10.0.0.0/16", IPv6Network="fd00::/126"))
    assert nc.ipv6_subnet_len == 0 and nc.ipv6_subnet_min is None


# --- vxlan options ----------------------------------------------------------------------


def test_vxlan_defaults() -> None:
    assert vxlan_options(conf(Backend={"Type": "vxlan"})) == VxlanOptions(
        vni=1, port=0, gbp=False, learning=False, mtu=0, direct_routing=False)
    assert vxlan_options(conf()) == VxlanOptions()


def test_vxlan_all_options_case_insensitive() -> None:
    nc = parse_netconf('{"Backend":{"type":"vxlan","vni":42,"PORT":4789,"Gbp":true,'
                       '"learning":true,"mtu":9000,"directRouting":true,"Unknown":"x"}}')
    assert vxlan_options(nc) == VxlanOptions(vni=42, port=4789, gbp=True, learning=True,
                                             mtu=9000, direct_routing=True)


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"VNI": "1"}, 'Backend.VNI: expected an integer, got string "1"'),
        ({"VNI": 1.5}, "Backend.VNI: expected an integer, got number 1.5"),
        ({"VNI": 16777216}, "Backend.VNI: expected an integer in 0..16777215, got 16777216"),
        ({"Port": 65536}, "Backend.Port: expected an integer in 0..65535, got 65536"),
        ({"Port": True}, "Backend.Port: expected an integer, got boolean true"),
        ({"MTU": -1}, "Backend.MTU: expected an integer in 0..9223372036854775807, got -1"),
        ({"GBP": 1}, "Backend.GBP: expected a JSON boolean (true or false), got number 1"),
        ({"learning": "false"},
         'Backend.Learning: expected a JSON boolean (true or false), got string "false"'),
        ({"DirectRouting": "true"},
         'Backend.DirectRouting: expected a JSON boolean (true or false), got string "true"'),
    ],
)
def test_vxlan_errors(backend: dict[str, Any], message: str) -> None:
    nc = conf(Backend={"Type": "vxlan", **backend})
    with pytest.raises(NetConfError) as err:
        vxlan_options(nc)
    assert str(err.value) == message
