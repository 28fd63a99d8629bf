"""The ports on the real kernel: our own rtnetlink codec for routes and friends (the hot
path), pyroute2 for devices (the cold path). One long-lived handle each."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Sequence
from typing import TYPE_CHECKING, Any

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
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    NetlinkError,
    Op,
    OpResult,
    Route,
    RtEvent,
    RtMonitor,
    RtNetlink,
)
from pyflannel.reconcile.plan import KernelScope

if TYPE_CHECKING:
    from pyroute2 import AsyncIPRoute

# The dump socket's receive size: a dump's replies come in pieces this large, and the event
# loop runs between two, so a lease event waits for one piece (~100 objects decoded and
# compared) instead of ~400 with the kernel's 32 KiB. Listing 10k routes, neighbours or FDB
# entries took as long in 8 KiB pieces as in 32 KiB ones (30-37 ms each).
DUMP_RECV_BUFFER = 8192

_VXLAN_ATTRS = ("IFLA_VXLAN_ID", "IFLA_VXLAN_LINK", "IFLA_VXLAN_LOCAL", "IFLA_VXLAN_LOCAL6",
                "IFLA_VXLAN_PORT", "IFLA_VXLAN_GBP", "IFLA_VXLAN_LEARNING", "IFLA_VXLAN_GROUP",
                "IFLA_VXLAN_GROUP6", "IFLA_VXLAN_L2MISS")


class NetlinkRoutePort:
    """RoutePort on a request socket, a dump socket and a multicast subscriber. Dumps have
    a socket of their own so that changes can be applied while a dump is read (the safety
    net applies lease events in the middle of its listing). The subscriber is opened
    first, so no change between the first dump and the first event is missed."""

    def __init__(self, nl: RtNetlink, dumps: RtNetlink, monitor: RtMonitor | None) -> None:
        self.nl = nl
        self.dumps = dumps
        self.monitor = monitor

    @classmethod
    def open(cls, netns: str | None = None, *, events: bool = True) -> NetlinkRoutePort:
        monitor = (RtMonitor.open(netns, routes=True, neighbours=True, links=True,
                                  nexthops=True) if events else None)
        nl: RtNetlink | None = None
        try:
            nl = RtNetlink.open(netns)
            return cls(nl, RtNetlink.open(netns, recv_buffer=DUMP_RECV_BUFFER), monitor)
        except BaseException:
            for sock in (monitor, nl):
                if sock is not None:
                    sock.close()
            raise

    async def dump(self, scope: KernelScope, *, nexthops: bool,
                   kinds: Collection[str] = DUMP_KINDS,
                   only: Sequence[Keyed] = ()
                   ) -> AsyncGenerator[Owned, None]:
        nl = self.dumps
        if only:
            for o in await nl.get_objects(only):
                if o is not None:
                    yield o
            return
        if "routes" in kinds:
            for fam in scope.families:
                async for r in nl.dump_routes(fam, table=scope.table):
                    if scope.owns_route(r) or r.nhid is not None:
                        yield r
        if nexthops and "nexthops" in kinds:
            try:
                for oif in scope.route_oifs:
                    async for nh in nl.dump_nexthops(oif=oif):
                        if scope.owns_nexthop(nh):
                            yield nh
            except NetlinkError as e:
                if e.errno != errno.EOPNOTSUPP:  # a kernel without nexthop objects
                    raise
        for ifindex in scope.neighbour_ifindexes:
            if "neighbours" in kinds:
                for fam in scope.families:
                    async for n in nl.dump_neighbours(fam, ifindex=ifindex):
                        if scope.owns_neighbour(n):
                            yield n
            if "fdb" in kinds:
                async for f in nl.dump_fdb(ifindex=ifindex):
                    yield f

    async def apply(self, ops: Sequence[Op]) -> list[OpResult]:
        return await self.nl.apply(ops)

    async def events(self) -> AsyncIterator[list[RtEvent]]:
        if self.monitor is None:
            return
        async for batch in self.monitor.events(self.nl.portid):
            yield batch

    async def lookup(self, dst: Addr) -> Route | None:
        return await self.nl.get_route(dst)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
        self.nl.close()
        self.dumps.close()


class PyrouteLinkPort:
    """LinkPort through pyroute2's AsyncIPRoute, imported on first use only (host-gw never
    pays for it) and kept open: devices change at start-up and on recreation only."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._stack = contextlib.AsyncExitStack()
        self._ipr: AsyncIPRoute | None = None

    async def _handle(self) -> AsyncIPRoute:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            ipr = AsyncIPRoute(netns=self.netns) if self.netns else AsyncIPRoute()
            self._ipr = await self._stack.enter_async_context(ipr)
        return self._ipr

    async def find(self, name: str) -> ExistingDevice | None:
        from ipaddress import ip_address

        ipr = await self._handle()
        if not await ipr.link_lookup(ifname=name):
            return None
        msg = (await ipr.link("get", ifname=name))[0]
        kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        d: dict[str, Any] = {}
        if kind == "vxlan" and data is not None:
            d = {k: data.get(k) for k in _VXLAN_ATTRS}
        local = d.get("IFLA_VXLAN_LOCAL") or d.get("IFLA_VXLAN_LOCAL6")
        group = d.get("IFLA_VXLAN_GROUP") or d.get("IFLA_VXLAN_GROUP6")
        return ExistingDevice(
            index=int(msg["index"]), kind=kind, vni=d.get("IFLA_VXLAN_ID"),
            link=d.get("IFLA_VXLAN_LINK"), local=ip_address(local) if local else None,
            port=d.get("IFLA_VXLAN_PORT"), gbp=bool(d.get("IFLA_VXLAN_GBP")),
            learning=bool(d.get("IFLA_VXLAN_LEARNING")),
            group=str(group) if group and not ip_address(group).is_unspecified else None,
            l2miss=bool(d.get("IFLA_VXLAN_L2MISS")),
            mac=msg.get("IFLA_ADDRESS"), mtu=int(msg.get("IFLA_MTU") or 0))

    async def ensure(self, spec: DeviceSpec, mac: str) -> int:
        kw: dict[str, Any] = {
            "ifname": spec.name, "kind": "vxlan", "vxlan_id": spec.vni,
            "vxlan_link": spec.link, "vxlan_learning": int(spec.learning),
            "address": mac, "mtu": spec.mtu}
        kw["vxlan_local6" if spec.local.version == 6 else "vxlan_local"] = str(spec.local)
        if spec.port:
            kw["vxlan_port"] = spec.port
        if spec.gbp:
            kw["vxlan_gbp"] = True
        ipr = await self._handle()
        await ipr.link("add", **kw)
        index = int((await ipr.link_lookup(ifname=spec.name))[0])
        if spec.local.version == 6:
            self._disable_accept_ra(spec.name)
        return index

    async def set_up(self, index: int, *, mac: str | None = None, mtu: int | None = None,
                     address: tuple[Addr, Net | None] | None = None) -> None:
        ipr = await self._handle()
        changes: dict[str, Any] = {}
        if mac is not None:
            changes["address"] = mac
        if mtu is not None:
            changes["mtu"] = mtu
        if changes:
            await ipr.link("set", index=index, **changes)
        if address is not None:
            await self._set_address(ipr, index, *address)
            await ipr.link("set", index=index, state="up")

    async def _set_address(self, ipr: AsyncIPRoute, index: int, addr: Addr,
                           network: Net | None) -> None:
        """`addr` as /32 (/128) on the device; other addresses inside `network` go (a
        previous lease's), as upstream's EnsureV4AddressOnLink. The IPv6 one is
        `noprefixroute`: the kernel's /128 route would sit inside the cluster network on our
        device, where the engine owns every route."""
        from ipaddress import ip_address

        plen = addr.max_prefixlen
        v6 = addr.version == 6
        flags = IFA_F_NODAD | IFA_F_NOPREFIXROUTE if v6 else 0
        have = False
        family = socket.AF_INET6 if v6 else socket.AF_INET
        current = [a async for a in await ipr.addr("dump", family=family)
                   if a["index"] == index]
        for a in current:
            ip = ip_address(a.get("IFA_ADDRESS"))
            alen = int(a["prefixlen"])
            if ip == addr and alen == plen and (a.get("IFA_FLAGS") or 0) & flags == flags:
                have = True
            elif ip == addr or (network is not None and ip in network):
                await ipr.addr("del", index=index, address=str(ip), prefixlen=alen)
        if not have:
            extra: dict[str, Any] = {"IFA_FLAGS": flags} if v6 else {}
            await ipr.addr("add", index=index, address=str(addr), prefixlen=plen, **extra)

    def _disable_accept_ra(self, name: str) -> None:
        # /proc/sys/net is per namespace: only meaningful when we run inside it.
        if self.netns is None:
            with contextlib.suppress(OSError), \
                    open(f"/proc/sys/net/ipv6/conf/{name}/accept_ra", "w") as f:
                f.write("0")

    async def delete(self, index: int) -> None:
        ipr = await self._handle()
        await ipr.link("del", index=index)

    async def aclose(self) -> None:
        self._ipr = None
        await self._stack.aclose()
