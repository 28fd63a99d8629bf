"""Lease identity and conflicts: one bad lease must never move a route (issue #9).

The cases the fault run found are here verbatim: non-canonical keys, a dual-stack-shaped key
over a v4 lease, deleting the planted key, overlapping kube podCIDRs, a copied VTEP MAC.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import cast

import pytest

from pyflannel.backend.base import DesiredTable, PeerState
from pyflannel.backend.vxlan import vtep_claims
from pyflannel.lease.events import LeaseChanges, LeaseSnapshot
from pyflannel.lease.model import Lease, LeaseAttrs, LeaseFormatError, parse_subnet_key
from pyflannel.lease.table import LeasePolicy, LeaseTable
from pyflannel.netlink import Route
from pyflannel.subnet.etcd.client import EtcdClient, KeyValue
from pyflannel.subnet.etcd.manager import EtcdSubnetManager

P = "/coreos.com/network/subnets/"
POLICY = LeasePolicy(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
                     backend_type="host-gw", own_subnet=IPv4Network("10.244.1.0/24"),
                     own_public_ip=IPv4Address("192.168.77.11"),
                     segments=(IPv4Network("192.168.77.0/24"),))


def lease(subnet: str, ip: str, created: int, *, v6: str | None = None, node: str = "",
          revision: int = 0, data: str = "", btype: str = "host-gw") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(public_ip=IPv4Address(ip), backend_type=btype,
                                                 backend_data=data),
                 ipv6_subnet=IPv6Network(v6) if v6 else None, node=node, created=created,
                 revision=revision or created)


@pytest.mark.parametrize("key", [
    "x10.244.36.0-24", "10.244.36.0-024", "10.244.36.0-24x", "010.244.36.0-24",
    "10.244.36.1-24", "10.244.36.0-24&FD00::-64", "10.244.36.0-24&fd00:0::-64",
    "10.244.36.0-24&", "&", "", "10.244.36.0/24", " 10.244.36.0-24", "10.244.36.0-24\n",
    "10.244.36.0-+24", "junk/10.244.36.0-24", "/10.244.36.0-24", "10.244.36.0-2\u0664", "1" * 500,
])
def test_only_canonical_keys_parse(key: str) -> None:
    with pytest.raises(LeaseFormatError):
        parse_subnet_key(key)


@pytest.mark.parametrize("key", ["10.244.36.0-24", "10.244.36.0-24&fd00::-64", "&fd00:1::-64",
                                 "0.0.0.0-0"])
def test_canonical_keys_round_trip(key: str) -> None:
    v4, v6 = parse_subnet_key(key)
    assert Lease(v4, LeaseAttrs(), v6).key == key


def test_dual_stack_shaped_key_cannot_take_a_v4_route_and_deleting_it_changes_nothing() -> None:
    t = LeaseTable("10.244.1.0-24", POLICY)
    real = lease("10.244.36.0/24", "192.168.77.12", created=5)
    planted = lease("10.244.36.0/24", "192.168.77.66", created=9, v6="fd00::/64")
    for order in ((real, planted), (planted, real)):
        t = LeaseTable("10.244.1.0-24", POLICY)
        t.apply(LeaseSnapshot(order))
        assert list(t.peers) == ["10.244.36.0-24"]
        assert t.peers["10.244.36.0-24"].attrs.public_ip == IPv4Address("192.168.77.12")
        assert "10.244.36.0-24&fd00::-64" in t.refused
    # The planted key written later, at run time: refused, the real route stays.
    t = LeaseTable("10.244.1.0-24", POLICY)
    t.apply(LeaseSnapshot((real,)))
    d = t.apply(LeaseChanges(upserted=(planted,)))
    assert not d.changed and d.refused[0][1].kind == "conflict"
    d = t.apply(LeaseChanges(removed=(planted.ident,)))
    assert not d.changed and list(t.peers) == ["10.244.36.0-24"]


def test_a_later_writer_never_wins_and_the_loser_takes_over_when_the_winner_goes() -> None:
    t = LeaseTable("", LeasePolicy(network=IPv4Network("10.244.0.0/16")))
    older = lease("10.244.0.0/16", "192.168.77.12", created=100, node="big")
    newer = lease("10.244.36.0/24", "192.168.77.13", created=200, node="small")
    t.apply(LeaseSnapshot((newer, older)))
    assert list(t.peers) == ["big"]
    # Rewriting the loser (a new revision, same creation) does not change the outcome.
    d = t.apply(LeaseChanges(upserted=(lease("10.244.36.0/24", "192.168.77.14", created=200,
                                             node="small", revision=300),)))
    assert not d.changed and list(t.peers) == ["big"]
    d = t.apply(LeaseChanges(removed=("big",)))
    assert [x.ident for x in d.removed] == ["big"] and [x.ident for x in d.added] == ["small"]
    assert t.peers["small"].attrs.public_ip == IPv4Address("192.168.77.14")


def test_an_older_lease_arriving_later_evicts_the_younger_one() -> None:
    t = LeaseTable("", LeasePolicy(network=IPv4Network("10.244.0.0/16")))
    t.apply(LeaseSnapshot((lease("10.244.36.0/24", "192.168.77.13", 200, node="young"),)))
    d = t.apply(LeaseChanges(upserted=(lease("10.244.36.0/25", "192.168.77.12", 100,
                                             node="old"),)))
    assert [x.ident for x in d.removed] == ["young"] and [x.ident for x in d.added] == ["old"]
    assert "young" in t.refused


def test_overlapping_kube_podcidrs_of_many_lengths() -> None:
    t = LeaseTable("", LeasePolicy(network=IPv4Network("10.0.0.0/8")))
    nodes = [lease(f"10.{i}.0.0/16", "192.168.77.20", created=i, node=f"n{i}")
             for i in range(1, 5)]
    rogue = lease("10.0.0.0/12", "192.168.77.66", created=50, node="rogue")  # covers 10.0-15
    tiny = lease("10.2.3.128/25", "192.168.77.67", created=60, node="tiny")
    t.apply(LeaseSnapshot((rogue, tiny, *nodes)))
    assert sorted(t.peers) == ["n1", "n2", "n3", "n4"]
    assert {"rogue", "tiny"} <= set(t.refused)


def test_a_copied_vtep_mac_is_a_conflict() -> None:
    policy = LeasePolicy(network=IPv4Network("10.244.0.0/16"), subnet_len=24,
                         backend_type="vxlan", unique=vtep_claims)
    mac = '{"VNI":1,"VtepMAC":"0a:58:0a:f4:24:00"}'
    real = lease("10.244.36.0/24", "192.168.77.12", 5, data=mac, btype="vxlan")
    copy = lease("10.244.99.0/24", "192.168.77.66", 9, data=mac.upper().replace("VNI", "VNI"),
                 btype="vxlan")
    t = LeaseTable("", policy)
    t.apply(LeaseSnapshot((copy, real)))
    assert list(t.peers) == ["10.244.36.0-24"] and "10.244.99.0-24" in t.refused


def test_a_refusal_is_logged_once_per_key_revision(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    t = LeaseTable("", POLICY)
    bad = lease("10.244.5.0/24", "192.168.77.255", created=7)  # the segment's broadcast
    for _ in range(3):
        t.apply(LeaseSnapshot((bad,)))
        t.apply(LeaseChanges(upserted=(bad,)))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "broadcast address of this node's segment" in lines[0]
    t.apply(LeaseChanges(upserted=(lease("10.244.5.0/24", "192.168.77.255", 7, revision=8),)))
    assert len(caplog.records) == 2


@pytest.mark.parametrize("ip,why", [
    ("192.168.77.255", "broadcast"), ("192.168.77.0", "network address"),
    ("169.254.1.1", "link-local"), ("255.255.255.255", "reserved"), ("0.0.0.0", "unspecified"),
])
def test_unusable_public_ips(ip: str, why: str) -> None:
    d = LeaseTable("", POLICY).apply(LeaseSnapshot((lease("10.244.5.0/24", ip, 1),)))
    assert d.refused and why in d.refused[0][1].message


@pytest.mark.parametrize("value", ['{"PublicIP":3232255290}', '{"PublicIP":"3232255290"}',
                                   '{"PublicIP":"192.168.077.1"}', '{"PublicIP":["1.2.3.4"]}',
                                   '{"PublicIP":"1.2.3.4","PublicIPv6":"fd00::g"}'])
def test_public_ip_forms_go_rejects(value: str) -> None:
    with pytest.raises(LeaseFormatError, match="PublicIP"):
        LeaseAttrs.from_json(value)


def test_removing_one_peer_never_removes_another_peers_entries() -> None:
    d = DesiredTable()
    r1 = Route(dst=IPv4Network("10.244.36.0/24"), gateway=IPv4Address("192.168.77.12"), oif=2)
    r2 = Route(dst=IPv4Network("10.244.36.0/24"), gateway=IPv4Address("192.168.77.66"), oif=2)
    d.put("a", PeerState(routes=(r1,)))
    d.put("b", PeerState(routes=(r2,)))
    d.remove("a")
    assert d.state.routes["10.244.36.0/24"] is r2


def _kv(key: str, value: str, create: int, mod: int) -> KeyValue:
    return KeyValue(key=key, value=value.encode(), lease=7, create_revision=create,
                    mod_revision=mod)


def test_etcd_events_for_non_canonical_keys_are_logged_once_and_never_remove_a_lease(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    mgr = EtcdSubnetManager(cast(EtcdClient, None))
    good = '{"PublicIP":"192.168.77.66","BackendType":"host-gw"}'
    for key in ("x10.244.36.0-24", "10.244.36.0-024", "10.244.36.0-24junk"):
        assert mgr._changes([("PUT", _kv(P + key, good, 20, 20))]) is None
        assert mgr._changes([("PUT", _kv(P + key, good, 20, 20))]) is None  # same revision
        assert mgr._changes([("DELETE", _kv(P + key, "", 20, 21))]) is None
    assert sum("Skipping" in r.getMessage() for r in caplog.records) == 3
    ch = mgr._changes([("PUT", _kv(P + "10.244.36.0-24", good, 20, 22))])
    assert ch is not None and ch.upserted[0].created == 20 and ch.upserted[0].revision == 22
    ch = mgr._changes([("DELETE", _kv(P + "10.244.36.0-24", "", 20, 23))])
    assert ch is not None and ch.removed == ("10.244.36.0-24",)
