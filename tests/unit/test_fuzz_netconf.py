"""Fuzzing net-conf.json: any text is a NetConf or a NetConfError, never another exception.

Bounded budget: a few hundred examples per target, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.config.netconf import (
    NetConf,
    NetConfError,
    check_network_config,
    parse_netconf,
    vxlan_options,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELDS = ["Network", "IPv6Network", "EnableIPv4", "EnableIPv6", "EnableNFTables", "SubnetLen",
          "SubnetMin", "SubnetMax", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax"]
VXLAN = ["Type", "VNI", "Port", "GBP", "Learning", "MTU", "DirectRouting"]


def cased(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name + "x", "\u017f" + name])


_addresses = st.sampled_from([
    "10.244.0.0/16", "10.244.1.7/16", "10.0.0.0/8", "10.0.0.0/30", "10.0.0.0/33", "10.0.0.0",
    "fd00::/48", "fd00::/120", "fd00::/129", "::ffff:10.0.0.0", "10.0.0.5", "fd00::5",
    "010.0.0.0/8", "10.0.0.0/08", "fe80::%eth0/64", "10.0.0.0/-1", "", "/", "1.2.3.4/ 8",
    "10.0.0.0/" + "9" * 5000, "\u0661\u0660.0.0.0/8"])
_scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
            | st.floats(allow_nan=False, allow_infinity=False) | _addresses
            | st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_backend = st.dictionaries(st.sampled_from(VXLAN).flatmap(cased),
                           _values | st.sampled_from(["vxlan", "host-gw", "", 1, 8472, 65536]),
                           max_size=5)
_config = st.dictionaries(st.sampled_from(FIELDS).flatmap(cased), _values, max_size=7).flatmap(
    lambda d: st.one_of(st.just(d), _backend.map(lambda b: {**d, "Backend": b}),
                        _values.map(lambda b: {**d, "Backend": b})))


def use_everything(text: str | bytes) -> NetConf | None:
    """What flanneld does with a config (parse, etcd checks, vxlan options); NetConfError
    is the only acceptable failure."""
    try:
        nc = parse_netconf(text, source="fuzz")
        if nc.enable_ipv4 or nc.enable_ipv6:
            check_network_config(nc, source="fuzz")
    except NetConfError as err:
        message = str(err)
        assert "\n" not in message and message.startswith("fuzz: ") and len(message) < 500
        return None
    try:
        vxlan_options(nc)  # read by the backend: errors are named by the Backend field
    except NetConfError as err:
        assert "\n" not in str(err) and str(err).startswith("Backend.") and len(str(err)) < 500
    return nc


@FUZZ
@given(config=_config)
def test_structured_configs_parse_or_refuse(config: dict[str, Any]) -> None:
    use_everything(json.dumps(config))


@FUZZ
@given(text=st.text(st.sampled_from(list('{}[]":,\\ 0123456789.eE-truefalsnNetwork/')),
                    max_size=200) | st.binary(max_size=200) | st.text(max_size=80))
def test_garbage_text_parses_or_refuses(text: str | bytes) -> None:
    use_everything(text)


@FUZZ
@given(config=_config, cut=st.integers(0, 400), depth=st.integers(0, 3000))
def test_truncated_or_nested_configs_refuse(config: dict[str, Any], cut: int,
                                            depth: int) -> None:
    text = json.dumps(config)
    use_everything(text[:cut])
    use_everything('{"Backend": ' + "[" * depth + text + "]" * depth + "}")


@FUZZ
@given(net=st.ip_addresses(v=4).flatmap(lambda a: st.integers(8, 28).map(
    lambda p: IPv4Network((a, p), strict=False))),
    net6=st.ip_addresses(v=6).flatmap(lambda a: st.integers(16, 120).map(
        lambda p: IPv6Network((a, p), strict=False))))
def test_valid_configs_are_accepted(net: IPv4Network, net6: IPv6Network) -> None:
    text = json.dumps({"Network": str(net), "IPv6Network": str(net6), "EnableIPv6": True,
                       "Backend": {"Type": "vxlan", "VNI": 4096}})
    nc = check_network_config(parse_netconf(text))
    assert (nc.network, nc.ipv6_network) == (net, net6)
    assert nc.subnet_min is not None and nc.subnet_min in net
    assert vxlan_options(nc).vni == 4096
