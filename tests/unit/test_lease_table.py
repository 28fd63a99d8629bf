"""LeaseTable: own lease dropped, invalid leases refused before they reach the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.lease.table import LeasePolicy, LeaseTable

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
