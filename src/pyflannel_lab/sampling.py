"""Watching a lab cluster's routes during a fault, from a thread: a route that goes
missing for a moment between two checks of a test would go unseen otherwise."""

from __future__ import annotations

import asyncio
import socket
import threading

from pyflannel.netlink import Nexthop, Route, RtMonitor, RtNetlink
from pyflannel_lab.cluster import Cluster


class RouteSampler:
    """Every `interval` seconds, each node's flannel routes are compared with `expected`
    (node index -> (subnet, gateway) routes); every route missing at a sample is recorded
    in `missing`. Use as a context manager around the fault."""

    def __init__(self, cl: Cluster, expected: dict[int, set[tuple[str, str]]],
                 interval: float = 0.2) -> None:
        self.cl = cl
        self.expected = expected
        self.interval = interval
        self.samples = 0
        self.missing: list[tuple[str, set[tuple[str, str]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="route-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for idx, want in self.expected.items():
                lost = want - self.cl.flannel_routes(self.cl.nodes[idx])
                if lost:
                    self.missing.append((f"node{idx}", lost))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RouteSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RouteGapWatch:
    """Every change to one node's routes and nexthop objects, from its netlink
    notifications (in order, none missed: an overflow is recorded as a gap), checked
    against `prefixes`: a route to one of them deleted (RTM_DELROUTE), or the nexthop
    object a route to one of them uses deleted (the kernel removes such IPv4 routes with
    no notification of their own), is a gap. A replace (the atomic kind) is none. A
    thread with its own event loop; use as a context manager around the change. Beside
    it, `dumps` route dumps are taken back to back and `dump_misses` counts those that
    lacked one of the prefixes."""

    def __init__(self, netns: str, prefixes: set[str]) -> None:
        self.netns = netns
        self.prefixes = set(prefixes)
        self.gaps: list[str] = []
        self.changes = 0  # notifications about the watched prefixes' routes
        self.forms: dict[str, set[str]] = {p: set() for p in prefixes}  # "nhid"/"plain" seen
        self.dumps = 0
        self.dump_misses = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="route-gap-watch", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # handed to the test by __exit__
            self._error = e
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        with RtMonitor.open(self.netns, routes=True, nexthops=True) as mon, \
                RtNetlink.open(self.netns) as nl:
            on: dict[str, int | None] = {}  # watched prefix -> the nexthop its route uses
            for fam in (socket.AF_INET, socket.AF_INET6):
                async for r in nl.dump_routes(fam):
                    if str(r.dst) in self.prefixes:
                        on[str(r.dst)] = r.nhid
            if set(on) != self.prefixes:
                raise AssertionError(f"no route to {sorted(self.prefixes - set(on))} to watch")
            for p, nhid in on.items():
                self.forms[p].add("plain" if nhid is None else "nhid")
            self._ready.set()
            events = asyncio.ensure_future(self._events(mon, on))
            dumps = asyncio.ensure_future(self._dumps(nl))
            await self._stop.wait()
            await asyncio.sleep(0.2)  # the last notifications
            for t in (events, dumps):
                t.cancel()
            await asyncio.gather(events, dumps, return_exceptions=True)

    async def _events(self, mon: RtMonitor, on: dict[str, int | None]) -> None:
        async for batch in mon.events():
            for ev in batch:
                o = ev.obj
                if ev.kind == "overflow":
                    self.gaps.append("notifications lost (overflow): cannot tell")
                elif isinstance(o, Route) and str(o.dst) in self.prefixes and o.table == 254:
                    self.changes += 1
                    if ev.kind == "route_del":
                        self.gaps.append(f"route to {o.dst} deleted")
                        on[str(o.dst)] = None
                    else:
                        on[str(o.dst)] = o.nhid
                        self.forms[str(o.dst)].add("plain" if o.nhid is None else "nhid")
                elif isinstance(o, Nexthop) and ev.kind == "nexthop_del":
                    self.gaps += [f"nexthop {o.id} deleted under the route to {p}"
                                  for p, nhid in on.items() if nhid == o.id]

    async def _dumps(self, nl: RtNetlink) -> None:
        while True:
            seen = set()
            for fam in (socket.AF_INET, socket.AF_INET6):
                async for r in nl.dump_routes(fam):
                    seen.add(str(r.dst))
            self.dumps += 1
            if not self.prefixes <= seen:
                self.dump_misses += 1
            await asyncio.sleep(0.001)

    def __enter__(self) -> RouteGapWatch:
        self._thread.start()
        self._ready.wait(20)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        if self._error is not None and exc[0] is None:
            raise self._error
