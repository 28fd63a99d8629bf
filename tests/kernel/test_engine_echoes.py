"""The engine's own changes, seen coming back as notifications from the real kernel, are
recognised as its echoes (by the port id the kernel names, or by what the engine
remembered for the kinds the kernel sends without one) and taken in at no cost, while a
change made with `ip` is not."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from ipaddress import IPv4Network

import pytest

from pyflannel.backend.base import DesiredTable
from pyflannel.kernel.netlink_ports import NetlinkRoutePort
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel.reconcile.plan import DesiredState, KernelScope
from pyflannel_lab.netns import NetNamespace
from tests.kernel.vxlan_node import peer, public, subnet, vxlan
from tests.waiting import until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2"),
]

PEERS = 200


async def test_the_engines_own_changes_are_not_counted_as_foreign(
        netns: NetNamespace) -> None:
    """200 vxlan peers (nexthop, route, neighbour, FDB entry each) added, 50 moved to
    another node address, then all removed: about 1,500 notifications, none counted.
    After each step a foreign route (outside our networks) follows our notifications
    and is the only one counted: the kernel reports in order, so ours were all seen."""
    vx = vxlan(netns)
    scope = KernelScope(route_oifs=frozenset({vx}), networks=(IPv4Network("10.0.0.0/8"),),
                        neighbour_ifindexes=frozenset({vx}))
    port = NetlinkRoutePort.open(netns.name)
    rec = KernelReconciler(port, scope, nexthops=True)
    table = DesiredTable()
    for i in range(PEERS):
        table.put(f"p{i}", peer(vx, i))
    rec.set_desired(table.state)
    run = asyncio.create_task(rec.run())
    try:
        foreign = 0

        async def step(check: str) -> None:
            nonlocal foreign
            await until(lambda: check in netns.ip("-4", "route", "show").stdout
                        or check in netns.run("bridge", "fdb", "show").stdout, check, 10)
            foreign += 1
            netns.ip("route", "add", f"172.31.{foreign}.0/24", "dev", "v0")
            await until(lambda: rec._events_seen >= foreign, "the foreign route", 10)
            await asyncio.sleep(0.05)  # nothing later may count either
            assert rec._events_seen == foreign

        await step(f"{subnet(PEERS - 1)} nhid")
        for i in range(50):
            table.put(f"p{i}", peer(vx, i, moved=True))
        rec.mark_dirty()
        await step(f"dst {public(49, moved=True)} ")
        rec.set_desired(DesiredState())
        await until(lambda: "nhid" not in netns.ip("-4", "route", "show").stdout
                    and not netns.ip("neigh", "show", "dev", "flannel.1").stdout.strip(),
                    "all peers removed", 10)
        await step("172.31.")
        assert rec.stats.drift_repairs == 0
        assert " dst " not in netns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
        port.close()
