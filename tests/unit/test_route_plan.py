"""The pure part of reconciliation: per-peer desired state and the diff against the kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Network

from hypothesis import given
from hypothesis import strategies as st

from pyflannel.backend.base import DesiredTable
from pyflannel.backend.hostgw import host_gw_peer_state
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.netlink import FdbEntry, Neighbour, Nexthop, Op, Route
from pyflannel.reconcile.plan import (
    NHID_BASE,
    DesiredState,
    KernelScope,
    Observed,
    plan,
)

NET = IPv4Network("10.244.0.0/16")
SCOPE = KernelScope(route_oifs=frozenset({2}), networks=(NET,),
                    neighbour_ifindexes=frozenset({9}))


def lease(third: int, gw: str) -> Lease:
    return Lease(IPv4Network(f"10.244.{third}.0/24"),
                 LeaseAttrs(public_ip=IPv4Address(gw), backend_type="host-gw"))


def route(third: int, gw: str, oif: int = 2, **kw: object) -> Route:
    return Route(dst=IPv4Network(f"10.244.{third}.0/24"), gateway=IPv4Address(gw), oif=oif,
                 **kw)  # type: ignore[arg-type]


def desired_of(*leases: Lease) -> DesiredState:
    t = DesiredTable()
    for le in leases:
        t.put(le.key, host_gw_peer_state(le, 2))
    return t.state


def test_peer_state_is_one_route_via_the_public_ip() -> None:
    assert host_gw_peer_state(lease(1, "192.168.1.11"), 2).routes == (route(1, "192.168.1.11"),)


def test_plan_adds_missing_replaces_wrong_deletes_stale_and_ignores_foreign() -> None:
    desired = desired_of(lease(1, "192.168.1.11"), lease(2, "192.168.1.12"),
                         lease(3, "192.168.1.13"))
    observed = Observed(routes=[
        route(1, "192.168.1.11"),                 # correct: untouched
        route(2, "192.168.1.99"),                 # wrong gateway: replaced
        route(9, "192.168.1.19"),                 # no lease: stale, deleted
        route(8, "192.168.1.18", oif=7),          # another interface: not ours
        Route(dst=IPv4Network("10.1.0.0/16"), gateway=IPv4Address("192.168.1.1"), oif=2),
    ])
    ops = plan(desired, observed, SCOPE, nexthops=False)
    assert [(o.action, str(o.obj.dst)) for o in ops] == [  # type: ignore[union-attr]
        ("replace", "10.244.2.0/24"), ("replace", "10.244.3.0/24"),
        ("delete", "10.244.9.0/24")]


def test_plan_is_empty_when_in_sync() -> None:
    desired = desired_of(*(lease(i, f"192.168.1.{i}") for i in range(1, 50)))
    assert plan(desired, Observed(routes=list(desired.routes.values())), SCOPE,
                nexthops=False) == []


def test_nexthop_mode_creates_nexthops_before_routes_and_reuses_existing_ones() -> None:
    desired = desired_of(lease(1, "192.168.1.11"), lease(2, "192.168.1.12"))
    existing = Nexthop(NHID_BASE, IPv4Address("192.168.1.11"), 2)
    stale = Nexthop(NHID_BASE + 5, IPv4Address("192.168.1.99"), 2)
    foreign = Nexthop(7, IPv4Address("192.168.1.12"), 2)  # not in our id range
    ops = plan(desired, Observed(nexthops=[existing, stale, foreign]), SCOPE, nexthops=True)
    kinds = [(o.action, type(o.obj).__name__) for o in ops]
    assert kinds == [("replace", "Nexthop"), ("replace", "Route"), ("replace", "Route"),
                     ("delete", "Nexthop")]
    new_nh = ops[0].obj
    assert isinstance(new_nh, Nexthop) and new_nh.id == NHID_BASE + 1
    assert new_nh.gateway == IPv4Address("192.168.1.12")
    nhids = {str(o.obj.dst): o.obj.nhid for o in ops if isinstance(o.obj, Route)}
    assert nhids == {"10.244.1.0/24": NHID_BASE, "10.244.2.0/24": NHID_BASE + 1}
    assert ops[-1].obj == stale


def test_nexthop_mode_converts_classic_routes_and_is_stable() -> None:
    desired = desired_of(lease(1, "192.168.1.11"))
    ops = plan(desired, Observed(routes=[route(1, "192.168.1.11")]), SCOPE, nexthops=True)
    assert [type(o.obj).__name__ for o in ops] == ["Nexthop", "Route"]
    nh = ops[0].obj
    assert isinstance(nh, Nexthop)
    # as the kernel dumps it afterwards: gateway/oif filled in from the nexthop
    in_kernel = route(1, "192.168.1.11", nhid=nh.id)
    assert plan(desired, Observed(routes=[in_kernel], nexthops=[nh]), SCOPE,
                nexthops=True) == []


def test_vxlan_objects_in_order_and_stale_ones_removed() -> None:
    mac = "0a:58:0a:f4:02:00"
    want = DesiredState(
        routes={"10.244.2.0/24": Route(IPv4Network("10.244.2.0/24"), IPv4Address("10.244.2.0"),
                                       9, onlink=True)},
        neighbours={(9, "10.244.2.0"): Neighbour(9, IPv4Address("10.244.2.0"), mac)},
        fdb={(9, mac): FdbEntry(9, mac, IPv4Address("192.168.1.12"))})
    observed = Observed(
        neighbours=[Neighbour(9, IPv4Address("10.244.3.0"), "0a:58:0a:f4:03:00"),
                    Neighbour(4, IPv4Address("10.1.1.1"), "aa:bb:cc:dd:ee:ff")],  # foreign dev
        fdb=[FdbEntry(9, mac, IPv4Address("192.168.1.99"))])  # wrong remote
    ops = plan(want, observed, KernelScope(route_oifs=frozenset({9}), networks=(NET,),
                                           neighbour_ifindexes=frozenset({9})), nexthops=False)
    assert [(o.action, type(o.obj).__name__) for o in ops] == [
        ("replace", "Neighbour"), ("replace", "FdbEntry"), ("replace", "Route"),
        ("delete", "Neighbour")]


routes_strategy = st.dictionaries(st.integers(0, 255), st.integers(1, 254), max_size=40)


@given(want=routes_strategy, have=routes_strategy, nexthops=st.booleans())
def test_applying_the_plan_yields_the_desired_state(want: dict[int, int], have: dict[int, int],
                                                    nexthops: bool) -> None:
    desired = desired_of(*(lease(k, f"192.168.1.{v}") for k, v in want.items()))
    kernel = {str(r.dst): r for r in (route(k, f"192.168.1.{v}") for k, v in have.items())}
    nhs: dict[int, Nexthop] = {}
    for op in plan(desired, Observed(routes=list(kernel.values())), SCOPE, nexthops=nexthops):
        assert isinstance(op, Op)
        o = op.obj
        if isinstance(o, Nexthop):
            if op.action == "replace":
                nhs[o.id] = o
            else:
                nhs.pop(o.id)
        elif isinstance(o, Route):
            if op.action == "replace":
                if o.nhid is not None:  # what the kernel reports back
                    nh = nhs[o.nhid]
                    o = Route(o.dst, nh.gateway, nh.oif, nhid=o.nhid)
                kernel[str(o.dst)] = o
            else:
                kernel.pop(str(o.dst))
    assert {k: (r.gateway, r.oif) for k, r in kernel.items()} == {
        k: (r.gateway, r.oif) for k, r in desired.routes.items()}
    # and a second plan has nothing left to do
    assert plan(desired, Observed(routes=list(kernel.values()), nexthops=list(nhs.values())),
                SCOPE, nexthops=nexthops) == []


def test_net_key_is_str() -> None:
    import random

    from pyflannel.reconcile.plan import net_key

    rnd = random.Random(4)
    for _ in range(5000):
        n4 = IPv4Network((rnd.getrandbits(32), rnd.randint(0, 32)), strict=False)
        n6 = IPv6Network((rnd.getrandbits(128), rnd.randint(0, 128)), strict=False)
        assert net_key(n4) == str(n4) and net_key(n6) == str(n6)
