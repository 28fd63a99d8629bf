"""KernelReconciler: keeps the kernel's routes, neighbours and FDB entries equal to the
desired ones computed from the leases.

The diff (`plan`) is a pure function. The reconciler runs it after every lease change,
after a netlink event that contradicts the desired state (someone deleted or altered one
of our objects: repaired within milliseconds), and periodically as a safety net.

Ownership. We own the routes in our table, on our interfaces, whose destination lies in
the cluster network(s); the permanent neighbours and the FDB entries on our own devices
(the vxlan device); and the nexthop objects in our id range on our interfaces. Owned
objects that no lease wants are removed: that also clears what nodes that left while the
daemon was down left behind (upstream #2554).

Nexthop objects. With one gateway per route the kernel's fib_info lookup makes classic
route creation quadratic (10k peers take ~2.5 s, 50k ~200 s). When the kernel supports
nexthop objects, each distinct (gateway, device) becomes one nexthop and the route points
at it by id (`10.244.2.0/24 nhid 253886465 via 192.168.1.12 dev eth0`): creation is linear.
Backends still describe classic routes; the id mapping is ours alone. Set
PYFLANNEL_NEXTHOP_OBJECTS=off for exactly upstream's route form.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from pyflannel.netlink import (
    NUD_PERMANENT,
    RTN_UNICAST,
    FdbEntry,
    Neighbour,
    Nexthop,
    Op,
    OpResult,
    Route,
    RtEvent,
    RtNetlink,
)

log = logging.getLogger(__name__)

LOG_EACH_LIMIT = 50  # changes logged one by one per pass; beyond that, a summary
DRIFT_LOG_LIMIT = 10  # drift events logged one by one per netlink batch
# How long after a change its notification counts as our own echo (they arrive within
# milliseconds; the window only bounds what a lost notification leaves behind).
ECHO_WINDOW = 2.0
ECHO_MAX = 200_000
IPV6_DEFAULT_METRIC = 1024  # the kernel's metric for an IPv6 route added with none
NHID_BASE = 0x0F1A0000  # our nexthop ids: NHID_BASE .. NHID_BASE + NHID_SPAN - 1
NHID_SPAN = 1 << 20
UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH)
GONE = (errno.ESRCH, errno.ENOENT)

Gateway = IPv4Address | IPv6Address
K = TypeVar("K")
T = TypeVar("T", Neighbour, FdbEntry)
NhKey = tuple[Gateway | None, int | None, bool]


@dataclass(frozen=True)
class KernelScope:
    """What this reconciler owns in the kernel."""

    route_oifs: frozenset[int]
    networks: tuple[IPv4Network | IPv6Network, ...]
    neighbour_ifindexes: frozenset[int] = frozenset()
    table: int = 254

    def owns_route(self, r: Route) -> bool:
        return (
            r.table == self.table
            and r.type == RTN_UNICAST
            and r.oif in self.route_oifs
            and any(r.dst.version == n.version and r.dst.subnet_of(n)  # type: ignore[arg-type]
                    for n in self.networks)
        )

    def owns_nexthop(self, nh: Nexthop) -> bool:
        return NHID_BASE <= nh.id < NHID_BASE + NHID_SPAN and nh.oif in self.route_oifs

    def owns_neighbour(self, n: Neighbour) -> bool:
        return n.ifindex in self.neighbour_ifindexes and bool(n.state & NUD_PERMANENT)

    def owns_fdb(self, f: FdbEntry) -> bool:
        return f.ifindex in self.neighbour_ifindexes

    @property
    def families(self) -> tuple[int, ...]:
        fams = {socket.AF_INET if n.version == 4 else socket.AF_INET6 for n in self.networks}
        return tuple(sorted(fams))


@dataclass
class DesiredState:
    """Everything the backend wants, keyed for cheap diffs. Routes are in classic form
    (gateway + oif); nexthop objects are derived from them here."""

    routes: dict[str, Route] = field(default_factory=dict)
    neighbours: dict[tuple[int, str], Neighbour] = field(default_factory=dict)
    fdb: dict[tuple[int, str], FdbEntry] = field(default_factory=dict)


@dataclass
class Observed:
    routes: list[Route] = field(default_factory=list)
    nexthops: list[Nexthop] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    fdb: list[FdbEntry] = field(default_factory=list)


def neighbour_key(n: Neighbour) -> tuple[int, str]:
    return (n.ifindex, str(n.ip))


def fdb_key(f: FdbEntry) -> tuple[int, str]:
    return (f.ifindex, f.lladdr.lower())


def nh_key(r: Route | Nexthop) -> NhKey:
    return (r.gateway, r.oif, r.onlink)


def same_route(want: Route, have: Route) -> bool:
    """upstream's routeEqual (dst, gateway, oif) plus the onlink flag; with nexthop objects
    the route is right when it points at the right nexthop (which is diffed itself)."""
    if want.nhid is not None:
        return want.dst == have.dst and want.nhid == have.nhid
    return (want.dst == have.dst and want.gateway == have.gateway and want.oif == have.oif
            and want.onlink == have.onlink and have.nhid is None)


def same_neighbour(a: Neighbour, b: Neighbour) -> bool:
    return a.lladdr.lower() == b.lladdr.lower() and bool(b.state & NUD_PERMANENT)


def _diff_keyed(desired: Mapping[K, T], observed: Iterable[T], owns: Callable[[T], bool],
                key: Callable[[T], K], same: Callable[[T, T], bool]) -> tuple[list[Op], list[Op]]:
    """(replaces, deletes) for objects identified by a key (neighbours, FDB entries)."""
    adds: list[Op] = []
    dels: list[Op] = []
    seen: set[K] = set()
    for have in observed:
        if not owns(have):
            continue
        k = key(have)
        want = desired.get(k)
        if want is None:
            dels.append(Op("delete", have))
        else:
            seen.add(k)
            if not same(want, have):
                adds.append(Op("replace", want))
    adds.extend(Op("replace", w) for k, w in desired.items() if k not in seen)
    return adds, dels


def plan(desired: DesiredState, observed: Observed, scope: KernelScope, *,
         nexthops: bool) -> list[Op]:
    """The ops that turn `observed` into `desired`, in a safe order: nexthops, neighbours
    and FDB entries before the routes that use them (the kernel never has to resolve a
    gateway), deletions of routes before the objects they used."""
    nh_adds: list[Op] = []
    nh_dels: list[Op] = []
    want_routes = desired.routes
    if nexthops:
        owned_nh = [nh for nh in observed.nexthops if scope.owns_nexthop(nh)]
        by_key: dict[NhKey, int] = {}
        used_ids = {nh.id for nh in owned_nh}
        for nh in owned_nh:
            by_key.setdefault(nh_key(nh), nh.id)
        next_id = NHID_BASE
        want_routes = {}
        needed: set[int] = set()
        for key, r in desired.routes.items():
            k = nh_key(r)
            nhid = by_key.get(k)
            if nhid is None:
                while next_id in used_ids:
                    next_id += 1
                if next_id >= NHID_BASE + NHID_SPAN:
                    raise RuntimeError("out of nexthop ids")
                nhid = next_id
                used_ids.add(nhid)
                by_key[k] = nhid
                nh_adds.append(Op("replace", Nexthop(nhid, r.gateway, r.oif, r.protocol,
                                                     r.onlink)))
            needed.add(nhid)
            want_routes[key] = Route(dst=r.dst, gateway=r.gateway, oif=r.oif, table=r.table,
                                     protocol=r.protocol, onlink=r.onlink, scope=r.scope,
                                     type=r.type, nhid=nhid)
        nh_dels = [Op("delete", nh) for nh in owned_nh if nh.id not in needed]
        owned_ids = {nh.id for nh in owned_nh}
    else:
        owned_ids = set()

    route_adds: list[Op] = []
    route_dels: list[Op] = []
    seen: set[str] = set()
    for r in observed.routes:
        if not (scope.owns_route(r) or (r.nhid is not None and r.nhid in owned_ids)):
            continue
        key = str(r.dst)
        want = want_routes.get(key)
        if want is None or key in seen:
            # no lease wants it, or a second route for the prefix (another metric)
            route_dels.append(Op("delete", r))
            continue
        seen.add(key)
        if not same_route(want, r):
            route_adds.append(Op("replace", want))
    route_adds.extend(Op("replace", w) for k, w in want_routes.items() if k not in seen)

    neigh_adds, neigh_dels = _diff_keyed(desired.neighbours, observed.neighbours,
                                         scope.owns_neighbour, neighbour_key, same_neighbour)
    fdb_adds, fdb_dels = _diff_keyed(desired.fdb, observed.fdb, scope.owns_fdb, fdb_key,
                                     lambda want, have: want.dst == have.dst)
    return (nh_adds + neigh_adds + fdb_adds + route_adds + route_dels + nh_dels + neigh_dels
            + fdb_dels)


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
    """Drives `plan` against a live RtNetlink socket."""

    def __init__(self, nl: RtNetlink, scope: KernelScope, *, resync_interval: float = 10.0,
                 debounce: float = 0.02, nexthops: bool | None = None) -> None:
        self.nl = nl
        self.scope = scope
        self.resync_interval = resync_interval
        self.debounce = debounce
        if nexthops is None:
            nexthops = os.environ.get("PYFLANNEL_NEXTHOP_OBJECTS", "auto").lower() not in (
                "off", "false", "0", "no")
        self.nexthops = nexthops
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
        if self.nexthops:
            return have.nhid is not None and NHID_BASE <= have.nhid < NHID_BASE + NHID_SPAN
        return have.nhid is None

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
                log.error("Reconcile failed: %s (retrying in 1 s)", e)
                await asyncio.sleep(1)
                self._dirty.set()

    async def observe(self) -> Observed:
        """Our objects in the kernel. Dumps are streamed and filtered as they arrive, so
        only owned objects are kept in memory."""
        obs = Observed()
        s = self.scope
        for fam in s.families:
            async for r in self.nl.dump_routes(fam, table=s.table):
                if s.owns_route(r) or r.nhid is not None:
                    obs.routes.append(r)
        if self.nexthops:
            for oif in s.route_oifs:
                async for nh in self.nl.dump_nexthops(oif=oif):
                    if s.owns_nexthop(nh):
                        obs.nexthops.append(nh)
        for ifindex in s.neighbour_ifindexes:
            for fam in s.families:
                async for n in self.nl.dump_neighbours(fam, ifindex=ifindex):
                    if s.owns_neighbour(n):
                        obs.neighbours.append(n)
            async for f in self.nl.dump_fdb(ifindex=ifindex):
                obs.fdb.append(f)
        return obs

    async def reconcile_once(self, *, drift: bool = False) -> int:
        """One full pass; returns the number of changes applied."""
        start = time.monotonic()
        desired = self._desired
        ops = plan(desired, await self.observe(), self.scope, nexthops=self.nexthops)
        results = await self.nl.apply(ops) if ops else []
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
                    if isinstance(obj, Route) and op.action == "replace":
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

