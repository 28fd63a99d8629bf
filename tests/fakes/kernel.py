"""FakeKernel: the RoutePort and LinkPort in memory, for unit tests of the daemon loop.

It applies ops the way the kernel does where our code depends on it (replace keyed by
table/dst/metric, gateways must be on a connected subnet unless onlink, deleting a
nexthop silently takes its IPv4 routes along, deleting a device takes its neighbours, FDB
entries and routes), emits the notifications the kernel would (a deleted neighbour is
reported failed, then deleted, as `ip monitor neigh` shows on Linux 6.18), and can make a foreign
change or fail the next op with an errno.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.ports import (
    DUMP_KINDS,
    Addr,
    DeviceSpec,
    ExistingDevice,
    Keyed,
    Net,
    Owned,
)
from pyflannel.netlink import (
    RTN_UNICAST,
    FdbEntry,
    LinkEvent,
    Neighbour,
    Nexthop,
    Op,
    OpResult,
    Route,
    RtEvent,
)
from pyflannel.netlink.codec import NUD_FAILED
from pyflannel.reconcile.plan import KernelScope

RouteKey = tuple[int, str, int]  # table, dst, metric


class FakeKernel:
    """One network namespace: the external interface `eth0` (ifindex 2) on `segment`."""

    def __init__(self, segment: str = "192.168.77.0/24", address: str = "192.168.77.1", *,
                 nexthops_supported: bool = True) -> None:
        self.segment = ip_network(segment)
        self.address = IPv4Address(address)
        self.nexthops_supported = nexthops_supported
        # net.ipv4.nexthop_compat_mode: 0 reports routes on nexthop objects without their
        # gateway and device (in dumps and notifications alike)
        self.compat_mode = 1
        self.routes: dict[RouteKey, Route] = {}
        self.nexthops: dict[int, Nexthop] = {}
        self.neighbours: dict[tuple[int, str], Neighbour] = {}
        self.fdb: dict[tuple[int, str], FdbEntry] = {}
        self.devices: dict[str, ExistingDevice] = {}
        self.up: set[int] = set()
        self.addresses: dict[int, set[tuple[Addr, int]]] = {}
        self._next_index = 10
        self._failures: list[tuple[type, int]] = []
        self._events: asyncio.Queue[list[RtEvent]] = asyncio.Queue()
        self.applied = 0  # ops applied, for tests that count work
        self.dumps = 0
        self.asked = 0  # objects asked for by key (dump with `only`)
        self.closed = False

    # -- what tests look at / do --------------------------------------------------------

    def interface(self) -> ExternalInterface:
        return ExternalInterface("eth0", 2, 1500, self.address, self.address,
                                 segments=(ip_network(self.segment),))

    async def find_interface(self, **_kw: object) -> ExternalInterface:
        return self.interface()

    def route(self, dst: str) -> Route | None:
        return next((r for (t, d, _m), r in sorted(self.routes.items())
                     if d == dst and t == 254), None)

    def fail_next(self, kind: type, err: int) -> None:
        """The next op on an object of `kind` fails with `err`."""
        self._failures.append((kind, err))

    def foreign(self, op: Op) -> None:
        """Someone else changes the kernel (ip route del ..., ip neigh replace ...)."""
        self._apply_one(op, emit=True)

    def delete_device(self, name: str) -> None:
        dev = self.devices.pop(name)
        self._drop_device(dev.index)
        self._emit([RtEvent("link_del", LinkEvent(dev.index, name))])

    # -- RoutePort ------------------------------------------------------------------------

    async def dump(self, scope: KernelScope, *, nexthops: bool,
                   kinds: Collection[str] = DUMP_KINDS,
                   only: Sequence[Keyed] = ()
                   ) -> AsyncGenerator[Owned, None]:
        if only:
            self.asked += len(only)
            for o in only:
                have = (self.nexthops.get(o.id) if isinstance(o, Nexthop) else
                        self.neighbours.get(_neigh_key(o)) if isinstance(o, Neighbour) else
                        self.fdb.get(_fdb_key(o)))
                if have is not None:
                    yield have
            return
        fams = {4 if f == 2 else 6 for f in scope.families}
        # listed from copies, as the kernel's dump is a read of its state at the time
        if "routes" in kinds:
            self.dumps += 1  # whole dumps are counted: a check's lists the routes first
            for (table, _d, _m), r in sorted(self.routes.items()):
                if table == scope.table and r.dst.version in fams and (
                        scope.owns_route(r) or r.nhid is not None):
                    yield self._report(r)
        if nexthops and "nexthops" in kinds:
            for nh in list(self.nexthops.values()):
                if scope.owns_nexthop(nh):
                    yield nh
        if "neighbours" in kinds:
            for n in list(self.neighbours.values()):
                if scope.owns_neighbour(n):
                    yield n
        if "fdb" in kinds:
            for f in list(self.fdb.values()):
                if f.ifindex in scope.neighbour_ifindexes:
                    yield f

    async def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        results = []
        batch: list[RtEvent] = []
        for op in ops:
            err = self._failure(op)
            if err == 0:
                err, events = self._apply_one(op, emit=False)
                batch += [_tagged(ev) for ev in events]
            results.append(OpResult(op, err))
        self._emit(batch)
        return results

    async def events(self) -> AsyncIterator[list[RtEvent]]:
        while True:
            yield await self._events.get()

    async def lookup(self, dst: Addr) -> Route | None:
        host = ip_network(dst)
        if dst in self.segment:
            return Route(dst=host, gateway=None, oif=2)
        return Route(dst=host, gateway=IPv4Address("192.168.77.254"), oif=2)

    def close(self) -> None:
        self.closed = True

    # -- LinkPort -------------------------------------------------------------------------

    async def find(self, name: str) -> ExistingDevice | None:
        return self.devices.get(name)

    async def ensure(self, spec: DeviceSpec, mac: str) -> int:
        index = self._next_index
        self._next_index += 1
        self.devices[spec.name] = ExistingDevice(
            index=index, kind="vxlan", vni=spec.vni, link=spec.link, local=spec.local,
            port=spec.port, gbp=spec.gbp, learning=spec.learning, mac=mac, mtu=spec.mtu)
        self._emit([RtEvent("link_new", LinkEvent(index, spec.name))])
        return index

    async def set_up(self, index: int, *, mac: str | None = None, mtu: int | None = None,
                     address: tuple[Addr, Net | None] | None = None) -> None:
        name, dev = next((n, d) for n, d in self.devices.items() if d.index == index)
        self.devices[name] = ExistingDevice(**{**dev.__dict__, **(
            {"mac": mac} if mac else {}), **({"mtu": mtu} if mtu else {})})
        if address is not None:
            self.addresses[index] = {(address[0], address[0].max_prefixlen)}
            self.up.add(index)

    async def delete(self, index: int) -> None:
        name = next(n for n, d in self.devices.items() if d.index == index)
        del self.devices[name]
        self._drop_device(index)

    async def aclose(self) -> None:
        return None

    # -- the kernel's rules -------------------------------------------------------------------

    def _failure(self, op: Op) -> int:
        if isinstance(op.obj, Nexthop) and not self.nexthops_supported:
            return errno.EOPNOTSUPP if op.action == "replace" else errno.ENOENT
        for i, (kind, err) in enumerate(self._failures):
            if isinstance(op.obj, kind):
                del self._failures[i]
                return err
        return 0

    def _emit(self, batch: list[RtEvent]) -> None:
        if batch:
            self._events.put_nowait(batch)

    def _apply_one(self, op: Op, *, emit: bool) -> tuple[int, list[RtEvent]]:
        o = op.obj
        events: list[RtEvent] = []
        if isinstance(o, Route):
            err = self._route(op.action, o, events)
        elif isinstance(o, Nexthop):
            err = self._nexthop(op.action, o, events)
        elif isinstance(o, Neighbour):
            err = self._keyed(self.neighbours, _neigh_key(o), op.action, o, events, "neigh")
        else:
            err = self._keyed(self.fdb, _fdb_key(o), op.action, o, events, "neigh")
        if err == 0:
            self.applied += 1
        if emit:
            self._emit(events)
        return err, events

    def _route(self, action: str, r: Route, events: list[RtEvent]) -> int:
        metric = r.priority or (0 if r.dst.version == 4 else 1024)
        key = (r.table, str(r.dst), metric)
        if action == "delete":
            have = self.routes.get(key)
            if have is None or (r.gateway is not None and have.gateway != r.gateway):
                return errno.ESRCH
            del self.routes[key]
            events.append(RtEvent("route_del", self._report(have)))
            return 0
        if r.nhid is not None:
            nh = self.nexthops.get(r.nhid)
            if nh is None:
                return errno.EINVAL
            # kept with the nexthop's gateway/device, as nexthop_compat_mode=1 reports it
            r = Route(dst=r.dst, gateway=nh.gateway, oif=nh.oif, table=r.table,
                      protocol=r.protocol, onlink=nh.onlink, scope=r.scope, type=r.type,
                      nhid=r.nhid, priority=metric)
        elif r.type == RTN_UNICAST and not self._reachable(r.gateway, r.oif, r.onlink):
            return errno.ENETUNREACH
        else:
            r = Route(dst=r.dst, gateway=r.gateway, oif=r.oif, table=r.table,
                      protocol=r.protocol, onlink=r.onlink, scope=r.scope, type=r.type,
                      priority=metric)
        self.routes[key] = r
        events.append(RtEvent("route_new", self._report(r)))
        return 0

    def _report(self, r: Route) -> Route:
        """`r` as dumps and notifications show it: with nexthop_compat_mode 0 a route on a
        nexthop object has no gateway, device or onlink flag."""
        if r.nhid is None or self.compat_mode != 0:
            return r
        return Route(dst=r.dst, gateway=None, oif=None, table=r.table, protocol=r.protocol,
                     scope=r.scope, type=r.type, nhid=r.nhid, priority=r.priority)

    def _nexthop(self, action: str, nh: Nexthop, events: list[RtEvent]) -> int:
        if action == "delete":
            if nh.id not in self.nexthops:
                return errno.ENOENT
            gone = self.nexthops.pop(nh.id)
            # Linux removes the IPv4 routes using it without an RTM_DELROUTE.
            for key in [k for k, r in self.routes.items() if r.nhid == nh.id]:
                del self.routes[key]
            events.append(RtEvent("nexthop_del", gone))
            return 0
        if not self._reachable(nh.gateway, nh.oif, nh.onlink):
            return errno.ENETUNREACH
        self.nexthops[nh.id] = nh
        events.append(RtEvent("nexthop_new", nh))
        return 0

    def _keyed(self, table: dict[tuple[int, str], object], key: tuple[int, str], action: str,
               obj: Neighbour | FdbEntry, events: list[RtEvent], kind: str) -> int:
        if action == "delete":
            had = table.pop(key, None)
            if had is None:
                return errno.ENOENT
            if isinstance(had, Neighbour):
                # as the kernel does: first "FAILED" (no address), then deleted
                failed = Neighbour(had.ifindex, had.ip, "", NUD_FAILED)
                events.append(RtEvent("neigh_new", failed))
                events.append(RtEvent("neigh_del", failed))
            else:
                events.append(RtEvent("neigh_del", obj))  # type: ignore[arg-type]
            return 0
        if not any(d.index == obj.ifindex for d in self.devices.values()):
            return errno.ENODEV
        table[key] = obj
        events.append(RtEvent("neigh_new", obj))  # type: ignore[arg-type]
        return 0

    def _reachable(self, gw: IPv4Address | IPv6Address | None, oif: int | None,
                   onlink: bool) -> bool:
        if gw is None or onlink:
            return True
        return oif == 2 and gw in self.segment

    def _drop_device(self, index: int) -> None:
        for table in (self.neighbours, self.fdb):
            for key in [k for k in table if k[0] == index]:
                del table[key]
        for key in [k for k, r in self.routes.items() if r.oif == index]:
            del self.routes[key]  # (a route on a nexthop of the device has its oif here)
        for nid in [i for i, nh in self.nexthops.items() if nh.oif == index]:
            del self.nexthops[nid]
        self.up.discard(index)


__all__ = ["FakeKernel", "IPv4Network", "IPv6Network"]


def _tagged(ev: RtEvent) -> RtEvent:
    """A notification of our own request, marked `ours` where the kernel names the
    requester: routes, nexthops and a neighbour's update, not a neighbour's removal nor
    an FDB change."""
    if ev.kind in ("route_new", "route_del", "nexthop_new", "nexthop_del") or (
            ev.kind == "neigh_new" and isinstance(ev.obj, Neighbour)):
        return RtEvent(ev.kind, ev.obj, ours=True)
    return ev


def _neigh_key(n: Neighbour) -> tuple[int, str]:
    """Where the fake files a neighbour (its own keys, not the engine's)."""
    return (n.ifindex, str(n.ip))


def _fdb_key(f: FdbEntry) -> tuple[int, str]:
    return (f.ifindex, f.lladdr.lower())
