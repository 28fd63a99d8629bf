"""Fuzzing what other nodes write: lease keys, lease values and node annotations.

The contract, and nothing more: any input returns a value or raises the module's own
error type (LeaseFormatError, NodeLeaseError), never another exception; a key that is
accepted is exactly the canonical key of what it was parsed to. Bounded budget: a few
hundred examples per target, no deadline (the machine is shared).
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyflannel.lease.model import (
    LeaseAttrs,
    LeaseFormatError,
    _v4_key_fast,
    parse_subnet_key,
    stored_lease,
    subnet_key,
)
from pyflannel.subnet.kube.annotations import Annotations
from pyflannel.subnet.kube.nodes import NodeLeaseError, node_lease

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PREFIX = "/coreos.com/network/subnets/"
ANN = Annotations.for_prefix()

# --------------------------------------------------------------------------- keys

v4_nets = st.builds(lambda a, p: IPv4Network((a, p), strict=False),
                    st.ip_addresses(v=4), st.integers(0, 32))
v6_nets = st.builds(lambda a, p: IPv6Network((a, p), strict=False),
                    st.ip_addresses(v=6), st.integers(0, 128))
canonical_keys = st.one_of(
    v4_nets.map(subnet_key),
    st.tuples(v4_nets, v6_nets).map(lambda t: subnet_key(*t)),
    v6_nets.map(lambda n: subnet_key(None, n)))
_key_noise = st.sampled_from(["", "x", "0", "-", "&", "/", ".", "-0", "00", " ", "\n", "a:",
                              "&fd00::-64", "-24", "١"])


@st.composite
def mangled_keys(draw: st.DrawFn) -> str:
    """A canonical key with junk around or inside it (the issue's attack shapes)."""
    key = draw(canonical_keys)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(key)))
        key = key[:at] + draw(_key_noise) + key[at:]
    return draw(_key_noise) + key + draw(_key_noise)


any_keys = (canonical_keys | mangled_keys()
            | st.text(st.sampled_from(list("0123456789.-&:abcdef/x")), max_size=40)
            | st.text(max_size=30))


@FUZZ
@given(key=any_keys, full=st.booleans())
def test_parse_subnet_key_returns_or_refuses(key: str, full: bool) -> None:
    try:
        v4, v6 = parse_subnet_key(PREFIX + key if full else key)
    except LeaseFormatError:
        return
    assert v4 is None or isinstance(v4, IPv4Network)
    assert v6 is None or isinstance(v6, IPv6Network)
    assert (v4, v6) != (None, None)


@FUZZ
@given(key=canonical_keys)
def test_canonical_keys_parse_back(key: str) -> None:
    assert subnet_key(*parse_subnet_key(key)) == key
    with pytest.raises(LeaseFormatError):  # the part after `subnets/` only: no path
        parse_subnet_key(PREFIX + key)


@FUZZ
@example(key="x10.244.36.0-24")
@example(key="10.244.36.0-024")
@given(key=any_keys)
def test_accepted_keys_are_canonical(key: str) -> None:
    try:
        parsed = parse_subnet_key(key)
    except LeaseFormatError:
        return
    assert subnet_key(*parsed) == key


# --------------------------------------------------------------------------- lease values

_ips = st.sampled_from(["10.0.0.1", "192.168.64.3", "0.0.0.0", "255.255.255.255", "010.0.0.1",
                        "3232255290", "10.0.0", "fd00::1", "::ffff:10.0.0.1", "", "10.0.0.1 ",
                        "1.2.3.4%eth0"])
_json_scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
                 | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10)
                 | _ips)
_json_values = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                            max_leaves=10)
_lease_keys = st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendData",
                               "BackendV6Data", "publicip", "PUBLICIPV6", "backenddata", "x"])
lease_objects = st.dictionaries(_lease_keys, _json_values | _ips, max_size=6)


def from_json_contract(text: str | bytes) -> None:
    try:
        attrs = LeaseAttrs.from_json(text)
    except LeaseFormatError as err:
        assert "\n" not in str(err)
        return
    assert isinstance(attrs, LeaseAttrs)
    # what was accepted can be written back and read again
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs


@FUZZ
@given(obj=lease_objects)
def test_lease_json_objects_return_or_refuse(obj: dict[str, Any]) -> None:
    from_json_contract(json.dumps(obj))


@FUZZ
@given(text=st.text(st.sampled_from(list('{}[]":,\\ 0123456789.eE-truefalsnPublicIP')),
                    max_size=200) | st.binary(max_size=120) | st.text(max_size=60))
def test_lease_json_garbage_returns_or_refuses(text: str | bytes) -> None:
    from_json_contract(text)


@FUZZ
@example(depth=1500)
@example(depth=100_000)
@given(depth=st.integers(1, 5000))
def test_deeply_nested_lease_values_are_refused(depth: int) -> None:
    from_json_contract('{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":'
                       + "[" * depth + "]" * depth + "}")


@FUZZ
@given(ip=st.ip_addresses(v=4), ip6=st.none() | st.ip_addresses(v=6),
       btype=st.sampled_from(["", "vxlan", "host-gw"]),
       data=st.sampled_from(["", '{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"}', "[]", '"x"']))
def test_written_leases_read_back(ip: IPv4Address, ip6: IPv6Address | None, btype: str,
                                  data: str) -> None:
    attrs = LeaseAttrs(public_ip=ip, public_ipv6=ip6, backend_type=btype, backend_data=data)
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs


# The fast path for upstream's own form (bytes from etcd) must agree with the general
# parser on everything: the same attributes, or a refusal wherever the parser refuses.
_fast_ips = st.sampled_from(["10.0.0.1", "0.0.0.0", "255.255.255.255", "010.0.0.1", "1.2.3",
                             "1.2.3.4.5", "256.1.1.1", "1..2.3", "1.2.3.04", "99999.1.1.1"])
_fast_types = st.sampled_from(["host-gw", "vxlan", "", "x" * 33, "udp", "Host-GW", "ipip"])
_fast_data = st.sampled_from(
    ["", ',"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:01"}',
     ',"BackendData":{"VNI":01,"VtepMAC":"0e:00:00:00:00:01"}',
     ',"BackendData":{"VNI":0,"VtepMAC":"0e:00:00:00:00:01"}',
     ',"BackendData":{"VNI":123456789,"VtepMAC":"ff:ff:ff:ff:ff:ff"}',
     ',"BackendData":{"VNI":1,"VtepMAC":"0e:00:00:00:00:0"}',
     ',"BackendData":null', ',"BackendData":{"VNI":1,"VtepMAC":"0E:00:00:00:00:01"}'])


@FUZZ
@example(value=b'{"PublicIP":"172.20.1.0","PublicIPv6":null,"BackendType":"host-gw"}')
@given(value=st.builds(
    lambda ip, six, t, d, tail: (f'{{"PublicIP":"{ip}",{six}"BackendType":"{t}"{d}}}'
                                 + tail).encode(),
    _fast_ips, st.sampled_from(['"PublicIPv6":null,', "", '"PublicIPv6":"fd00::1",',
                                '"publicIPv6":null,']),
    _fast_types, _fast_data, st.sampled_from(["", " ", "}", "\n", "x"])))
def test_lease_value_fast_path_agrees_with_the_parser(value: bytes) -> None:
    try:
        want: LeaseAttrs | str = LeaseAttrs._from_json_slow(value)
    except LeaseFormatError as e:
        want = str(e)
    try:
        got: LeaseAttrs | str = LeaseAttrs.from_json(value)
    except LeaseFormatError as e:
        got = str(e)
    assert got == want


@FUZZ
@example(key="10.244.36.0-24")
@example(key="0.0.0.0-0")
@example(key="10.244.36.1-24")
@given(key=any_keys | st.builds(lambda a, p: f"{a}-{p}", st.ip_addresses(v=4),
                                st.integers(0, 40)))
def test_lease_key_fast_path_agrees_with_the_parser(key: str) -> None:
    fast = _v4_key_fast(key)
    if fast is None:
        return
    assert parse_subnet_key(key) == (fast, None)
    lease = stored_lease(key, b'{"PublicIP":"10.0.0.1"}', reservation=False, origin="1",
                         created=1, revision=1)
    assert lease.key == subnet_key(fast) == key


# --------------------------------------------------------------------------- annotations

_cidrs = st.sampled_from(["10.244.1.0/24", "10.244.1.7/24", "fd00:1::/64", "10.0.0.0/33",
                          "x", "", "10.244.1.0", "::/0", "010.1.0.0/16"])
_ann_strings = (st.sampled_from(["true", "false", "", "null", "{}", '{"VtepMAC":"x"}', "[",
                                 "1e999", "NaN"]) | _ips | st.text(max_size=20)
                | _json_values.map(json.dumps))
_ann_names = st.sampled_from([ANN.kube_managed, ANN.backend_type, ANN.backend_data,
                              ANN.backend_v6_data, ANN.public_ip, ANN.public_ipv6,
                              ANN.public_ip_overwrite, "other/x"])


@st.composite
def nodes(draw: st.DrawFn) -> dict[str, Any]:
    annotations = draw(st.dictionaries(_ann_names, _ann_strings, max_size=7))
    if draw(st.booleans()):
        annotations[ANN.kube_managed] = "true"
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["podCIDR"] = draw(_cidrs)
    if draw(st.booleans()):
        spec["podCIDRs"] = draw(st.lists(_cidrs, max_size=3))
    return {"metadata": {"name": draw(st.text(max_size=8)), "annotations": annotations},
            "spec": spec}


def node_lease_contract(node: dict[str, Any], ipv4: bool, ipv6: bool) -> None:
    try:
        lease = node_lease(node, ANN, ipv4=ipv4, ipv6=ipv6)
    except NodeLeaseError as err:
        assert "\n" not in str(err)
        return
    if lease is not None:
        assert (lease.subnet is not None) == ipv4 and (lease.ipv6_subnet is not None) == ipv6


@FUZZ
@given(node=nodes(), family=st.sampled_from([(True, False), (False, True), (True, True)]))
def test_node_annotations_return_or_refuse(node: dict[str, Any],
                                           family: tuple[bool, bool]) -> None:
    node_lease_contract(node, *family)


@FUZZ
@example(depth=1500)
@example(depth=100_000)
@given(depth=st.integers(1, 5000))
def test_deeply_nested_backend_data_annotation_is_refused(depth: int) -> None:
    node = {"metadata": {"name": "n1", "annotations": {
        ANN.kube_managed: "true", ANN.backend_type: "vxlan", ANN.public_ip: "10.0.0.1",
        ANN.backend_data: "[" * depth + "]" * depth}}, "spec": {"podCIDR": "10.244.1.0/24"}}
    node_lease_contract(node, True, False)
