"""RouteReconciler: keeps the kernel's routes equal to the desired ones.

The diff is a pure function (`plan_routes`). The reconciler runs it after every lease
change, after a netlink event that contradicts the desired state (someone deleted or
altered one of our routes: repaired within milliseconds), and periodically as a safety
net. It owns exactly the routes in its table, on its interface, whose destination lies
inside the cluster network(s): those that belong to no current lease are removed, which
also clears routes of nodes that left while the daemon was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from pyflannel.netlink import Op, Route, RtEvent, RtNetlink

log = logging.getLogger(__name__)

RTN_UNICAST = 1
LOG_EACH_LIMIT = 50  # route changes logged one by one per pass


@dataclass(frozen=True)
class RouteScope:
    """Which kernel routes this reconciler owns."""

    oif: int
    networks: tuple[IPv4Network | IPv6Network, ...]
    table: int = 254

    def owns(self, r: Route) -> bool:
        return (
            r.table == self.table
            and r.oif == self.oif
            and r.type == RTN_UNICAST
            and any(r.dst.version == n.version and r.dst.subnet_of(n)  # type: ignore[arg-type]
                    for n in self.networks)
        )

    @property
    def families(self) -> tuple[int, ...]:
        fams = {socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in self.networks}
        return tuple(sorted(fams))


def same_route(a: Route, b: Route) -> bool:
    """Upstream's routeEqual (dst, gateway, oif) plus the onlink flag vxlan relies on."""
    return a.dst == b.dst and a.gateway == b.gateway and a.oif == b.oif and a.onlink == b.onlink


def plan_routes(desired: Mapping[str, Route], observed: Iterable[Route],
                scope: RouteScope) -> list[Op]:
    """Replace what is missing or different, delete what we own but nobody wants."""
    ops: list[Op] = []
    seen: set[str] = set()
    for r in observed:
        if not scope.owns(r):
            continue
        key = str(r.dst)
        want = desired.get(key)
        if want is None:
            ops.append(Op("delete", r))
        elif key in seen:
            # A second route for the same prefix (another metric): not ours to keep.
            ops.append(Op("delete", r))
        else:
            seen.add(key)
            if not same_route(want, r):
                ops.append(Op("replace", want))
    ops.extend(Op("replace", want) for key, want in desired.items() if key not in seen)
    return ops


@dataclass
class ReconcileStats:
    """Counters the metrics endpoint and the status command read."""

    runs: int = 0
    replaced: int = 0
    deleted: int = 0
    drift_repairs: int = 0
    failures: int = 0
    last_duration: float = 0.0
    last_success: float = 0.0
    programmed: int = 0
    unreachable: set[str] = field(default_factory=set)


class RouteReconciler:
    """Drives plan_routes against a live RtNetlink socket."""

    def __init__(self, nl: RtNetlink, scope: RouteScope, *, resync_interval: float = 10.0,
                 debounce: float = 0.02) -> None:
        self.nl = nl
        self.scope = scope
        self.resync_interval = resync_interval
        self.debounce = debounce
        self.stats = ReconcileStats()
        self._desired: dict[str, Route] = {}
        self._dirty = asyncio.Event()
        self._have_desired = False
        self._drift_pending = False
        self.in_sync = asyncio.Event()

    # -- inputs -------------------------------------------------------------------------

    def set_desired(self, routes: Mapping[str, Route]) -> None:
        self._desired = dict(routes)
        self._have_desired = True
        self.in_sync.clear()
        self._dirty.set()

    def mark_dirty(self, *, drift: bool = False) -> None:
        self._drift_pending = self._drift_pending or drift
        self._dirty.set()

    def on_events(self, events: Sequence[RtEvent]) -> None:
        """React to kernel notifications; only contradictions trigger a pass, so the
        echo of our own changes costs nothing."""
        for ev in events:
            if ev.kind == "overflow":
                log.warning("netlink event queue overflowed; doing a full route resync")
                self.mark_dirty(drift=True)
                return
            r = ev.obj
            if not isinstance(r, Route) or ev.kind not in ("route_new", "route_del"):
                continue
            key = str(r.dst)
            want = self._desired.get(key)
            if ev.kind == "route_del":
                if want is not None and same_route(want, r):
                    log.info("Route to %s via %s was deleted by someone else; restoring it",
                             r.dst, r.gateway)
                    self.mark_dirty(drift=True)
                    return
            elif self.scope.owns(r) and (want is None or not same_route(want, r)):
                log.info("Route to %s via %s was added by someone else; reconciling", r.dst,
                         r.gateway)
                self.mark_dirty(drift=True)
                return

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):  # a timeout means: periodic safety-net pass
                await asyncio.wait_for(self._dirty.wait(), timeout=self.resync_interval)
            if not self._have_desired:
                self._dirty.clear()
                continue
            # Coalesce bursts (a snapshot, a flurry of events) into one pass.
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            drift, self._drift_pending = self._drift_pending, False
            try:
                await self.reconcile_once(drift=drift)
            except OSError as e:
                self.stats.failures += 1
                log.error("Route reconcile failed: %s (retrying in 1 s)", e)
                await asyncio.sleep(1)
                self._dirty.set()

    async def observed(self) -> list[Route]:
        out: list[Route] = []
        for fam in self.scope.families:
            async for r in self.nl.dump_routes(fam, table=self.scope.table):
                if self.scope.owns(r):
                    out.append(r)
        return out

    async def reconcile_once(self, *, drift: bool = False) -> int:
        """One full pass; returns the number of changes applied."""
        start = time.monotonic()
        desired = self._desired
        ops = plan_routes(desired, await self.observed(), self.scope)
        unreachable: set[str] = set()
        changed = 0
        if ops:
            results = await self.nl.apply(ops)
            logged = 0
            for res in results:
                r = res.op.obj
                assert isinstance(r, Route)
                if res.errno == 0:
                    changed += 1
                    # One line per route as upstream, but a start-up against thousands of
                    # peers logs a summary instead of flooding the log (and the CPU).
                    logged += 1
                    verbose = logged <= LOG_EACH_LIMIT or log.isEnabledFor(logging.DEBUG)
                    if res.op.action == "replace":
                        self.stats.replaced += 1
                        if verbose:
                            log.info("Subnet added: %s via %s", r.dst, r.gateway)
                    else:
                        self.stats.deleted += 1
                        if verbose:
                            log.info("Removed stale route to %s via %s", r.dst, r.gateway)
                elif res.op.action == "delete" and res.errno in (errno.ESRCH, errno.ENOENT):
                    continue  # already gone: that is what we wanted
                elif res.op.action == "replace" and res.errno in (errno.ENETUNREACH,
                                                                    errno.EHOSTUNREACH):
                    unreachable.add(str(r.dst))
                    if str(r.dst) not in self.stats.unreachable:
                        log.warning(
                            "Error adding route to %s: peer %s is not reachable on this node's "
                            "L2 segment (host-gw needs direct layer-2 connectivity between "
                            "nodes; use vxlan, or vxlan with DirectRouting, across routers). "
                            "Will retry.", r.dst, r.gateway)
                else:
                    self.stats.failures += 1
                    log.error("Error %s route to %s: %s", "adding" if res.op.action ==
                              "replace" else "deleting", r.dst, os.strerror(res.errno))
            if changed > LOG_EACH_LIMIT and not log.isEnabledFor(logging.DEBUG):
                log.info("... and %d more route changes (%d in this pass; -v=2 lists each)",
                         changed - LOG_EACH_LIMIT, changed)
        for key in self.stats.unreachable - unreachable:
            if key in desired:
                log.info("Route to %s recovered: peer reachable again", key)
        self.stats.unreachable = unreachable
        if drift and changed:
            self.stats.drift_repairs += changed
        self.stats.runs += 1
        self.stats.programmed = len(desired) - len(unreachable)
        self.stats.last_duration = time.monotonic() - start
        self.stats.last_success = time.time()
        if desired is self._desired and not self._dirty.is_set():
            self.in_sync.set()
        return changed
