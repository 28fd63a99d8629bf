"""The engine's safety net (a dump compared with the cache as it streams in) on the real
kernel: changes made behind the engine's back, with no notification reaching it, are
found and repaired, with one dump when nothing cached is missing and two when something is.
What the kernel holds is read with `ip`, not with our decoder."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Collection
from ipaddress import IPv4Address, IPv4Network

import pytest

from pyflannel.kernel.netlink_ports import NetlinkRoutePort
from pyflannel.kernel.ports import DUMP_KINDS, Owned
from pyflannel.netlink import Route
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel.reconcile.plan import DesiredState, KernelScope
from pyflannel_lab.netns import NetNamespace

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
                      kinds: Collection[str] = DUMP_KINDS) -> AsyncIterator[Owned]:
        nonlocal dumps
        dumps += "routes" in kinds  # a whole dump, or a check's, begins with the routes
        async for o in real(s, nexthops=nexthops, kinds=kinds):
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
