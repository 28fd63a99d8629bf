"""The running half of reconciliation: KernelReconciler keeps the kernel's routes,
nexthops, neighbours and FDB entries equal to the desired ones, through a RoutePort.

It runs `plan` (reconcile/plan.py, pure) after every change of the desired state, after a
netlink event that contradicts it (someone deleted or altered one of our objects: drift,
repaired within milliseconds), and periodically as a safety net. The traffic rules ride on
the same driver (`RuleSync`): ensured at start and every --iptables-resync seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pyflannel.kernel.ports import RoutePort
from pyflannel.netlink import (
    RTN_BLACKHOLE,
    RTN_UNICAST,
    FdbEntry,
    Neighbour,
    Nexthop,
    Op,
    OpResult,
    Route,
    RtEvent,
)
from pyflannel.reconcile.plan import (
    IPV6_DEFAULT_METRIC,
    NHID_BASE,
    NHID_SPAN,
    DesiredState,
    KernelScope,
    Observed,
    fdb_key,
    neighbour_key,
    plan,
    same_neighbour,
)
from pyflannel.traffic import TrafficConfig, TrafficRules

log = logging.getLogger(__name__)

LOG_EACH_LIMIT = 50  # changes logged one by one per pass; beyond that, a summary
DRIFT_LOG_LIMIT = 10  # drift events logged one by one per netlink batch
# How long after a change its notification counts as our own echo (they arrive within
# milliseconds; the window only bounds what a lost notification leaves behind).
ECHO_WINDOW = 2.0
ECHO_MAX = 200_000
UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)
GONE = (errno.ESRCH, errno.ENOENT)

LinkHook = Callable[[list[RtEvent]], Awaitable[None]]


@dataclass
class RuleSync:
    """The traffic rules, ensured by the engine every `interval` seconds."""

    rules: TrafficRules
    cfg: TrafficConfig
    interval: float
    on_repair: Callable[[], None] | None = None


def _signature(deleted: bool, obj: object) -> tuple[object, ...]:
    """What identifies a change and its notification alike."""
    if isinstance(obj, Route):
        return (deleted, "route", obj.dst, obj.table, obj.gateway, obj.oif, obj.type)
    if isinstance(obj, Nexthop):
        return (deleted, "nexthop", obj.id)
    if isinstance(obj, Neighbour):
        return (deleted, "neigh", obj.ifindex, obj.ip, obj.lladdr.lower() if not deleted else "")
    if isinstance(obj, FdbEntry):
        return (deleted, "fdb", obj.ifindex, obj.lladdr.lower())
    return (deleted, type(obj).__name__)


def _route_text(r: Route) -> str:
    kind = {RTN_UNICAST: ""}.get(r.type, f"type {r.type} ")
    nh = f" nhid {r.nhid}" if r.nhid is not None else ""
    return f"{kind}via {r.gateway} dev #{r.oif}{nh} metric {r.priority}"


@dataclass
class ReconcileStats:
    """Counters the metrics endpoint and the status command read."""

    runs: int = 0
    changes: int = 0
    drift_repairs: int = 0
    failures: int = 0
    last_duration: float = 0.0
    last_success: float = 0.0
    routes: int = 0
    neighbours: int = 0
    fdb: int = 0
    unreachable: set[str] = field(default_factory=set)


def _describe(op: Op) -> str:
    o = op.obj
    if isinstance(o, Route):
        return f"route to {o.dst} via {o.gateway}"
    if isinstance(o, Nexthop):
        return f"nexthop {o.id} via {o.gateway}"
    if isinstance(o, Neighbour):
        return f"neighbour {o.ip} lladdr {o.lladdr}"
    return f"fdb entry {o.lladdr} dst {o.dst}"


class KernelReconciler:
    """Drives `plan` against a RoutePort. `nexthops`: use nexthop objects (the daemon reads
    PYFLANNEL_NEXTHOP_OBJECTS once); a kernel without them falls back by itself."""

    def __init__(self, port: RoutePort, scope: KernelScope, *, resync_interval: float = 10.0,
                 debounce: float = 0.02, nexthops: bool = True,
                 rules: RuleSync | None = None) -> None:
        self.port = port
        self.scope = scope
        self.resync_interval = resync_interval
        self.debounce = debounce
        self.nexthops = nexthops
        self.rules = rules
        self.on_links: LinkHook | None = None
        self.stats = ReconcileStats()
        self.on_pass: Callable[[ReconcileStats], None] | None = None
        self._desired = DesiredState()
        self._dirty = asyncio.Event()
        self._have_desired = False
        self._drift_pending = False
        self._echo: dict[tuple[object, ...], float] = {}  # change signature -> deadline
        self._failing: dict[tuple[object, ...], int] = {}  # op signature -> errno logged

    # -- inputs -------------------------------------------------------------------------

    def set_desired(self, desired: DesiredState) -> None:
        """Takes ownership of `desired` (no copy: the caller builds a new one or keeps
        mutating this one between passes)."""
        self._desired = desired
        self._have_desired = True
        self._dirty.set()

    def set_scope(self, scope: KernelScope) -> None:
        self.scope = scope
        self._dirty.set()

    def mark_dirty(self, *, drift: bool = False) -> None:
        self._drift_pending = self._drift_pending or drift
        self._dirty.set()

    def on_events(self, events: Sequence[RtEvent]) -> None:
        """React to kernel notifications. The echo of our own changes is recognised and
        costs nothing; anything else that contradicts the desired state is drift: logged
        once per change and repaired by a pass right away."""
        now = time.monotonic()
        drifts = 0
        for ev in events:
            if self._is_echo(ev, now):
                continue
            reason = self._contradiction(ev)
            if reason:
                drifts += 1
                if drifts <= DRIFT_LOG_LIMIT:
                    log.warning("Drift: %s; repairing", reason)
        if drifts > DRIFT_LOG_LIMIT:
            log.warning("Drift: ... and %d more changes in this batch", drifts - DRIFT_LOG_LIMIT)
        if drifts:
            self.mark_dirty(drift=True)

    def _is_echo(self, ev: RtEvent, now: float) -> bool:
        if not self._echo or ev.obj is None:
            return False
        sig = _signature(ev.kind.endswith("_del"), ev.obj)
        deadline = self._echo.pop(sig, None)
        return deadline is not None and deadline >= now

    def _expect_echoes(self, results: Iterable[OpResult]) -> None:
        """Remember what we just changed, so its notifications are not taken for drift."""
        deadline = time.monotonic() + ECHO_WINDOW
        if len(self._echo) > ECHO_MAX:
            self._echo.clear()
        for res in results:
            if res.errno == 0:
                self._echo[_signature(res.op.action == "delete", res.op.obj)] = deadline

    def _contradiction(self, ev: RtEvent) -> str | None:
        d, o = self._desired, ev.obj
        if ev.kind == "overflow":
            return "netlink event queue overflowed"
        if isinstance(o, Route):
            want = d.routes.get(str(o.dst)) if o.table == self.scope.table else None
            if ev.kind == "route_del":
                if want is not None and self._is_ours(want, o):
                    return f"route to {o.dst} via {o.gateway} was deleted by someone else"
            elif want is not None:
                if not self._is_ours(want, o):
                    return (f"route to {o.dst} was changed by someone else (now "
                            f"{_route_text(o)}; want via {want.gateway})")
            elif self.scope.owns_route(o):
                return f"route to {o.dst} via {o.gateway} was added by someone else"
        elif isinstance(o, Nexthop):
            if self.scope.owns_nexthop(o):
                verb = "deleted" if ev.kind == "nexthop_del" else "changed"
                return f"nexthop {o.id} via {o.gateway} was {verb} by someone else"
        elif isinstance(o, Neighbour):
            wn = d.neighbours.get(neighbour_key(o))
            if ev.kind == "neigh_del" and wn is not None:
                return f"neighbour {o.ip} was deleted by someone else"
            if ev.kind == "neigh_new" and self.scope.owns_neighbour(o) and (
                    wn is None or not same_neighbour(wn, o)):
                return f"neighbour {o.ip} was changed by someone else"
        elif isinstance(o, FdbEntry):
            wf = d.fdb.get(fdb_key(o))
            if ev.kind == "neigh_del" and wf is not None:
                return f"FDB entry {o.lladdr} was deleted by someone else"
            if ev.kind == "neigh_new" and self.scope.owns_fdb(o) and (
                    wf is None or wf.dst != o.dst):
                return f"FDB entry {o.lladdr} was changed by someone else"
        return None

    def _is_ours(self, want: Route, have: Route) -> bool:
        """`have` is the route we program for `want`: same device, gateway, type, flags,
        the kernel's default metric, and one of our nexthop objects when we use them."""
        if (self.nexthops and have.gateway is None and have.oif is None
                and have.nhid is not None and NHID_BASE <= have.nhid < NHID_BASE + NHID_SPAN):
            return True  # nexthop_compat_mode=0: the nexthop's own events cover the rest
        if (have.type != want.type or have.gateway != want.gateway or have.oif != want.oif
                or have.onlink != want.onlink
                or have.priority != (0 if have.dst.version == 4 else IPV6_DEFAULT_METRIC)):
            return False
        if want.type != RTN_UNICAST:
            return have.nhid is None  # blackhole routes never use nexthop objects
        if self.nexthops:
            return have.nhid is not None and NHID_BASE <= have.nhid < NHID_BASE + NHID_SPAN
        return have.nhid is None

    # -- the loop -----------------------------------------------------------------------

    async def run(self) -> None:
        """The passes, the kernel's notifications and the rule resync, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch_events())
            if self.rules is not None:
                tg.create_task(self._resync_rules(self.rules))
            await self._passes()

    async def _watch_events(self) -> None:
        async for batch in self.port.events():
            if self.on_links is not None and any(
                    ev.kind in ("link_new", "link_del") for ev in batch):
                await self.on_links(batch)
            self.on_events(batch)

    async def _resync_rules(self, rs: RuleSync) -> None:
        while True:
            await asyncio.sleep(rs.interval)
            try:
                if await rs.rules.ensure(rs.cfg) and rs.on_repair is not None:
                    rs.on_repair()  # the rules module logs what it repaired
            except Exception as e:  # a failed restore is retried at the next interval
                log.error("Failed to ensure %s rules: %s", rs.rules.mode, e)

    async def _passes(self) -> None:
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
                log.error("Reconcile failed: %s (retrying in 1 s)", e)
                await asyncio.sleep(1)
                self._dirty.set()

    async def observe(self) -> Observed:
        """Our objects in the kernel (streamed and filtered by the port)."""
        return await self.port.dump(self.scope, nexthops=self.nexthops)

    async def reconcile_once(self, *, drift: bool = False) -> int:
        """One full pass; returns the number of changes applied."""
        start = time.monotonic()
        desired = self._desired
        ops = plan(desired, await self.observe(), self.scope, nexthops=self.nexthops)
        results = await self.port.apply(ops) if ops else []
        self._expect_echoes(results)
        if self.nexthops and self._nexthops_unsupported(results):
            log.warning("This kernel does not support nexthop objects; using classic routes")
            self.nexthops = False
            return await self.reconcile_once(drift=drift)
        changed = self._account(results)
        if drift and changed:
            self.stats.drift_repairs += changed
        s = self.stats
        s.runs += 1
        s.changes += changed
        s.routes = len(desired.routes) - len(s.unreachable)
        s.neighbours = len(desired.neighbours)
        s.fdb = len(desired.fdb)
        s.last_duration = time.monotonic() - start
        s.last_success = time.time()
        if self.on_pass is not None:
            self.on_pass(s)
        return changed

    @staticmethod
    def _nexthops_unsupported(results: Iterable[OpResult]) -> bool:
        for res in results:
            if isinstance(res.op.obj, Nexthop) and res.op.action == "replace":
                return res.errno in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
        return False

    def _account(self, results: Sequence[OpResult]) -> int:
        changed = 0
        logged = 0
        verbose_all = log.isEnabledFor(logging.DEBUG)
        unreachable: set[str] = set()
        dead_nh: set[int] = set()
        for res in results:
            op, obj = res.op, res.op.obj
            if res.errno == 0:
                changed += 1
                if self._failing:
                    self._failing.pop(_signature(op.action == "delete", obj), None)
                if isinstance(obj, Nexthop):
                    continue  # reported with its route
                logged += 1
                if logged <= LOG_EACH_LIMIT or verbose_all:
                    if isinstance(obj, Route) and obj.type == RTN_BLACKHOLE:
                        log.info("%s blackhole route %s",
                                 "Added" if op.action == "replace" else "Removed", obj.dst)
                    elif isinstance(obj, Route) and op.action == "replace":
                        log.info("Subnet added: %s via %s", obj.dst, obj.gateway)
                    elif isinstance(obj, Route):
                        log.info("Removed stale route to %s via %s", obj.dst, obj.gateway)
                    else:
                        log.info("%s %s", "Set" if op.action == "replace" else "Removed",
                                 _describe(op))
                continue
            if op.action == "delete" and res.errno in GONE:
                continue  # already gone: that is what we wanted
            if isinstance(obj, Nexthop) and res.errno in UNREACHABLE:
                dead_nh.add(obj.id)
                continue
            if isinstance(obj, Route) and op.action == "replace" and (
                    res.errno in UNREACHABLE or obj.nhid in dead_nh):
                key = str(obj.dst)
                unreachable.add(key)
                if key not in self.stats.unreachable:
                    log.warning(
                        "Error adding route to %s: peer %s is not reachable on this node's "
                        "L2 segment (host-gw needs direct layer-2 connectivity between nodes; "
                        "use vxlan, or vxlan with DirectRouting, across routers). Will retry.",
                        obj.dst, obj.gateway)
                continue
            self.stats.failures += 1
            sig = _signature(op.action == "delete", obj)
            if self._failing.get(sig) != res.errno:  # once, not on every retry
                self._failing[sig] = res.errno
                log.error("Error %s %s: %s%s (retrying quietly)",
                          "setting" if op.action == "replace" else "deleting", _describe(op),
                          os.strerror(res.errno), f" ({res.message})" if res.message else "")
        if logged > LOG_EACH_LIMIT and not verbose_all:
            log.info("... and %d more changes (%d in this pass; -v=2 lists each)",
                     logged - LOG_EACH_LIMIT, logged)
        for key in self.stats.unreachable - unreachable:
            if key in self._desired.routes:
                log.info("Route to %s recovered: peer reachable again", key)
        self.stats.unreachable = unreachable
        return changed

