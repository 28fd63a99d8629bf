"""The engine's safety net (a dump compared with the cache as it streams in) on the real
kernel: changes made behind the engine's back, with no notification reaching it, are
found and repaired, with one dump when nothing cached is missing and two when something is.
What the kernel holds is read with `ip`, not with our decoder."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.backend.base import DesiredTable, PeerState
from pyflannel.kernel.netlink_ports import NetlinkRoutePort
from pyflannel.kernel.ports import DUMP_KINDS, Keyed, Owned
from pyflannel.netlink import Route, RtMonitor
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel.reconcile.plan import DesiredState, KernelScope
from pyflannel_lab.netns import NetNamespace
from tests.kernel.vxlan_node import mac, peer, vxlan

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2"),
]


def routes(ns: NetNamespace) -> set[str]:
    out = ns.ip("-4", "route", "show", "dev", "v0").stdout
    return {line.split(" proto")[0] for line in out.splitlines() if line.startswith("10.244.")}


async def test_changes_nobody_was_told_of_are_found_by_the_next_check(
        netns: NetNamespace) -> None:
    netns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    netns.ip("addr", "add", "192.168.0.1/24", "dev", "v0")
    netns.ip("link", "set", "v0", "up")
    netns.ip("link", "set", "v1", "up")
    v0 = int(netns.ip("-o", "link", "show", "v0").stdout.split(":", 1)[0])
    scope = KernelScope(route_oifs=frozenset({v0}), networks=(IPv4Network("10.244.0.0/16"),))
    want = {f"10.244.{n}.0/24": Route(IPv4Network(f"10.244.{n}.0/24"),
                                      IPv4Address(f"192.168.0.{n}"), v0)
            for n in range(2, 42)}
    expected = {f"{k} nhid" for k in want}  # (`ip` shows the nexthop id after it)
    # no notifications: only the checks can see what happens behind the engine's back
    port = NetlinkRoutePort.open(netns.name, events=False)
    dumps = 0
    real = port.dump

    async def counted(s: KernelScope, *, nexthops: bool,
                      kinds: Collection[str] = DUMP_KINDS,
                      only: Sequence[Keyed] = ()) -> AsyncIterator[Owned]:
        nonlocal dumps
        dumps += "routes" in kinds and not only  # a whole dump, or a check's, begins
        # with the routes
        async for o in real(s, nexthops=nexthops, kinds=kinds, only=only):
            yield o

    port.dump = counted  # type: ignore[method-assign]
    try:
        rec = KernelReconciler(port, scope, nexthops=True)
        rec.set_desired(DesiredState(routes=dict(want)))
        await rec.reconcile_once()
        assert dumps == 1 and {" ".join(r.split()[:2]) for r in routes(netns)} == expected

        await rec.reconcile_once(full=True)  # nothing differs: one dump, nothing repaired
        assert dumps == 2 and rec.stats.cache_repairs == 0

        # a foreign route to a prefix of ours, a gateway moved: both listed, one dump
        netns.ip("route", "add", "10.244.200.0/24", "via", "192.168.0.200", "dev", "v0")
        netns.ip("route", "replace", "10.244.3.0/24", "via", "192.168.0.250", "dev", "v0")
        await rec.reconcile_once(full=True)
        assert dumps == 3 and rec.stats.cache_repairs == 2
        assert {" ".join(r.split()[:2]) for r in routes(netns)} == expected
        assert not any(r.startswith("10.244.200.") for r in routes(netns))

        # a route gone: not in the dump, so counted as missing, and a second dump says which
        netns.ip("route", "del", "10.244.7.0/24")
        await rec.reconcile_once(full=True)
        assert dumps == 5 and rec.stats.cache_repairs == 3
        assert {" ".join(r.split()[:2]) for r in routes(netns)} == expected
    finally:
        port.close()


async def test_a_lease_event_during_a_check_is_in_the_kernel_before_the_check_ends(
        netns: NetNamespace) -> None:
    """4,000 peers (routes on nexthop objects): a check begins; a task of its own, as the
    daemon's lease watch is, puts a new peer once the routes listing has begun. The new
    route's notification arrives while the check is still listing (the dump lets the loop
    run, and the engine applies the event between two objects), and nothing is repaired."""
    netns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    netns.ip("addr", "add", "192.168.0.1/16", "dev", "v0")
    netns.ip("link", "set", "v0", "up")
    netns.ip("link", "set", "v1", "up")
    v0 = int(netns.ip("-o", "link", "show", "v0").stdout.split(":", 1)[0])
    scope = KernelScope(route_oifs=frozenset({v0}), networks=(IPv4Network("10.0.0.0/8"),))

    def peer(i: int) -> PeerState:
        return PeerState(routes=(Route(IPv4Network((0x0A000000 + (i << 8), 24)),
                                       IPv4Address(0xC0A80000 + 2 + i), v0),))

    table = DesiredTable()
    for i in range(4000):
        table.put(f"p{i}", peer(i))
    new = IPv4Network((0x0A000000 + (5000 << 8), 24))
    port = NetlinkRoutePort.open(netns.name, events=False)
    listed = 0
    real = port.dump
    listing = asyncio.Event()

    async def watched(s: KernelScope, *, nexthops: bool,
                      kinds: Collection[str] = DUMP_KINDS,
                      only: Sequence[Keyed] = ()) -> AsyncGenerator[Owned, None]:
        nonlocal listed
        async for o in real(s, nexthops=nexthops, kinds=kinds, only=only):
            listed += 1
            listing.set()
            yield o

    async def lease_event() -> None:
        await listing.wait()
        table.put("p5000", peer(5000))
        rec.set_desired(table.state)

    try:
        rec = KernelReconciler(port, scope, nexthops=True)
        rec.set_desired(table.state)
        await rec.reconcile_once()
        with RtMonitor.open(netns.name, routes=True) as mon:
            port.dump = watched  # type: ignore[method-assign]
            event = asyncio.create_task(lease_event())
            seen_at: list[int] = []

            async def watch() -> None:
                async for batch in mon.events():
                    if any(isinstance(e.obj, Route) and e.obj.dst == new for e in batch):
                        seen_at.append(listed)
                        return

            watcher = asyncio.create_task(watch())
            await rec.reconcile_once(full=True)
            await asyncio.wait_for(watcher, 5)
            await event
        total = listed
        assert seen_at and seen_at[0] < total // 2, (seen_at, total)
        assert rec.stats.cache_repairs == 0
        assert any(line.startswith(f"{new} nhid") for line in
                   netns.ip("-4", "route", "show", "dev", "v0").stdout.splitlines())
    finally:
        port.close()


async def test_peers_leaving_during_a_checks_fdb_listing_need_no_hold(
        netns: NetNamespace) -> None:
    """2,000 vxlan peers. While a check lists the FDB entries, 40 peers leave: their
    objects are deleted at once, between two listed entries. The kernel lists FDB entries
    by position, so the rest of that listing may skip others (one per deletion before
    the resume point, measured on Linux 6.18). The check asks the kernel for what it did
    not show, by key: nothing is taken for missing, no full copy is listed, and the next
    check does not hold events while it lists the FDB entries."""
    vx = vxlan(netns)
    scope = KernelScope(route_oifs=frozenset({vx}), networks=(IPv4Network("10.0.0.0/8"),),
                        neighbour_ifindexes=frozenset({vx}))
    table = DesiredTable()
    for i in range(2000):
        table.put(f"p{i}", peer(vx, i))
    port = NetlinkRoutePort.open(netns.name, events=False)
    real = port.dump
    listings: list[str] = []
    asked: list[Keyed] = []

    async def watched(s: KernelScope, *, nexthops: bool,
                      kinds: Collection[str] = DUMP_KINDS,
                      only: Sequence[Keyed] = ()) -> AsyncGenerator[Owned, None]:
        listings.append("by key" if only else ",".join(kinds))
        asked.extend(only)
        listed = 0
        async for o in real(s, nexthops=nexthops, kinds=kinds, only=only):
            listed += 1
            if tuple(kinds) == ("fdb",) and listed == 600 and not only:
                for i in range(0, 2000, 50):
                    table.remove(f"p{i}")
                rec.set_desired(table.state)  # applied before the listing's next entry
            yield o

    try:
        rec = KernelReconciler(port, scope, nexthops=True)
        rec.set_desired(table.state)
        await rec.reconcile_once()
        port.dump = watched  # type: ignore[method-assign]
        await rec.reconcile_once(full=True)
        assert listings[:4] == list(DUMP_KINDS)
        assert listings[4:] in ([], ["by key"])  # and no full copy after
        assert rec.stats.cache_repairs == 0 and rec._hold_kinds == set()
        assert len(asked) < 100, len(asked)  # what the listing skipped over, not all
        fdb = netns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        macs = {line.split()[0] for line in fdb.splitlines() if " dst " in line}
        assert macs == {mac(i) for i in range(2000) if i % 50}
    finally:
        port.close()
