"""LeaseTable: own lease dropped, invalid leases refused before they reach the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.table import LeasePolicy, LeaseTable, _refusal, _surely_fine, refusal

POLICY = LeasePolicy(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
                     backend_type="host-gw", own_subnet=IPv4Network("10.244.1.0/24"),
                     own_public_ip=IPv4Address("192.168.1.11"))


def lease(subnet: str, ip: str, btype: str = "host-gw") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(public_ip=IPv4Address(ip), backend_type=btype))


def table() -> LeaseTable:
    return LeaseTable("10.244.1.0-24", POLICY)


def test_snapshot_then_changes() -> None:
    t = table()
    d = t.apply(LeaseSnapshot((lease("10.244.1.0/24", "192.168.1.11"),
                               lease("10.244.2.0/24", "192.168.1.12"))))
    assert set(t.peers) == {"10.244.2.0-24"} and d.changed == {"10.244.2.0-24"}
    d = t.apply(LeaseChanges(upserted=(lease("10.244.3.0/24", "192.168.1.13"),)))
    assert set(t.peers) == {"10.244.2.0-24", "10.244.3.0-24"}
    d = t.apply(LeaseChanges(removed=("10.244.2.0-24",)))
    assert set(t.peers) == {"10.244.3.0-24"} and [x.key for x in d.removed] == ["10.244.2.0-24"]
    # an unchanged re-put changes nothing
    d = t.apply(LeaseChanges(upserted=(lease("10.244.3.0/24", "192.168.1.13"),)))
    assert not d.changed


def test_a_snapshot_removes_what_vanished() -> None:
    t = table()
    t.apply(LeaseSnapshot((lease("10.244.2.0/24", "192.168.1.12"),
                           lease("10.244.3.0/24", "192.168.1.13"))))
    d = t.apply(LeaseSnapshot((lease("10.244.3.0/24", "192.168.1.13"),)))
    assert set(t.peers) == {"10.244.3.0-24"} and d.changed == {"10.244.2.0-24"}


@pytest.mark.parametrize("bad,reason", [
    (lease("10.9.2.0/24", "192.168.1.12"), "outside the network"),
    (lease("10.244.0.0/23", "192.168.1.12"), "not a /24"),
    (lease("10.244.2.0/24", "0.0.0.0"), "is unspecified"),
    (lease("10.244.2.0/24", "127.0.0.1"), "loopback"),
    (lease("10.244.2.0/24", "224.0.0.5"), "multicast"),
    (lease("10.244.2.0/24", "192.168.1.11"), "our own"),
    (lease("10.244.2.0/24", "192.168.1.12", "vxlan"), "backend type"),
])
def test_invalid_leases_are_refused(bad: Lease, reason: str) -> None:
    t = table()
    d = t.apply(LeaseChanges(upserted=(bad,)))
    assert not t.peers
    assert len(d.refused) == 1 and reason in d.refused[0][1].message
    # logged once: the same refusal again is not reported again
    assert not t.apply(LeaseChanges(upserted=(bad,))).refused


def test_a_lease_turning_invalid_is_withdrawn() -> None:
    t = table()
    t.apply(LeaseChanges(upserted=(lease("10.244.2.0/24", "192.168.1.12"),)))
    d = t.apply(LeaseChanges(upserted=(lease("10.244.2.0/24", "0.0.0.0"),)))
    assert not t.peers and [x.key for x in d.removed] == ["10.244.2.0-24"]


# The integer fast path of `refusal` (IPv4-only policies) must accept exactly what the
# general checks accept: at the boundaries of every range they refuse, and at random.
_edge_ips = st.sampled_from([
    "0.0.0.0", "0.0.0.1", "126.255.255.255", "127.0.0.0", "127.255.255.255", "128.0.0.0",
    "169.253.255.255", "169.254.0.0", "169.254.255.255", "169.255.0.0", "223.255.255.255",
    "224.0.0.0", "239.255.255.255", "240.0.0.0", "255.255.255.254", "255.255.255.255",
    "192.168.1.0", "192.168.1.11", "192.168.1.255", "192.168.2.0", "10.0.0.1", "10.9.9.10",
    "10.9.9.11"]).map(IPv4Address)
_any_ips = _edge_ips | st.ip_addresses(v=4)
_nets = st.builds(lambda a, p: IPv4Network((a, p), strict=False), _any_ips, st.integers(0, 32))
_edge_nets = st.sampled_from(["10.244.0.0/16", "10.244.1.0/24", "10.244.2.0/24",
                              "10.244.0.0/15", "10.245.0.0/24", "10.244.1.128/25",
                              "0.0.0.0/0", "10.244.255.0/24"]).map(IPv4Network)


@settings(max_examples=400, deadline=None)
@example(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
         own=IPv4Network("10.244.1.0/24"), own_ip=IPv4Address("192.168.1.11"),
         segments=[IPv4Network("192.168.1.0/24")], btype="host-gw",
         subnet=IPv4Network("10.244.2.0/24"),
         ip=IPv4Address("192.168.1.255"), lease_type="host-gw")
@example(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
         own=IPv4Network("10.244.1.0/24"), own_ip=IPv4Address("192.168.1.11"),
         segments=[IPv4Network("192.168.1.0/24")], btype="host-gw",
         subnet=IPv4Network("10.244.2.0/24"),
         ip=IPv4Address("192.168.1.0"), lease_type="host-gw")
@example(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
         own=IPv4Network("10.244.1.0/24"), own_ip=IPv4Address("192.168.1.11"),
         segments=[IPv4Network("10.9.9.10/31")], btype="host-gw",
         subnet=IPv4Network("10.244.2.0/24"),
         ip=IPv4Address("10.9.9.10"), lease_type="host-gw")
@example(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
         own=IPv4Network("10.244.1.0/24"), own_ip=IPv4Address("192.168.1.11"),
         segments=[IPv4Network("10.9.9.11/32")], btype="host-gw",
         subnet=IPv4Network("10.244.2.0/24"),
         ip=IPv4Address("10.9.9.11"), lease_type="host-gw")
@example(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
         own=IPv4Network("10.244.1.0/24"), own_ip=IPv4Address("192.168.1.11"),
         segments=[IPv4Network("192.168.1.0/24")], btype="host-gw",
         subnet=IPv4Network("10.244.2.0/24"),
         ip=IPv4Address("192.168.1.11"), lease_type="host-gw")
@given(network=_edge_nets | _nets, subnet_len=st.none() | st.integers(0, 32),
       own=st.none() | _edge_nets | _nets, own_ip=st.none() | _edge_ips,
       segments=st.lists(_edge_nets | _nets | st.sampled_from(
           [IPv4Network("192.168.1.0/24"), IPv4Network("10.9.9.10/31"),
            IPv4Network("10.9.9.11/32"), IPv6Network("fd00::/64")]), max_size=3),
       btype=st.sampled_from([None, "host-gw"]), subnet=_edge_nets | _nets, ip=_any_ips,
       lease_type=st.sampled_from(["host-gw", "vxlan"]))
def test_integer_fast_path_agrees_with_the_checks(
        network: IPv4Network, subnet_len: int | None, own: IPv4Network | None,
        own_ip: IPv4Address | None, segments: list[IPv4Network | IPv6Network],
        btype: str | None, subnet: IPv4Network, ip: IPv4Address, lease_type: str) -> None:
    p = LeasePolicy(network=network, subnet_len=subnet_len, backend_type=btype,
                    own_subnet=own, own_public_ip=own_ip, segments=tuple(segments))
    assert p._v4 is not None
    le = lease(str(subnet), str(ip), lease_type)
    assert _surely_fine(le, p._v4) == (_refusal(le, p) is None)
    assert refusal(le, p) == _refusal(le, p)
