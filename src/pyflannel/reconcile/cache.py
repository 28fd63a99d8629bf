"""ObservedCache: what the engine owns in the kernel, as last seen, so a pass never dumps.

Filled from a dump (start-up, the periodic safety net, after lost notifications) and kept
current from two sources: the results of our own changes (at once, so the next pass sees
them even before their notifications arrive) and the kernel's notifications, ours and
foreign alike (they carry the full objects). Replaying a notification whose change is
already here is harmless: per key, the last notification describes the latest state.

Kernel rules the cache follows: routes are keyed by prefix and metric (a second metric for
one of our prefixes is a second route); deleting a nexthop object takes the IPv4 routes
that use it along without a notification, so its routes leave the cache with it.
"""

from __future__ import annotations

from array import array
from collections.abc import Container, Iterable, Iterator, Sequence

from pyflannel.netlink import FdbEntry, Neighbour, Nexthop, Op, Route
from pyflannel.reconcile.plan import (
    IPV6_DEFAULT_METRIC,
    NHID_BASE,
    ChangedKeys,
    KernelScope,
    NhKey,
    Observed,
    fdb_key,
    neighbour_key,
    nh_key,
    route_key,
)

NeighKey = tuple[int, str]


def metric_of(r: Route) -> int:
    """The metric the kernel files `r` under (ours are sent without one)."""
    return r.priority or (0 if r.dst.version == 4 else IPV6_DEFAULT_METRIC)


class ObservedCache:
    # Slots, and no per-entry containers for the common case (one route per prefix, one
    # route per nexthop): at 10k peers this is the daemon's largest table.
    __slots__ = ("routes", "extra", "nexthops", "neighbours", "fdb", "_nh_ids", "_nh_routes",
                 "_free_hint")

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}  # prefix -> the route at the kernel's default metric
        self.extra: dict[str, dict[int, Route]] = {}  # prefix -> other metric -> route
        self.nexthops: dict[int, Nexthop] = {}  # ours only
        self.neighbours: dict[NeighKey, Neighbour] = {}
        self.fdb: dict[NeighKey, FdbEntry] = {}
        self._nh_ids: dict[NhKey, int | set[int]] = {}  # (gateway, oif, onlink) -> id(s)
        self._nh_routes: dict[int, str | set[str]] = {}  # nhid -> prefix(es) of its routes
        self._free_hint = NHID_BASE  # no id below it is free

    @classmethod
    def from_observed(cls, obs: Observed, scope: KernelScope) -> ObservedCache:
        c = cls()
        for nh in obs.nexthops:
            c.put_nexthop(nh, scope)
        for r in obs.routes:
            c.put_route(r, scope)
        for n in obs.neighbours:
            c.put_neighbour(n, scope)
        for f in obs.fdb:
            c.put_fdb(f, scope)
        return c

    # -- updates (from op results and notifications alike) ------------------------------

    def put_route(self, r: Route, scope: KernelScope, *, ours: bool = False) -> None:
        """A route as the kernel now has it: cached when the dump would list it. `ours`:
        the object we sent (shares its parts with the desired state): kept in preference
        to a decoded notification that says the same."""
        if r.table != scope.table or not (r.nhid is not None or scope.owns_route(r)):
            self.drop_route(r)
            return
        k = route_key(r)
        metric = metric_of(r)
        default = metric == (0 if r.dst.version == 4 else IPV6_DEFAULT_METRIC)
        old = self.routes.get(k) if default else self.extra.get(k, {}).get(metric)
        if old is not None and not ours and _route_facts(old) == _route_facts(r):
            return  # keep the object we have (ours, shared with the desired state)
        if default:
            self.routes[k] = r
        else:
            self.extra.setdefault(k, {})[metric] = r
        if old is not None and old.nhid is not None and old.nhid != r.nhid:
            self._unlink(old.nhid, k)
        if r.nhid is not None:
            self._link(r.nhid, k)

    def drop_route(self, r: Route, k: str | None = None) -> None:
        """`k`: its key, when the caller has it."""
        if k is None:
            k = route_key(r)
        p = r.priority  # 0: the kernel's default metric (the common case, tested first)
        if not p or p == (0 if r.dst.version == 4 else IPV6_DEFAULT_METRIC):
            old = self.routes.pop(k, None)
        else:
            per = self.extra.get(k)
            old = per.pop(p, None) if per else None
            if per is not None and not per:
                del self.extra[k]
        if old is not None and old.nhid is not None:
            self._unlink(old.nhid, k)

    def _link(self, nhid: int, k: str) -> None:
        have = self._nh_routes.get(nhid)
        if have is None:
            self._nh_routes[nhid] = k
        elif isinstance(have, str):
            if have != k:
                self._nh_routes[nhid] = {have, k}
        else:
            have.add(k)

    def _unlink(self, nhid: int, k: str) -> None:
        r = self.routes.get(k)
        per = self.extra.get(k)
        if (r is not None and r.nhid == nhid) or (per and any(
                x.nhid == nhid for x in per.values())):
            return  # another metric of this prefix still uses it
        have = self._nh_routes.get(nhid)
        if have == k:
            del self._nh_routes[nhid]
        elif isinstance(have, set):
            have.discard(k)
            if not have:
                del self._nh_routes[nhid]

    def put_nexthop(self, nh: Nexthop, scope: KernelScope, *, ours: bool = False) -> None:
        if not scope.owns_nexthop(nh):
            self.drop_nexthop(nh.id, routes=False)
            return
        old = self.nexthops.get(nh.id)
        if old is not None:
            if not ours and nh_key(old) == nh_key(nh):
                return
            self._forget_key(old)
        self.nexthops[nh.id] = nh
        k = nh_key(nh)
        have = self._nh_ids.get(k)
        if have is None:
            self._nh_ids[k] = nh.id
        elif isinstance(have, int):
            if have != nh.id:
                self._nh_ids[k] = {have, nh.id}
        else:
            have.add(nh.id)

    def drop_nexthop(self, nhid: int, *, routes: bool = True) -> set[str]:
        """Forget nexthop `nhid`; with `routes`, also the routes that used it (the kernel
        removed them). Returns their prefixes."""
        old = self.nexthops.pop(nhid, None)
        if old is not None:
            self._forget_key(old)
            if nhid < self._free_hint:
                self._free_hint = nhid
        have = self._nh_routes.pop(nhid, None)
        if have is None or not routes:
            return set()  # (the common case: its routes were deleted before it)
        gone = {have} if isinstance(have, str) else have
        for k in gone:
            r = self.routes.get(k)
            if r is not None and r.nhid == nhid:
                del self.routes[k]
            per = self.extra.get(k)
            if per:
                for m in [m for m, x in per.items() if x.nhid == nhid]:
                    del per[m]
                if not per:
                    del self.extra[k]
        return gone

    def _forget_key(self, nh: Nexthop) -> None:
        k = nh_key(nh)
        ids = self._nh_ids.get(k)
        if ids == nh.id:
            del self._nh_ids[k]
        elif isinstance(ids, set):
            ids.discard(nh.id)
            if not ids:
                del self._nh_ids[k]

    def put_neighbour(self, n: Neighbour, scope: KernelScope) -> None:
        if scope.owns_neighbour(n):
            self.neighbours[neighbour_key(n)] = n
        else:
            self.neighbours.pop(neighbour_key(n), None)

    def drop_neighbour(self, n: Neighbour) -> None:
        self.neighbours.pop(neighbour_key(n), None)

    def put_fdb(self, f: FdbEntry, scope: KernelScope) -> None:
        if scope.owns_fdb(f):
            self.fdb[fdb_key(f)] = f
        else:
            self.fdb.pop(fdb_key(f), None)

    def drop_fdb(self, f: FdbEntry) -> None:
        self.fdb.pop(fdb_key(f), None)

    # -- queries ------------------------------------------------------------------------

    def nexthop_id(self, key: NhKey) -> int | None:
        """Our nexthop for (gateway, oif, onlink), the lowest id when there are several
        (as `plan` picks from a dump, which lists them by id)."""
        ids = self._nh_ids.get(key)
        if ids is None or isinstance(ids, int):
            return ids
        return min(ids) if ids else None

    def free_nexthop_id(self, taken: Container[int], after: int = 0) -> int:
        """The lowest id of our range above `after` that neither the kernel nor `taken`
        uses (as `plan` allocates). A pass allocating many gives the last id it got as
        `after`: every id below that is taken, so each allocation is O(1), not a scan over
        those the pass already holds (10k new peers in one pass took minutes)."""
        i = self._free_hint
        while i in self.nexthops:
            i += 1
        self._free_hint = i  # every id below is the kernel's: the next search starts here
        i = max(i, after + 1)
        while i in self.nexthops or i in taken:
            i += 1
        if i >= NHID_BASE + (1 << 20):
            raise RuntimeError("out of nexthop ids")
        return i

    def routes_using(self, nhid: int) -> set[str]:
        have = self._nh_routes.get(nhid)
        if have is None:
            return set()
        return {have} if isinstance(have, str) else set(have)

    def route_prefixes(self) -> set[str]:
        return self.routes.keys() | self.extra.keys()

    def route_at(self, k: str, metric: int) -> Route | None:
        """The cached route to prefix `k` at `metric` (as metric_of gives it)."""
        r = self.routes.get(k)
        if r is not None and metric_of(r) == metric:
            return r
        per = self.extra.get(k)
        return per.get(metric) if per else None

    def routes_at(self, k: str) -> Iterator[Route]:
        """The routes to prefix `k`, lowest metric first (as a dump lists them)."""
        r = self.routes.get(k)
        per = self.extra.get(k)
        if not per:
            if r is not None:
                yield r
            return
        both = dict(per)
        if r is not None:
            both[metric_of(r)] = r
        for m in sorted(both):
            yield both[m]

    def observed(self, routes: Iterable[str], neighbours: Iterable[NeighKey],
                 fdb: Iterable[NeighKey]) -> Observed:
        """The part of the kernel at these keys, as `plan` takes it."""
        obs = Observed()
        for k in routes:
            obs.routes.extend(self.routes_at(k))
        obs.neighbours = [n for n in (self.neighbours.get(k) for k in neighbours)
                          if n is not None]
        obs.fdb = [f for f in (self.fdb.get(k) for k in fdb) if f is not None]
        return obs

    def differences(self, truth: ObservedCache) -> tuple[list[str], ChangedKeys, set[int]]:
        """How this cache differs from `truth` (a fresh dump): one line each, the keys that
        differ, and the nexthop ids that differ. Compared is what `plan` looks at (an object
        we put is cached as sent; the kernel may report fields `plan` ignores differently)."""
        out: list[str] = []
        keys = ChangedKeys()
        nhids: set[int] = set()
        for k in self.route_prefixes() | truth.route_prefixes():
            mine = {metric_of(r): r for r in self.routes_at(k)}
            real = {metric_of(r): r for r in truth.routes_at(k)}
            for m in mine.keys() | real.keys():
                a, b = mine.get(m), real.get(m)
                if _facts(a) != _facts(b):
                    out.append(_difference(f"route to {k} metric {m}", a, b))
                    keys.routes.add(k)
        for i in self.nexthops.keys() | truth.nexthops.keys():
            a2, b2 = self.nexthops.get(i), truth.nexthops.get(i)
            if _facts(a2) != _facts(b2):
                out.append(_difference(f"nexthop {i}", a2, b2))
                nhids.add(i)
        for nk in self.neighbours.keys() | truth.neighbours.keys():
            a3, b3 = self.neighbours.get(nk), truth.neighbours.get(nk)
            if _facts(a3) != _facts(b3):
                out.append(_difference(f"neighbour {nk[1]} on #{nk[0]}", a3, b3))
                keys.neighbours.add(nk)
        for fk in self.fdb.keys() | truth.fdb.keys():
            a4, b4 = self.fdb.get(fk), truth.fdb.get(fk)
            if _facts(a4) != _facts(b4):
                out.append(_difference(f"FDB entry {fk[1]} on #{fk[0]}", a4, b4))
                keys.fdb.add(fk)
        return out, keys, nhids


# Kinds whose kernel listing may go on from a position rather than from the last key (the
# neighbour table's and vxlan's FDB hash walks; nexthops on older kernels, whose listings
# say so with NLM_F_DUMP_INTR, as newer ones do for any change): a change made during it
# can make the rest miss or repeat other objects, so the count does not tell.
_POSITIONAL = frozenset({"nexthops", "neighbours", "fdb"})


class CacheCheck:
    """The safety net's comparison, made while the dump streams in: each listed object is
    held against the cached one at its key, and the cache takes the kernel's word where
    they differ. A listed object that agrees is dropped at once, so a check holds no second
    copy of what we own (a copy of 10k routes and nexthops, with its indexes, raised a
    daemon's peak RSS by 2.7 MiB). Compared is what `differences` compares (`_facts`).

    Objects cached but not listed are found by counting: `complete()` is False when fewer
    cached objects were listed than the cache held when the dump began (the caller then
    compares against a full copy). That count is exact only if nothing else changed the
    cache meanwhile, so the caller checks that no notification came in between. The dump
    comes in segments, one kind each (`begin`), each counted against what the cache held
    of that kind when the segment began. The caller may change the cache between segments
    (apply the lease events that came in), and during one if it says so first
    (`changing`): the rest of that listing skips the keys changed, and they leave the
    count on both sides. Whether one was listed already is looked up among the hashes of
    the keys listed so far (8 bytes each). A listing whose count cannot be kept exact
    that way, or that the kernel says was interrupted, is not counted (`interrupted`)."""

    __slots__ = ("cache", "scope", "diffs", "keys", "nhids", "interrupted", "_kind", "_skip",
                 "_fresh", "_seen", "_listed", "_held", "_exact")

    def __init__(self, cache: ObservedCache, scope: KernelScope) -> None:
        self.cache, self.scope = cache, scope
        self.diffs: list[str] = []
        self.keys = ChangedKeys()
        self.nhids: set[int] = set()
        self.interrupted = False  # the current segment's count does not tell
        self._kind = ""
        self._skip: set[object] = set()  # keys changed during the current segment's listing
        self._fresh: set[object] = set()  # keys the listing itself brought into the cache
        self._seen = array("q")  # hashes of the keys of the cached objects listed
        self._listed = self._held = 0
        self._exact = True  # every segment before the current one listed all it held

    def _count(self, kind: str) -> int:
        c = self.cache
        if kind == "routes":
            return len(c.routes) + sum(map(len, c.extra.values()))
        return len(c.nexthops if kind == "nexthops" else
                   c.neighbours if kind == "neighbours" else c.fdb)

    def begin(self, kind: str) -> None:
        """The next segment of the dump lists `kind` (one of DUMP_KINDS) alone. The one
        before counts unless it was interrupted."""
        if not self.interrupted:
            self._exact = self._exact and self._listed == self._held
        self.interrupted = False
        self._kind = kind
        self._skip = set()
        self._fresh = set()
        self._seen = array("q")
        self._listed = 0
        self._held = self._count(kind)

    def changing(self, ops: Sequence[Op], taken_from: int | None = None) -> None:
        """These ops are about to be applied (the kernel and the cache changed) while the
        current segment is listed: what is still to come of the listing may show their
        objects as before or as after, so their keys are skipped, and what the cache holds
        at them leaves the count, as listed or as held. That keeps the count exact where
        the kernel's listing goes on from the last key it gave (routes, by prefix); where
        it may go on from a position (see _POSITIONAL), or for a key the listing itself
        brought into the cache, the listing is not counted (`interrupted`).
        The ops from `taken_from` on are deletions the pass took out of the cache already
        (the engine's `taken_from`): each was held, and counts as such."""
        if taken_from is None:
            taken_from = len(ops)
        kind, skip, c = self._kind, self._skip, self.cache
        for i, op in enumerate(ops):
            o = op.obj
            gone = i >= taken_from
            if type(o) is Route:
                if kind != "routes":
                    continue
                rk = route_key(o)
                k: object = rk
                cached = (rk in c.routes) + len(c.extra.get(rk, ())) + gone
            elif type(o) is Nexthop:
                if kind != "nexthops":
                    continue
                k = o.id
                cached = gone or k in c.nexthops
            elif type(o) is Neighbour:
                if kind != "neighbours":
                    continue
                k = neighbour_key(o)
                cached = gone or k in c.neighbours
            elif kind == "fdb" and isinstance(o, FdbEntry):
                k = fdb_key(o)
                cached = gone or k in c.fdb
            else:
                continue
            if k in skip:
                continue
            skip.add(k)
            if k in self._fresh or kind in _POSITIONAL:
                self.interrupted = True
            elif cached:
                self._held -= cached
                self._listed -= self._seen.count(hash(k))

    def _listed_at(self, k: object, have: object) -> None:
        if have is None:
            self._fresh.add(k)
        else:
            self._listed += 1
            self._seen.append(hash(k))

    def see(self, o: Route | Nexthop | Neighbour | FdbEntry) -> None:
        c, scope, skip = self.cache, self.scope, self._skip
        if isinstance(o, Route):
            if o.table != scope.table or not (o.nhid is not None or scope.owns_route(o)):
                return  # the cache would not hold it
            k, m = route_key(o), metric_of(o)
            if skip and k in skip:
                return
            have = c.route_at(k, m)
            self._listed_at(k, have)
            if _facts(have) != _facts(o):
                self.diffs.append(_difference(f"route to {k} metric {m}", have, o))
                self.keys.routes.add(k)
                c.put_route(o, scope)
        elif isinstance(o, Nexthop):
            if not scope.owns_nexthop(o) or (skip and o.id in skip):
                return
            nh = c.nexthops.get(o.id)
            self._listed_at(o.id, nh)
            if _facts(nh) != _facts(o):
                self.diffs.append(_difference(f"nexthop {o.id}", nh, o))
                self.nhids.add(o.id)
                self.keys.routes |= c.routes_using(o.id)
                c.put_nexthop(o, scope)
        elif isinstance(o, Neighbour):
            if not scope.owns_neighbour(o):
                return
            nk = neighbour_key(o)
            if skip and nk in skip:
                return
            n = c.neighbours.get(nk)
            self._listed_at(nk, n)
            if _facts(n) != _facts(o):
                self.diffs.append(_difference(f"neighbour {nk[1]} on #{nk[0]}", n, o))
                self.keys.neighbours.add(nk)
                c.put_neighbour(o, scope)
        else:
            if not scope.owns_fdb(o):
                return
            fk = fdb_key(o)
            if skip and fk in skip:
                return
            f = c.fdb.get(fk)
            self._listed_at(fk, f)
            if _facts(f) != _facts(o):
                self.diffs.append(_difference(f"FDB entry {fk[1]} on #{fk[0]}", f, o))
                self.keys.fdb.add(fk)
                c.put_fdb(o, scope)

    def unseen(self, limit: int) -> list[Nexthop | Neighbour | FdbEntry] | None:
        """After an uncounted listing of nexthops, neighbours or FDB entries (the kinds the
        kernel answers for by key): the cached objects of that kind it did not show, those
        changed during it aside. None for routes, or when there are more than `limit`."""
        kind, c = self._kind, self.cache
        items: Iterable[tuple[object, Nexthop | Neighbour | FdbEntry]]
        if kind == "nexthops":
            items = c.nexthops.items()
        elif kind == "neighbours":
            items = c.neighbours.items()
        elif kind == "fdb":
            items = c.fdb.items()
        else:
            return None
        seen, skip, fresh = set(self._seen), self._skip, self._fresh
        out: list[Nexthop | Neighbour | FdbEntry] = []
        for k, o in items:
            if hash(k) in seen or k in skip or k in fresh:
                continue
            if len(out) == limit:
                return None
            out.append(o)
        return out

    def confirm(self, asked: Sequence[Nexthop | Neighbour | FdbEntry],
                found: Iterable[Nexthop | Neighbour | FdbEntry]) -> None:
        """The kernel's answers for `unseen()`: each object found is compared as if listed;
        one asked for and not found is a difference (cached, not in the kernel), taken out
        of the cache with its key marked. Every cached object of the kind is then accounted
        for: the listing counts as complete."""
        c, keys = self.cache, self.keys
        found_keys: set[object] = set()
        for o in found:
            found_keys.add(o.id if isinstance(o, Nexthop) else
                           neighbour_key(o) if isinstance(o, Neighbour) else fdb_key(o))
            self.see(o)
        for o in asked:
            # Gone from the cache already: a notification of its removal came meanwhile.
            if isinstance(o, Nexthop):
                if o.id in found_keys or o.id not in c.nexthops:
                    continue
                self.nhids.add(o.id)
                keys.routes |= c.drop_nexthop(o.id)  # and its routes, as the kernel's did
                what = f"nexthop {o.id}"
            elif isinstance(o, Neighbour):
                nk = neighbour_key(o)
                if nk in found_keys or c.neighbours.pop(nk, None) is None:
                    continue
                keys.neighbours.add(nk)
                what = f"neighbour {nk[1]} on #{nk[0]}"
            else:
                fk = fdb_key(o)
                if fk in found_keys or c.fdb.pop(fk, None) is None:
                    continue
                keys.fdb.add(fk)
                what = f"FDB entry {fk[1]} on #{fk[0]}"
            self.diffs.append(_difference(what, o, None))
        self.interrupted = False
        self._listed = self._held

    def complete(self) -> bool:
        """Every object cached when each counted segment began was listed (an interrupted
        segment is not counted)."""
        return self._exact and (self.interrupted or self._listed == self._held)


def _route_facts(r: Route | None) -> tuple[object, ...] | None:
    if r is None:
        return None
    if r.nhid is not None:
        return (r.type, r.nhid)
    return (r.type, r.gateway, r.oif, r.onlink)


def _facts(o: Route | Nexthop | Neighbour | FdbEntry | None) -> object:
    """What a check compares of a cached and a listed object: what `plan` looks at."""
    if o is None:
        return None
    if isinstance(o, Route):
        return _route_facts(o)
    if isinstance(o, Nexthop):
        return nh_key(o)
    if isinstance(o, Neighbour):
        return o.lladdr.lower()
    return o.dst


def _difference(what: str, cached: Route | Nexthop | Neighbour | FdbEntry | None,
                kernel: Route | Nexthop | Neighbour | FdbEntry | None) -> str:
    return f"{what}: cached {_show(cached)}, kernel {_show(kernel)}"


def _show(o: Route | Nexthop | Neighbour | FdbEntry | None) -> str:
    if o is None:
        return "none"
    if isinstance(o, Route):
        nh = f" nhid {o.nhid}" if o.nhid is not None else ""
        return f"via {o.gateway} dev #{o.oif} type {o.type}{nh}"
    if isinstance(o, Nexthop):
        return f"via {o.gateway} dev #{o.oif}{' onlink' if o.onlink else ''}"
    if isinstance(o, Neighbour):
        return f"lladdr {o.lladdr} state {o.state:#x}"
    return f"dst {o.dst}"
