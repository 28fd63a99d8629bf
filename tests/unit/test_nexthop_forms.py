"""Moving between the two route forms (routes on nexthop objects, plain routes) without a
route gap: the plan's conversion in place, the engine's choice from nexthop_compat_mode,
and `pyflannel cleanup-nexthops`' pure plan. On FakeKernel (tests/fakes/kernel.py), which
reports routes on nexthop objects without gateway and device when compat_mode is 0."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from pyflannel.backend.base import DesiredTable
from pyflannel.backend.hostgw import host_gw_peer_state
from pyflannel.lease.model import Lease, LeaseAttrs
from pyflannel.netlink import Nexthop, Op, Route, RtEvent
from pyflannel.nexthop_cleanup import plan_handback
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel.reconcile.plan import NHID_BASE, NHID_SPAN, KernelScope, Observed, plan
from tests.fakes.kernel import FakeKernel

NET = IPv4Network("10.244.0.0/16")
SCOPE = KernelScope(route_oifs=frozenset({2}), networks=(NET,))
GW = IPv4Address("192.168.77.2")


def dst(n: int) -> IPv4Network:
    return IPv4Network(f"10.244.{n}.0/24")


def peer(n: int) -> Lease:
    return Lease(dst(n), LeaseAttrs(public_ip=IPv4Address(f"192.168.77.{n}"),
                                    backend_type="host-gw"))


def table_of(*ns: int) -> DesiredTable:
    t = DesiredTable()
    for n in ns:
        t.put(f"p{n}", host_gw_peer_state(peer(n), 2))
    return t


def drain(k: FakeKernel) -> list[RtEvent]:
    out: list[RtEvent] = []
    while not k._events.empty():
        out += k._events.get_nowait()
    return out


def wanted_prefixes_deleted(events: list[RtEvent], prefixes: set[str]) -> list[str]:
    """Prefixes whose route went away: a route_del, or the deletion of the nexthop a
    route was on (the kernel takes the route along without a notification)."""
    return [str(e.obj.dst) for e in events
            if e.kind == "route_del" and isinstance(e.obj, Route)
            and str(e.obj.dst) in prefixes]


@pytest.mark.parametrize("compat", [True, False])
def test_plain_mode_converts_routes_on_our_nexthops_in_place_then_removes_them(
        compat: bool) -> None:
    ours, foreign = Nexthop(NHID_BASE + 3, GW, 2), Nexthop(77, GW, 2)
    # as a dump shows them: with nexthop_compat_mode 0 no gateway or device
    on_ours = Route(dst(2), GW if compat else None, 2 if compat else None, nhid=ours.id)
    on_foreign = Route(dst(9), GW, 2, nhid=77)
    desired = table_of(2).state
    ops = plan(desired, Observed(routes=[on_ours, on_foreign], nexthops=[ours, foreign]),
               SCOPE, nexthops=False)
    assert ops == [
        Op("replace", Route(dst(2), GW, 2)),  # the plain form replaces it: no delete
        Op("delete", on_foreign),  # in the cluster network on our device, no lease: stale
        Op("delete", ours),  # after the route that used it
    ]


def test_a_route_on_a_nexthop_outside_our_range_and_device_is_not_ours() -> None:
    r = Route(dst(2), None, None, nhid=NHID_BASE + NHID_SPAN)  # compat 0, not our id
    assert not SCOPE.owns_route(r)
    assert SCOPE.owns_route(Route(dst(2), None, None, nhid=NHID_BASE))
    assert not SCOPE.owns_route(Route(IPv4Network("10.9.0.0/24"), None, None, nhid=NHID_BASE))


async def started(k: FakeKernel, table: DesiredTable, *, nexthops: bool = True,
                  compat: bool = True) -> KernelReconciler:
    rec = KernelReconciler(k, SCOPE, nexthops=nexthops,
                           compat_mode=(lambda: k.compat_mode) if compat else None)
    rec.set_desired(table.state)
    await rec.reconcile_once()
    return rec


async def test_compat_mode_0_makes_routes_plain_and_1_brings_nexthops_back(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    k, table = FakeKernel(), table_of(2, 3, 4)
    rec = await started(k, table)
    prefixes = {str(dst(n)) for n in (2, 3, 4)}
    assert all(k.route(p).nhid is not None for p in prefixes)  # type: ignore[union-attr]
    assert len(k.nexthops) == 3
    drain(k)
    k.compat_mode = 0  # someone sets the sysctl while the daemon runs
    await rec.reconcile_once(full=True)  # the safety net looks at it
    events = drain(k)
    assert wanted_prefixes_deleted(events, prefixes) == []
    assert all(k.route(p) == Route(IPv4Network(p), k.route(p).gateway, 2)  # type: ignore
               for p in prefixes)
    assert k.nexthops == {}
    for _ in range(3):
        await rec.reconcile_once(full=True)
    assert caplog.text.count("nexthop_compat_mode is 0") == 1
    k.compat_mode = 1
    drain(k)
    await rec.reconcile_once(full=True)
    assert wanted_prefixes_deleted(drain(k), prefixes) == []
    assert all(k.route(p).nhid is not None for p in prefixes)  # type: ignore[union-attr]
    assert caplog.text.count("nexthop_compat_mode is 1 now") == 1


async def test_start_with_compat_mode_0_never_creates_a_nexthop() -> None:
    k, table = FakeKernel(), table_of(2, 3)
    k.compat_mode = 0
    await started(k, table)
    assert [e for e in drain(k) if isinstance(e.obj, Nexthop)] == []
    assert k.route(str(dst(2))) == Route(dst(2), IPv4Address("192.168.77.2"), 2)


async def test_without_a_compat_probe_nexthop_objects_stay_even_with_compat_0() -> None:
    # (the engine also recognises its routes without gateway: no drift loop)
    k, table = FakeKernel(), table_of(2)
    k.compat_mode = 0
    rec = await started(k, table, compat=False)
    drain(k)
    assert k.route(str(dst(2))).nhid is not None  # type: ignore[union-attr]
    assert await rec.reconcile_once(full=True) == 0


async def test_plain_mode_hands_over_a_node_left_with_nexthop_routes() -> None:
    """PYFLANNEL_NEXTHOP_OBJECTS=off after a default run: every route is converted in
    place and our nexthops are removed; a foreign nexthop stays."""
    k, table = FakeKernel(), table_of(2, 3)
    await started(k, table)
    k.foreign(Op("replace", Nexthop(5, GW, 2)))
    drain(k)
    rec = await started(k, table, nexthops=False)
    events = drain(k)
    assert wanted_prefixes_deleted(events, {str(dst(2)), str(dst(3))}) == []
    assert list(k.nexthops) == [5]
    assert k.route(str(dst(3))) == Route(dst(3), IPv4Address("192.168.77.3"), 2)
    # one of ours appearing later (a daemon of the other mode) goes with the next pass
    k.foreign(Op("replace", Nexthop(NHID_BASE + 9, GW, 2)))
    rec.on_events(drain(k))
    await rec.reconcile_once()
    assert list(k.nexthops) == [5]


def test_handback_converts_what_uses_our_nexthops_and_keeps_the_rest() -> None:
    nh4 = Nexthop(NHID_BASE, GW, 2)
    nh_onlink = Nexthop(NHID_BASE + 1, IPv4Address("10.244.5.0"), 7, onlink=True)
    nh6 = Nexthop(NHID_BASE + 2, IPv6Address("fd77::2"), 2)
    unused = Nexthop(NHID_BASE + 3, GW, 2)
    foreign = Nexthop(5, GW, 2)
    v6 = IPv6Network("fd10:244:0:2::/64")
    routes = [Route(dst(2), None, None, nhid=nh4.id),  # as compat mode 0 shows it
              Route(dst(3), GW, 2, nhid=nh4.id, table=100),
              Route(dst(5), None, None, nhid=nh_onlink.id),
              Route(v6, None, None, nhid=nh6.id, priority=1024),
              Route(dst(9), GW, 2, nhid=foreign.id)]
    hb = plan_handback([nh4, nh_onlink, nh6, unused, foreign], routes, convert=True)
    assert [plain for _was, plain in hb.converts] == [
        Route(dst(2), GW, 2),
        Route(dst(3), GW, 2, table=100),
        Route(dst(5), IPv4Address("10.244.5.0"), 7, onlink=True),  # upstream's vxlan form
        Route(v6, IPv6Address("fd77::2"), 2, priority=1024),
    ]
    assert hb.deletes == [nh4, nh_onlink, nh6, unused] and hb.kept == []
    only = plan_handback([nh4, unused, foreign], routes, convert=False)
    assert only.converts == [] and only.deletes == [unused]
    assert only.kept == [(nh4, routes[:2])]
    blackhole = Nexthop(NHID_BASE + 4, None, None)
    bh = plan_handback([blackhole], [Route(dst(7), None, None, nhid=blackhole.id)],
                       convert=True)
    assert bh.converts == [] and bh.deletes == [] and len(bh.kept) == 1
