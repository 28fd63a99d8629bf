"""Properties of subnet allocation, and the lease key/value codec against upstream's bytes."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyflannel.lease.allocate import CANDIDATES, allocate_subnet, fits, free_subnets
from pyflannel.lease.model import (
    Lease,
    LeaseAttrs,
    LeaseFormatError,
    parse_subnet_key,
    subnet_key,
)

VXLAN_LEASE = ('{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
               '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
HOSTGW_LEASE = '{"PublicIP":"10.10.0.2","PublicIPv6":null,"BackendType":"host-gw"}'


# -- lease JSON ----------------------------------------------------------------------

def test_upstream_vxlan_lease_parses_and_round_trips_byte_for_byte() -> None:
    attrs = LeaseAttrs.from_json(VXLAN_LEASE)
    assert attrs.public_ip == IPv4Address("192.168.64.3")
    assert attrs.public_ipv6 is None
    assert attrs.backend_type == "vxlan"
    assert attrs.backend_data_obj() == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert attrs.to_json() == VXLAN_LEASE


def test_upstream_hostgw_lease_round_trips_without_backend_data() -> None:
    attrs = LeaseAttrs.from_json(HOSTGW_LEASE.encode())
    assert attrs.backend_type == "host-gw"
    assert attrs.backend_data == ""
    assert attrs.to_json() == HOSTGW_LEASE


def test_go_style_input_is_normalised_to_go_output() -> None:
    # Go matches keys case-insensitively and re-emits RawMessage compacted.
    loose = ('{ "publicip": "10.0.0.5", "publicIPv6": "fd00::5", "backendtype": "vxlan", '
             '"BackendData": { "VNI" : 4 }, "BackendV6Data": null }')
    assert LeaseAttrs.from_json(loose).to_json() == (
        '{"PublicIP":"10.0.0.5","PublicIPv6":"fd00::5","BackendType":"vxlan",'
        '"BackendData":{"VNI":4}}')


@pytest.mark.parametrize("bad", ["", "not json", "[1,2]", '{"PublicIP":"300.1.1.1"}',
                                 '{"PublicIP":"10.0.0.1","BackendType":5}'])
def test_foreign_values_are_rejected(bad: str) -> None:
    with pytest.raises(LeaseFormatError):
        LeaseAttrs.from_json(bad)


mac = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b))


@given(ip=st.integers(1, 2**32 - 2), ip6=st.none() | st.integers(1, 2**128 - 1),
       vni=st.integers(0, 2**24 - 1), mac=mac, btype=st.sampled_from(["vxlan", "host-gw", ""]))
def test_attrs_json_round_trip(ip: int, ip6: int | None, vni: int, mac: str, btype: str) -> None:
    data = f'{{"VNI":{vni},"VtepMAC":"{mac}"}}' if btype == "vxlan" else ""
    attrs = LeaseAttrs(public_ip=IPv4Address(ip),
                       public_ipv6=IPv6Address(ip6) if ip6 is not None else None,
                       backend_type=btype, backend_data=data)
    text = attrs.to_json()
    assert " " not in text
    assert LeaseAttrs.from_json(text) == attrs


# -- key codec -----------------------------------------------------------------------

def test_upstream_keys_parse() -> None:
    assert parse_subnet_key("10.5.34.0-24") == (
        IPv4Network("10.5.34.0/24"), None)
    assert parse_subnet_key("10.12.13.0-24&fd00:12:13::-56") == (
        IPv4Network("10.12.13.0/24"), IPv6Network("fd00:12:13::/56"))


def test_dual_stack_key_uses_compressed_v6() -> None:
    key = subnet_key(IPv4Network("10.1.2.0/24"), IPv6Network("fd00:0:0:0::/64"))
    assert key == "10.1.2.0-24&fd00::-64"
    lease = Lease(IPv4Network("10.1.2.0/24"), LeaseAttrs(), IPv6Network("fd00::/64"))
    assert lease.key == key


@pytest.mark.parametrize("bad", ["config", "10.1.2.0", "10.1.2.0/24", "10.1.2.0-xx",
                                 "10.1.2.3-24"])
def test_non_subnet_keys_are_rejected(bad: str) -> None:
    # 10.1.2.3-24 has host bits set: not a subnet.
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(bad)


v4_subnets = st.builds(lambda a, n: IPv4Network((a, n), strict=False),
                       st.integers(0, 2**32 - 1), st.integers(8, 30))
v6_subnets = st.builds(lambda a, n: IPv6Network((a, n), strict=False),
                       st.integers(0, 2**128 - 1), st.integers(16, 126))


@given(v4=v4_subnets, v6=st.none() | v6_subnets)
def test_key_round_trip(v4: IPv4Network, v6: IPv6Network | None) -> None:
    assert parse_subnet_key(subnet_key(v4, v6)) == (v4, v6)


# -- allocation ------------------------------------------------------------------------

def brute_force_free(network: IPv4Network, subnet_len: int, lo: int, hi: int,
                     taken: list[IPv4Network]) -> list[IPv4Network]:
    """The reference: every aligned candidate in [lo, hi] that overlaps nothing taken."""
    return [cand for cand in network.subnets(new_prefix=subnet_len)
            if lo <= int(cand.network_address) <= hi
            and not any(cand.overlaps(t) for t in taken)]


@st.composite
def allocation_case(draw: st.DrawFn) -> tuple[IPv4Network, int, int, int, list[IPv4Network]]:
    prefix = draw(st.integers(16, 26))
    network = IPv4Network((draw(st.integers(0, 2**32 - 1)), prefix), strict=False)
    subnet_len = draw(st.integers(prefix + 2, min(prefix + 8, 30)))
    step = 1 << (32 - subnet_len)
    count = 1 << (subnet_len - prefix)
    i, j = sorted(draw(st.lists(st.integers(0, count - 1), min_size=2, max_size=2)))
    lo = int(network.network_address) + i * step
    hi = int(network.network_address) + j * step
    # Taken subnets of any length inside (or around) the network, as real stores hold.
    taken = draw(st.lists(
        st.builds(lambda off, n: IPv4Network(
            (int(network.network_address) + off, n), strict=False),
            st.integers(0, network.num_addresses - 1), st.integers(prefix - 2, 30)),
        max_size=30))
    return network, subnet_len, lo, hi, taken


@settings(max_examples=300)
@given(case=allocation_case())
def test_free_subnets_are_the_lowest_free_candidates(
        case: tuple[IPv4Network, int, int, int, list[IPv4Network]]) -> None:
    network, subnet_len, lo, hi, taken = case
    got = free_subnets(network, subnet_len, IPv4Address(lo), IPv4Address(hi), taken)
    assert got == brute_force_free(network, subnet_len, lo, hi, taken)[:CANDIDATES]


@settings(max_examples=200)
@given(case=allocation_case(), seed=st.integers())
def test_allocate_picks_a_free_candidate_or_none_when_full(
        case: tuple[IPv4Network, int, int, int, list[IPv4Network]], seed: int) -> None:
    network, subnet_len, lo, hi, taken = case
    free = brute_force_free(network, subnet_len, lo, hi, taken)
    got = allocate_subnet(network, subnet_len, IPv4Address(lo), IPv4Address(hi), taken,
                          random.Random(seed))
    if not free:
        assert got is None
    else:
        assert got in free[:CANDIDATES]
        assert fits(got, subnet_len, IPv4Address(lo), IPv4Address(hi))


def test_only_the_lowest_hundred_free_are_candidates() -> None:
    network = IPv4Network("10.0.0.0/8")
    lo, hi = IPv4Address("10.0.1.0"), IPv4Address("10.255.255.0")
    taken = [IPv4Network("10.0.2.0/24"), IPv4Network("10.0.0.0/16")]
    free = free_subnets(network, 24, lo, hi, taken)
    assert len(free) == CANDIDATES
    assert free[0] == IPv4Network("10.1.0.0/24")
    assert free[-1] == IPv4Network("10.1.99.0/24")
    rng = random.Random(7)
    picks = {allocate_subnet(network, 24, lo, hi, taken, rng) for _ in range(500)}
    assert picks <= set(free)
    assert len(picks) > 50  # random over the candidates, not always the first


def test_ipv6_allocation_avoids_taken_and_respects_bounds() -> None:
    network = IPv6Network("fd00:42::/56")
    lo, hi = IPv6Address("fd00:42:0:1::"), IPv6Address("fd00:42:0:3::")
    taken = [IPv6Network("fd00:42:0:1::/64"), IPv6Network("fd00:42:0:3::/64")]
    assert free_subnets(network, 64, lo, hi, taken) == [IPv6Network("fd00:42:0:2::/64")]
    taken.append(IPv6Network("fd00:42:0:2::/64"))
    assert allocate_subnet(network, 64, lo, hi, taken) is None


@pytest.mark.parametrize(("subnet", "ok"), [
    ("10.244.1.0/24", True), ("10.244.0.0/24", False), ("10.244.255.0/24", True),
    ("10.244.1.0/25", False), ("10.245.0.0/24", False)])
def test_fits_checks_length_and_bounds(subnet: str, ok: bool) -> None:
    assert fits(IPv4Network(subnet), 24, IPv4Address("10.244.1.0"),
                IPv4Address("10.244.255.0")) is ok
