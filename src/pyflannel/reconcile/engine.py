"""The running half of reconciliation: KernelReconciler keeps the kernel's routes,
nexthops, neighbours and FDB entries equal to the desired ones, through a RoutePort.

It runs `plan` (reconcile/plan.py, pure) after every change of the desired state and after
a netlink event that contradicts it (someone deleted or altered one of our objects: drift,
repaired within milliseconds). A pass costs O(changes): it looks only at the keys that
changed (the DesiredState records them; events name theirs) and compares them with an
ObservedCache (reconcile/cache.py) of what we own in the kernel, kept current from our own
results and the kernel's notifications; it never dumps. There is no debounce: the first
change is applied at once, and whatever arrives during a pass is coalesced into the next.

A full pass (dump, refill the cache, `plan` over everything) runs at start, after lost
notifications (overflow), and when one of our devices changes. The safety net, every
`resync_interval` (10 s) seconds, dumps and compares with the cache: each difference is
logged and repaired by an incremental pass over the keys that differ (no plan over
everything, which would hold the events behind it). Its cost is the dump: at 10k peers
(10k routes + 10k nexthops) ~30-60 ms of CPU on the 2-vCPU lab machine, under 1 % of a
core at that period; at 10k vxlan peers (40k objects) 200-350 ms. It lists one kind at a
time (routes, nexthops, neighbours, FDB entries) on a socket of its own, in pieces of
~100 objects with the event loop running between two, and applies a lease event that
comes in right away, in the middle of the listing (6-9 ms end to end at 10k vxlan). A
change can make the kernel's listing of nexthops, neighbours or FDB entries skip others;
the check then asks the kernel, by key, for each cached object that listing did not show
(a few). Only where that cannot be done (see `_check_pass`) does the next check hold
events while it lists that kind (~50-100 ms at 10k).

The traffic rules ride on the same driver (`RuleSync`): ensured at start and every
--iptables-resync seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pyflannel.kernel.ports import DUMP_KINDS, Owned, RoutePort, collect
from pyflannel.netlink import (
    RTN_BLACKHOLE,
    RTN_UNICAST,
    DumpInterrupted,
    FdbEntry,
    Neighbour,
    NetlinkDecodeError,
    NetlinkError,
    Nexthop,
    Op,
    OpResult,
    Route,
    RtEvent,
)
from pyflannel.reconcile.cache import CacheCheck, ObservedCache
from pyflannel.reconcile.plan import (
    IPV6_DEFAULT_METRIC,
    ChangedKeys,
    DesiredState,
    KernelScope,
    Observed,
    fdb_key,
    is_our_nhid,
    neighbour_key,
    net_key,
    nh_key,
    plan,
    route_key,
    same_neighbour,
    uses_nexthop,
)
from pyflannel.traffic import TrafficConfig, TrafficRules

log = logging.getLogger(__name__)

LOG_EACH_LIMIT = 50  # changes logged one by one per pass; beyond that, a summary
DRIFT_LOG_LIMIT = 10  # drift events logged one by one per netlink batch
# Objects a check asks the kernel for by key after a disturbed listing (about one per
# change made during it; each answer ~20 us); beyond that, the next check holds instead.
UNSEEN_LIMIT = 256
# How long after a change its notification counts as our own echo (they arrive within
# milliseconds; the window only bounds what a lost notification leaves behind).
ECHO_WINDOW = 2.0
ECHO_MAX = 200_000
UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)
GONE = (errno.ESRCH, errno.ENOENT)
_LAST_ID = object()  # in a pass's pending nexthops: the last id it allocated

LinkHook = Callable[[list[RtEvent]], Awaitable[None]]


@dataclass
class RuleSync:
    """The traffic rules, ensured by the engine every `interval` seconds."""

    rules: TrafficRules
    cfg: TrafficConfig
    interval: float
    on_repair: Callable[[], None] | None = None


# Signatures name addresses by their integers: ipaddress's own __hash__ is slow Python
# code, and hashing a route's network and gateway objects was 0.5 us of every signature
# (100k at a cold start of 50k peers, 40k when 10k vxlan peers go); this is 0.28 us. An
# IPv4 and an IPv6 network alike in integer and length are both ::/n and 0.0.0.0/n.


def _signature(deleted: bool, obj: object) -> tuple[object, ...]:
    """What identifies a change and its notification alike."""
    if isinstance(obj, Route):
        g = obj.gateway
        return (deleted, "route", int(obj.dst.network_address), obj.dst.prefixlen, obj.table,
                None if g is None else int(g), obj.oif, obj.type)
    if isinstance(obj, Nexthop):
        return (deleted, "nexthop", obj.id)
    if isinstance(obj, Neighbour):
        return (deleted, "neigh", obj.ifindex, int(obj.ip),
                obj.lladdr.lower() if not deleted else "")
    if isinstance(obj, FdbEntry):
        return (deleted, "fdb", obj.ifindex, obj.lladdr.lower())
    return (deleted, type(obj).__name__)


_KT = TypeVar("_KT")
_OT = TypeVar("_OT", Neighbour, FdbEntry)


def _split_keys(keys: Iterable[_KT], want: Mapping[_KT, _OT], have: dict[_KT, _OT],
                owns: Callable[[_OT], bool], seen: list[_OT]) -> tuple[dict[_KT, _OT], list[Op]]:
    """For the changed `keys`: what is wanted (its cached object, if any, appended to `seen`
    for plan to diff against) and the delete ops for ours that nothing wants any more,
    which leave `have` (the cache) at once: see _after_apply's `taken_from`."""
    wanted: dict[_KT, _OT] = {}
    gone: list[Op] = []
    for k in keys:
        w, h = want.get(k), have.get(k)
        if w is not None:
            wanted[k] = w
            if h is not None:
                seen.append(h)
        elif h is not None and owns(h):
            gone.append(Op("delete", h))
            del have[k]
    return wanted, gone


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
    full_runs: int = 0  # passes that dumped (start, safety net, lost notifications)
    cache_repairs: int = 0  # differences between the cache and a safety-net dump
    last_full_duration: float = 0.0
    last_duration: float = 0.0
    last_success: float = 0.0
    routes: int = 0
    neighbours: int = 0
    fdb: int = 0
    unreachable: set[str] = field(default_factory=set)


def _via(r: Route) -> str:
    return str(r.gateway) if r.gateway is not None else f"dev {r.oif}"


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
    PYFLANNEL_NEXTHOP_OBJECTS once); a kernel without them falls back by itself.
    `compat_mode`: reads net.ipv4.nexthop_compat_mode of the port's namespace (None: not
    known). While it is 0 the kernel reports routes on nexthop objects without their
    gateway and device (`10.244.2.0/24 nhid 253886464 proto boot`), which breaks tools that
    read a route's gateway, so routes are plain (`via <gw> dev <dev>`) then; it is looked
    at before every full and safety-net pass, and a change converts every route in place."""

    def __init__(self, port: RoutePort, scope: KernelScope, *, resync_interval: float = 10.0,
                 nexthops: bool = True, rules: RuleSync | None = None,
                 compat_mode: Callable[[], int | None] | None = None) -> None:
        self.port = port
        self.scope = scope
        self.resync_interval = resync_interval
        self.nexthops = nexthops  # the form in use
        self._nexthops_wanted = nexthops  # the form asked for
        self._compat_mode = compat_mode
        self.rules = rules
        self.on_links: LinkHook | None = None
        self.stats = ReconcileStats()
        self.on_pass: Callable[[ReconcileStats], None] | None = None
        self._desired = DesiredState()
        self._dirty = asyncio.Event()
        self._have_desired = False
        self._drift_pending = False
        # hash(change signature) -> deadline, for the changes whose notifications the
        # kernel does not mark as ours (FDB entries, a neighbour's removal: 10k each when
        # 10k vxlan peers go). The hash, not the signature: an int is a third of a tuple.
        # A foreign change whose signature hashes alike within the window (odds 2**-61)
        # would pass for an echo; the safety-net dump still finds it.
        self._echo: dict[int, float] = {}
        self._failing: dict[tuple[object, ...], int] = {}  # op signature -> errno logged
        self._cache: ObservedCache | None = None  # None: the next pass dumps
        self._full_reason = "start"
        self._kernel_dirty = ChangedKeys()  # keys named by contradicting events
        self._retry = ChangedKeys()  # keys whose ops failed: retried with the next pass
        self._orphans: set[int] = set()  # our nexthops nothing uses, found by a check
        self._whole = True  # diff every key against the cache (a new DesiredState)
        self._next_full = 0.0  # monotonic time of the next safety-net pass
        # Which of our nexthops each desired route uses, and how many use each: an
        # incremental pass knows when a nexthop is no longer needed without a scan.
        self._route_nh: dict[str, int] = {}
        self._nh_refs: dict[int, int] = {}  # nhid -> desired routes using it
        # notifications taken in but our echoes: the safety net's count is exact while
        # this stays put
        self._events_seen = 0
        self._check: CacheCheck | None = None  # the safety net's, while it lists
        # kinds whose last listing could not be counted: the next check holds events while
        # it lists them
        self._hold_kinds: set[str] = set()

    # -- inputs -------------------------------------------------------------------------

    def set_desired(self, desired: DesiredState) -> None:
        """Takes ownership of `desired` (no copy: the caller builds a new one or keeps
        mutating this one between passes)."""
        if desired is not self._desired:
            self._whole = True
        self._desired = desired
        self._have_desired = True
        self._dirty.set()

    def set_scope(self, scope: KernelScope) -> None:
        if scope != self.scope:
            self._drop_cache("devices changed")  # what we own is dumped again
        self.scope = scope
        self._dirty.set()

    def resync(self) -> None:
        """Dump and diff everything with the next pass (at once)."""
        self._drop_cache("asked to")
        self._dirty.set()

    def _drop_cache(self, why: str) -> None:
        if self._cache is not None:
            self._full_reason = why
        self._cache = None

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
            affected = self._observe(ev)
            if ev.kind == "overflow":
                self._events_seen += 1
                # Not drift: after a big batch of our own (a cold start at 50k peers) the
                # kernel drops our echoes first. The dump covers whatever was lost.
                log.info("Netlink notifications were lost (receive queue overflowed); "
                         "checking the kernel against the cache with a dump")
                self._dirty.set()
                continue
            if ev.ours or self._is_echo(ev, now):
                continue  # the cache already holds it: our results went in at once
            if self._may_change_cache(ev.obj):
                self._events_seen += 1
            reason = self._contradiction(ev)
            if reason:
                drifts += 1
                if drifts <= DRIFT_LOG_LIMIT:
                    log.warning("Drift: %s; repairing", reason)
                self._mark_kernel(ev, affected)
        if drifts > DRIFT_LOG_LIMIT:
            log.warning("Drift: ... and %d more changes in this batch", drifts - DRIFT_LOG_LIMIT)
        if drifts:
            self.mark_dirty(drift=True)

    def _may_change_cache(self, o: object) -> bool:
        """Whether a notification of `o` can change what the cache holds, which the safety
        net's count must know of (the local table's routes of link-local addresses, say,
        cannot)."""
        s = self.scope
        if type(o) is Route:
            return o.table == s.table
        if type(o) is Neighbour or isinstance(o, FdbEntry):
            return o.ifindex in s.neighbour_ifindexes
        return type(o) is Nexthop

    def _observe(self, ev: RtEvent) -> set[str]:
        """Keep the cache current; returns the prefixes of routes the event removed along
        with a nexthop (no notification of their own)."""
        c, o, scope = self._cache, ev.obj, self.scope
        if ev.kind == "overflow":
            # The cache still holds what we did; what the lost notifications said, the
            # safety net's streamed check finds (and repairs) at once. Refilling the cache
            # from a full dump instead held a second copy of everything: 50k leases'
            # cold start overflows with its own echoes, and peaked 25 MiB higher for it.
            self._next_full = 0.0
            return set()
        if c is None:
            return set()
        if isinstance(o, Route):
            if ev.kind == "route_del":
                c.drop_route(o)
            else:
                c.put_route(o, scope)
        elif isinstance(o, Nexthop):
            if ev.kind == "nexthop_del":
                return c.drop_nexthop(o.id)
            gone = c.routes_using(o.id) if o.id in c.nexthops else set()
            c.put_nexthop(o, scope)
            return gone
        elif isinstance(o, Neighbour):
            if o.ifindex in scope.neighbour_ifindexes:
                if ev.kind == "neigh_del":
                    c.drop_neighbour(o)
                else:
                    c.put_neighbour(o, scope)
        elif isinstance(o, FdbEntry):
            if o.ifindex in scope.neighbour_ifindexes:
                if ev.kind == "neigh_del":
                    c.drop_fdb(o)
                else:
                    c.put_fdb(o, scope)
        elif o is not None and ev.kind in ("link_new", "link_del"):
            idx = getattr(o, "ifindex", None)
            if idx in scope.route_oifs or idx in scope.neighbour_ifindexes:
                # The kernel flushes a device's routes without notifications.
                self._drop_cache(f"device #{idx} changed")
                self._dirty.set()
        return set()

    def _mark_kernel(self, ev: RtEvent, affected: set[str]) -> None:
        """The keys a contradicting event touches, for the next pass."""
        o, kd = ev.obj, self._kernel_dirty
        if isinstance(o, Route):
            kd.routes.add(route_key(o))
        elif isinstance(o, Nexthop):
            kd.routes |= affected
            # and the desired routes mapped to it (rare: someone changed our nexthop)
            kd.routes.update(k for k, i in self._route_nh.items() if i == o.id)
            if ev.kind != "nexthop_del" and not self.nexthops:
                self._orphans.add(o.id)  # one of ours while we use none: it goes
        elif isinstance(o, Neighbour):
            kd.neighbours.add(neighbour_key(o))
        elif isinstance(o, FdbEntry):
            kd.fdb.add(fdb_key(o))

    def _is_echo(self, ev: RtEvent, now: float) -> bool:
        if not self._echo or ev.obj is None:
            return False
        deadline = self._echo.pop(hash(_signature(ev.kind.endswith("_del"), ev.obj)), None)
        return deadline is not None and deadline >= now

    def _expect_echoes(self, ops: Iterable[Op]) -> None:
        """Remember what we are about to change, so its notifications (which can arrive
        while the batch is still being applied) are not taken for drift. Only what the
        kernel does not mark as ours (RtEvent.ours): a neighbour's removal, FDB entries."""
        deadline = time.monotonic() + ECHO_WINDOW
        if len(self._echo) > ECHO_MAX:
            self._echo.clear()
        echo = self._echo
        for op in ops:
            o = op.obj
            # _signature, inlined: removing 10k vxlan peers takes 20k of these
            if type(o) is FdbEntry:
                echo[hash((op.action == "delete", "fdb", o.ifindex, o.lladdr.lower()))] = deadline
            elif type(o) is Neighbour and op.action == "delete":
                echo[hash((True, "neigh", o.ifindex, int(o.ip), ""))] = deadline

    async def _apply(self, ops: list[Op], taken_from: int | None = None) -> list[OpResult]:
        """`taken_from`: see _after_apply."""
        if not ops:
            return []
        self._expect_echoes(ops)
        if self._check is not None:
            self._check.changing(ops, taken_from)
        return await self.port.apply(ops)

    def _contradiction(self, ev: RtEvent) -> str | None:
        d, o = self._desired, ev.obj
        if isinstance(o, Route):
            want = d.routes.get(net_key(o.dst)) if o.table == self.scope.table else None
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
                and have.nhid is not None and is_our_nhid(have.nhid)):
            return True  # nexthop_compat_mode=0: the nexthop's own events cover the rest
        if (have.type != want.type or have.gateway != want.gateway or have.oif != want.oif
                or have.onlink != want.onlink
                or have.priority != (0 if have.dst.version == 4 else IPV6_DEFAULT_METRIC)):
            return False
        if not uses_nexthop(want):
            return have.nhid is None
        if self.nexthops:
            return have.nhid is not None and is_our_nhid(have.nhid)
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
        loop = asyncio.get_running_loop()
        self._next_full = loop.time() + self.resync_interval
        while True:
            wait = self._next_full - loop.time()
            if wait > 0 and not self._dirty.is_set():
                # A timeout means: the periodic safety-net pass. (Not wait_for(): its
                # task of its own costs two more turns of the loop per event.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._dirty.wait()
            if not self._have_desired:
                self._dirty.clear()
                self._next_full = loop.time() + self.resync_interval
                continue
            # No debounce: whatever arrived so far goes into this pass, whatever arrives
            # while it runs into the next one.
            drift = self._take_pending()
            periodic = loop.time() >= self._next_full
            try:
                await self.reconcile_once(drift=drift, full=periodic or None)
            except (OSError, DumpInterrupted) as e:
                self.stats.failures += 1
                self._drop_cache("the last pass failed")
                log.error("Reconcile failed: %s (retrying in 1 s)", e)
                await asyncio.sleep(1)
                self._dirty.set()

    async def observe(self) -> Observed:
        """Our objects in the kernel (streamed and filtered by the port). Our nexthop
        objects are dumped with plain routes too, so that they are removed."""
        return await collect(self.port.dump(self.scope, nexthops=True))

    async def _choose_form(self) -> None:
        """Nexthop objects or plain routes, from nexthop_compat_mode (logged when it
        changes the form; the next pass is a full one that converts every route)."""
        if self._compat_mode is None or not self._nexthops_wanted:
            return
        mode = await asyncio.to_thread(self._compat_mode)
        use = mode != 0
        if use == self.nexthops:
            return
        if use:
            log.info("net.ipv4.nexthop_compat_mode is %s now: routes use nexthop objects "
                     "again", mode)
        else:
            log.info("net.ipv4.nexthop_compat_mode is 0 in this network namespace: routes on "
                     "nexthop objects would show no gateway or device to tools that read "
                     "them, so routes are plain (`<subnet> via <gateway> dev <device>`), as "
                     "with PYFLANNEL_NEXTHOP_OBJECTS=off")
        self.nexthops = use
        self._drop_cache("nexthop_compat_mode changed")

    async def reconcile_once(self, *, drift: bool = False, full: bool | None = None) -> int:
        """One pass; returns the number of changes applied. A full pass (dump, plan of
        everything) when the cache is not filled; else full=True: the safety net (a dump
        checked against the cache, then the differences); else an incremental pass."""
        start = time.monotonic()
        desired = self._desired
        if self._cache is None or full:
            await self._choose_form()
        whole = self._cache is None
        reason = self._full_reason
        if whole:
            results = await self._full_pass()
        elif full:
            results, drift_between = await self._check_pass()
            drift = drift or drift_between
            self.stats.full_runs += 1
        else:
            results = await self._incremental_pass()
        if self.nexthops and self._nexthops_unsupported(results):
            log.warning("This kernel does not support nexthop objects; using classic routes")
            self.nexthops = self._nexthops_wanted = False
            self._drop_cache("nexthop objects unsupported")
            return await self.reconcile_once(drift=drift)
        changed = self._account(results, whole=whole)
        if drift and changed:
            self.stats.drift_repairs += changed
        s = self.stats
        s.runs += 1
        s.changes += changed
        s.routes = len(desired.routes) - len(s.unreachable)
        s.neighbours = len(desired.neighbours)
        s.fdb = len(desired.fdb)
        s.last_duration = time.monotonic() - start
        if whole:
            s.full_runs += 1
            s.last_full_duration = s.last_duration
            log.log(logging.INFO if changed or s.full_runs == 1 else logging.DEBUG,
                    "Full pass (%s): %d routes ours, %d changes, %.3f s", reason,
                    len(self._cache.routes) if self._cache else 0, changed, s.last_duration)
        s.last_success = time.time()
        if self.on_pass is not None:
            self.on_pass(s)
        return changed

    async def _check_pass(self) -> tuple[list[OpResult], bool]:
        """The safety net, every `resync_interval` s: dump, compare with the cache (each
        difference logged), repair it, and an incremental pass over what differed. No plan
        over everything: that would hold every event behind it (tens of ms at 10k).
        Also returns whether drift was among what it applied while it listed."""
        old = self._cache
        assert old is not None
        # Echoes that never came (lost in an overflow at a cold start: up to 100k) go.
        now = time.monotonic()
        self._echo = {sig: t for sig, t in self._echo.items() if t >= now}
        # What woke this pass besides the period goes first.
        results = await self._incremental_pass()
        # Compared as the dump streams in, repaired in place: no second copy of the cache.
        # One kind at a time (a segment). What comes in while a segment is listed is
        # applied at once, between two of its objects (the dump waits in its socket); the
        # listing then skips what that changed, which leaves its count (CacheCheck). Where
        # the count cannot be kept exact (a change of a kind the kernel may list by
        # position, or a listing the kernel says was interrupted), the cached objects the
        # listing did not show are asked for by key (_look_at_unseen). Where that cannot
        # be done, objects lost unseen are not looked for in that kind this time; the next
        # check holds what comes in while it lists that kind (10k objects at most), so
        # they are found within two periods however much the kernel's tables change.
        check = CacheCheck(old, self.scope)
        drift = False
        quiet = True  # no notification but our echoes while a counted segment was listed
        for kind in DUMP_KINDS:
            hold = kind in self._hold_kinds
            if self._dirty.is_set():  # came in while the last kind was listed
                drift = self._take_pending() or drift
                results += await self._incremental_pass()
                if self._cache is not old:
                    return results, drift
            check.begin(kind)
            events = self._events_seen
            self._check = check  # told of what passes change while it lists
            try:
                async with contextlib.aclosing(self.port.dump(
                        self.scope, nexthops=True, kinds=(kind,))) as listing:
                    async for o in listing:
                        check.see(o)
                        if hold or not self._dirty.is_set():
                            continue
                        drift = self._take_pending() or drift
                        results += await self._incremental_pass()
                        if self._cache is not old:
                            return results, drift  # a full pass comes
            except DumpInterrupted:
                # The kernel says the listing may have missed or doubled objects (the table
                # changed meanwhile): what it listed is compared, not counted.
                check.interrupted = True
            except BaseException:
                self._drop_cache("the safety-net dump failed")  # repaired only in part
                raise
            finally:
                self._check = None
            if self._cache is not old:
                return results, drift  # a notification dropped the cache
            if check.interrupted:
                verified = await self._look_at_unseen(check)
                if self._cache is not old:
                    return results, drift
                if verified:
                    self._hold_kinds.discard(kind)
                else:
                    self._hold_kinds.add(kind)
            else:
                self._hold_kinds.discard(kind)
                quiet = quiet and self._events_seen == events
        diffs, keys, nhids = check.diffs, check.keys, check.nhids
        if not check.complete() or not quiet:
            # Something cached was not listed (or notifications changed the cache while
            # the dump ran, so the count cannot tell): compare against a full copy.
            fresh = ObservedCache.from_observed(await self.observe(), self.scope)
            more, more_keys, more_nhids = old.differences(fresh)
            diffs += more
            keys.update(more_keys)
            nhids |= more_nhids
            for i in more_nhids:
                keys.routes |= old.routes_using(i)
            self._cache = fresh
        self._report_differences(diffs)
        c = self._cache
        assert c is not None
        if nhids:
            for i in nhids:
                keys.routes |= c.routes_using(i)
            keys.routes.update(k for k, i in self._route_nh.items() if i in nhids)
            # ours in the kernel but no desired route uses it: deleted by the next pass
            self._orphans |= {i for i in nhids if i in c.nexthops and i not in self._nh_refs}
        self._kernel_dirty.update(keys)
        results += await self._incremental_pass()
        self._next_full = asyncio.get_running_loop().time() + self.resync_interval
        return results, drift

    async def _look_at_unseen(self, check: CacheCheck) -> bool:
        """After a listing of nexthops, neighbours or FDB entries that a change made
        uncountable: ask the kernel for each cached object it did not show, by key (a few:
        what the change made the listing skip, plus anything lost), so that no later check
        has to hold events while it lists that kind. False when that cannot be done (routes,
        more than UNSEEN_LIMIT, or a kernel that cannot answer): the next check holds."""
        asked = check.unseen(UNSEEN_LIMIT)
        if asked is None:
            return False
        found: list[Owned] = []
        if asked:
            try:
                async with contextlib.aclosing(self.port.dump(
                        self.scope, nexthops=True, only=asked)) as answers:
                    found = [o async for o in answers]
            except (NetlinkError, NetlinkDecodeError) as e:
                log.debug("Cannot ask the kernel for %d objects by key: %s", len(asked), e)
                return False
        check.confirm(asked, [o for o in found if not isinstance(o, Route)])
        return True

    def _take_pending(self) -> bool:
        """Before a pass takes what woke it: clear the wake-up; whether drift was in it."""
        self._dirty.clear()
        drift, self._drift_pending = self._drift_pending, False
        return drift

    async def _full_pass(self) -> list[OpResult]:
        """Dump, refill the cache, plan it all."""
        self._next_full = asyncio.get_running_loop().time() + self.resync_interval
        obs = await self.observe()
        self._cache = ObservedCache.from_observed(obs, self.scope)
        desired = self._desired
        desired.changed.drain()  # covered: the plan looks at everything
        self._kernel_dirty.drain()
        self._retry.drain()
        self._orphans = set()
        self._whole = False
        ops = plan(desired, obs, self.scope, nexthops=self.nexthops)
        del obs  # the cache holds the same objects; the lists go
        results = await self._apply(ops)
        self._after_apply(results)
        self._index_nexthops()
        # The period counts from the end: a long first pass is not followed by another.
        self._next_full = asyncio.get_running_loop().time() + self.resync_interval
        return results

    def _report_differences(self, diffs: list[str]) -> None:
        self.stats.cache_repairs += len(diffs)
        for line in diffs[:LOG_EACH_LIMIT]:
            log.warning("Kernel state differed from what notifications said: %s; repaired",
                        line)
        if len(diffs) > LOG_EACH_LIMIT:
            log.warning("... and %d more differences (repaired)", len(diffs) - LOG_EACH_LIMIT)

    def _index_nexthops(self) -> None:
        """After a full pass: which nexthop each desired route uses, from the cache."""
        c = self._cache
        self._route_nh = {}
        self._nh_refs = {}
        if not self.nexthops or c is None:
            return
        for k, r in self._desired.routes.items():
            if uses_nexthop(r):
                nhid = c.nexthop_id(nh_key(r))
                if nhid is not None:
                    self._route_nh[k] = nhid
                    self._nh_refs[nhid] = self._nh_refs.get(nhid, 0) + 1

    def _changed_keys(self) -> ChangedKeys:
        keys = self._desired.changed.drain()
        keys.update(self._kernel_dirty.drain())
        keys.update(self._retry.drain())
        if self._whole:
            self._whole = False
            c, d = self._cache, self._desired
            assert c is not None
            keys.routes |= d.routes.keys() | c.route_prefixes()
            keys.neighbours |= d.neighbours.keys() | c.neighbours.keys()
            keys.fdb |= d.fdb.keys() | c.fdb.keys()
        return keys

    async def _incremental_pass(self) -> list[OpResult]:
        """`plan` over the changed keys only, against the cache: O(changes). Keys nothing
        is wanted at any more skip `plan`: their deletions come straight from the cache,
        in plan's place for them (after the route changes, nexthops between routes and
        neighbours); all 10k peers leaving costs 30k-40k deletions and nothing else."""
        c = self._cache
        assert c is not None
        keys = self._changed_keys()
        if not keys and not self._orphans:
            return []
        d, scope = self._desired, self.scope
        want_routes: dict[str, Route] = {}
        nh_adds: list[Op] = []
        freed: set[int] = set()
        pending: dict[object, int] = {}
        observed = Observed()
        seen = observed.routes
        route_gone: list[Op] = []
        owns_route = scope.owns_route
        nexthops, route_nh, nh_refs = self.nexthops, self._route_nh, self._nh_refs
        for k in keys.routes:
            r = d.routes.get(k)
            if nexthops:
                old = route_nh.pop(k, None)
                if old is not None:
                    refs = nh_refs.get(old, 0) - 1
                    if refs > 0:
                        nh_refs[old] = refs
                    else:
                        nh_refs.pop(old, None)
                        freed.add(old)
                if r is not None and uses_nexthop(r):
                    r = self._with_nexthop(k, r, pending, nh_adds)
            have = c.routes.get(k)  # (one route per prefix: routes_at without a generator)
            haves = list(c.routes_at(k)) if k in c.extra else [have] if have else []
            if r is not None:
                want_routes[k] = r
                seen += haves
            else:
                for h in haves:
                    if owns_route(h):
                        route_gone.append(Op("delete", h))
                        c.drop_route(h, k)
            if nexthops:
                for h in haves:  # a stale route's nexthop may be unused now
                    if h.nhid is not None and h.nhid not in nh_refs:
                        freed.add(h.nhid)
        if self._orphans:
            freed |= self._orphans
            self._orphans = set()
        nh_gone = [Op("delete", c.nexthops[i]) for i in sorted(freed)
                   if i not in nh_refs and i in c.nexthops]
        for op in nh_gone:
            c.drop_nexthop(op.obj.id)  # type: ignore[union-attr]
        want_neigh, neigh_gone = _split_keys(keys.neighbours, d.neighbours, c.neighbours,
                                             scope.owns_neighbour, observed.neighbours)
        want_fdb, fdb_gone = _split_keys(keys.fdb, d.fdb, c.fdb, scope.owns_fdb, observed.fdb)
        # The nexthops are ours to derive here; plan diffs the routes (by nhid), the
        # neighbours and the FDB entries of the keys still wanted.
        ops = nh_adds
        if want_routes or want_neigh or want_fdb or seen:
            ops += plan(DesiredState(routes=want_routes, neighbours=want_neigh, fdb=want_fdb),
                        observed, scope, nexthops=False)
        taken_from = len(ops)
        # Routes go before their nexthops (plan's order): deleting a nexthop that routes
        # still use takes them along, but measured 2-8x slower at 10k (a FIB flush each).
        # And nexthops go before the neighbours and FDB entries: deleting 10k vxlan
        # neighbours while the nexthops on their gateways exist took 2x as long.
        ops += route_gone
        ops += nh_gone
        ops += neigh_gone
        ops += fdb_gone
        results = await self._apply(ops, taken_from)
        self._after_apply(results, taken_from)
        return results

    def _with_nexthop(self, k: str, r: Route, pending: dict[object, int],
                      nh_adds: list[Op]) -> Route:
        """`r` pointing at our nexthop for its (gateway, device): the existing one, or a new
        one with the lowest free id (deterministic, as `plan` allocates)."""
        c = self._cache
        assert c is not None
        key = nh_key(r)
        nhid = pending.get(key)
        if nhid is None:
            nhid = c.nexthop_id(key)
        if nhid is None:
            # Ids this pass allocated are in _nh_refs, and all are below the last one.
            nhid = c.free_nexthop_id(self._nh_refs, pending.get(_LAST_ID, 0))
            pending[key] = pending[_LAST_ID] = nhid
            nh_adds.append(Op("replace", Nexthop(nhid, r.gateway, r.oif, r.protocol,
                                                 r.onlink)))
        self._route_nh[k] = nhid
        self._nh_refs[nhid] = self._nh_refs.get(nhid, 0) + 1
        return Route(r.dst, r.gateway, r.oif, r.table, r.protocol, r.onlink, r.scope, r.type,
                     nhid)

    def _after_apply(self, results: Sequence[OpResult], taken_from: int | None = None) -> None:
        """Our changes into the cache at once (their notifications confirm them later);
        failed keys are retried with the next pass. The results from `taken_from` on are
        deletions the pass took out of the cache already, where it had their keys at hand
        (10k vxlan peers leaving: 40k deletions): only their failures matter here."""
        c, scope, retry = self._cache, self.scope, self._retry
        if c is None:
            return
        if taken_from is not None:
            for res in itertools.islice(results, taken_from, None):
                if not res.errno:
                    continue
                o = res.op.obj
                self._echo.pop(hash(_signature(True, o)), None)  # no echo comes
                if res.errno not in GONE:  # still in the kernel: back into the cache
                    if isinstance(o, Route):
                        c.put_route(o, scope, ours=True)
                        retry.routes.add(route_key(o))
                    elif isinstance(o, Nexthop):
                        c.put_nexthop(o, scope, ours=True)
                        self._orphans.add(o.id)  # unused still: the next pass retries
                    elif isinstance(o, Neighbour):
                        c.put_neighbour(o, scope)
                        retry.neighbours.add(neighbour_key(o))
                    elif isinstance(o, FdbEntry):
                        c.put_fdb(o, scope)
                        retry.fdb.add(fdb_key(o))
            results = results[:taken_from]
        for res in results:
            op = res.op
            o = op.obj
            err = res.errno
            delete = op.action == "delete"
            if err:
                self._echo.pop(hash(_signature(delete, o)), None)  # no echo comes
                if not delete or err not in GONE:
                    if isinstance(o, Route):
                        retry.routes.add(route_key(o))
                    elif isinstance(o, Neighbour):
                        retry.neighbours.add(neighbour_key(o))
                    elif isinstance(o, FdbEntry):
                        retry.fdb.add(fdb_key(o))
                    continue
            # exact types (the codec makes no subclasses): cheaper than isinstance's chain
            if type(o) is Route:
                if delete:
                    c.drop_route(o)
                else:
                    c.put_route(o, scope, ours=True)
            elif type(o) is Nexthop:
                if delete:
                    c.drop_nexthop(o.id)
                else:
                    c.put_nexthop(o, scope, ours=True)
            elif type(o) is Neighbour:
                if delete:
                    c.drop_neighbour(o)
                else:
                    c.put_neighbour(o, scope)
            elif isinstance(o, FdbEntry):
                if delete:
                    c.drop_fdb(o)
                else:
                    c.put_fdb(o, scope)

    @staticmethod
    def _nexthops_unsupported(results: Iterable[OpResult]) -> bool:
        # Nexthop additions come first in a pass (plan's order and the incremental pass's),
        # so only the first result tells: no scan of a pass that adds none.
        first = next(iter(results), None)
        return (first is not None and isinstance(first.op.obj, Nexthop)
                and first.op.action == "replace"
                and first.errno in (errno.EOPNOTSUPP, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT))

    def _account(self, results: Sequence[OpResult], *, whole: bool = True) -> int:
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
                        log.info("Subnet added: %s via %s", obj.dst, _via(obj))
                    elif isinstance(obj, Route):
                        log.info("Removed stale route to %s via %s", obj.dst, _via(obj))
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
                key = net_key(obj.dst)
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
        before = self.stats.unreachable
        if not whole and before:
            # An incremental pass retried only some routes: the others' state stands.
            looked = {str(r.op.obj.dst) for r in results if isinstance(r.op.obj, Route)}
            unreachable |= {k for k in before - looked if k in self._desired.routes}
        for key in before - unreachable:
            if key in self._desired.routes:
                log.info("Route to %s recovered: peer reachable again", key)
        self.stats.unreachable = unreachable
        return changed

