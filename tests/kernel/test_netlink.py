"""RtNetlink / RtMonitor against the real kernel, inside throw-away network namespaces.

What the kernel ends up holding is checked with iproute2 (`ip`, `bridge`), not with our own
decoder, so an encoder bug cannot hide behind a matching decoder bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

import pytest

from pyflannel.netlink import (
    IFA_F_DEPRECATED,
    IFA_F_HOMEADDRESS,
    IFA_F_NODAD,
    IFA_F_NOPREFIXROUTE,
    IFA_F_PERMANENT,
    IFA_F_SECONDARY,
    IFF_LOWER_UP,
    IFF_RUNNING,
    IFF_UP,
    RT_SCOPE_LINK,
    RTPROT_BOOT,
    RTPROT_KERNEL,
    Address,
    FdbEntry,
    LinkEvent,
    Neighbour,
    NetlinkError,
    Nexthop,
    Op,
    Route,
    RtEvent,
    RtMonitor,
    RtNetlink,
)
from pyflannel.netlink.codec import FDB_STATE, NTF_SELF, NUD_STALE
from pyflannel_lab.netns import NetNamespace

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("bridge") is None,
                       reason="needs root and iproute2"),
]

# Hang protection only: every wait below normally ends in milliseconds.
EVENT_TIMEOUT = 20.0


def ifindex(ns: NetNamespace, name: str) -> int:
    return int(ns.ip("-o", "link", "show", name).stdout.split(":", 1)[0])


def with_veth(ns: NetNamespace, addr: str = "192.168.0.1/24") -> int:
    """veth v0 (peer v1, same namespace: the kernel has no dummy links) with `addr`."""
    ns.ip("link", "add", "v0", "type", "veth", "peer", "name", "v1")
    ns.ip("addr", "add", addr, "dev", "v0")
    ns.ip("link", "set", "v0", "up")
    ns.ip("link", "set", "v1", "up")
    return ifindex(ns, "v0")


def route_lines(ns: NetNamespace, *args: str) -> set[str]:
    return {line.strip() for line in ns.ip(*args, "route", "show").stdout.splitlines()}


def net4(text: str) -> IPv4Network:
    return IPv4Network(text)


def ip4(text: str) -> IPv4Address:
    return IPv4Address(text)


# --- host-gw routes ---------------------------------------------------------------------------

async def test_hostgw_routes_replace_dump_delete(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    good = [Route(net4(f"10.244.{i}.0/24"), ip4(f"192.168.0.{i + 1}"), v0) for i in (1, 2, 3)]
    off_link = Route(net4("10.244.9.0/24"), ip4("10.99.0.1"), v0)
    ops = [Op("replace", good[0]), Op("replace", off_link), Op("replace", good[1]),
           Op("replace", good[2])]
    with RtNetlink.open(netns.name) as nl:
        results = await nl.apply(ops, window=2)  # the failing op sits inside a window
        assert [r.op for r in results] == ops
        assert [r.errno for r in results] == [0, errno.ENETUNREACH, 0, 0]
        assert route_lines(netns) == {
            "10.244.1.0/24 via 192.168.0.2 dev v0",
            "10.244.2.0/24 via 192.168.0.3 dev v0",
            "10.244.3.0/24 via 192.168.0.4 dev v0",
            "192.168.0.0/24 dev v0 proto kernel scope link src 192.168.0.1",
        }
        dumped = {r async for r in nl.dump_routes(socket.AF_INET)}
        connected = Route(net4("192.168.0.0/24"), None, v0, protocol=RTPROT_KERNEL,
                          scope=RT_SCOPE_LINK)
        assert dumped == set(good) | {connected}

        # replace moves an existing route to a new gateway instead of adding a second one
        moved = Route(net4("10.244.1.0/24"), ip4("192.168.0.20"), v0)
        assert [r.errno for r in await nl.apply([Op("replace", moved)])] == [0]

        deletes = [
            Op("delete", moved),                                      # dst + gateway + oif
            Op("delete", Route(net4("10.244.2.0/24"), None, None)),  # dst only
            Op("delete", Route(net4("10.244.3.0/24"), ip4("192.168.0.99"), v0)),  # wrong gw
            Op("delete", Route(net4("10.250.0.0/24"), None, None)),  # not there
        ]
        assert [r.errno for r in await nl.apply(deletes)] == [0, 0, errno.ESRCH, errno.ESRCH]
        assert route_lines(netns) == {
            "10.244.3.0/24 via 192.168.0.4 dev v0",
            "192.168.0.0/24 dev v0 proto kernel scope link src 192.168.0.1",
        }


async def test_apply_reports_failures_anywhere_in_a_window(netns: NetNamespace) -> None:
    """Only a window's last message asks for an ack: a failure before it is still reported
    with its own op, and the ops without an answer are the ones that succeeded."""
    v0 = with_veth(netns)
    good = [Route(net4(f"10.244.{i}.0/24"), ip4(f"192.168.0.{i + 1}"), v0) for i in range(5)]
    bad = [Route(net4(f"10.245.{i}.0/24"), ip4("10.99.0.1"), v0) for i in range(3)]
    ops = [Op("replace", r) for r in (bad[0], good[0], good[1], bad[1], good[2], good[3],
                                     good[4], bad[2])]
    with RtNetlink.open(netns.name) as nl:
        for window in (1, 3, 4, 128):
            results = await nl.apply(ops, window=window)
            assert [r.op for r in results] == ops
            assert [r.errno for r in results] == [
                errno.ENETUNREACH, 0, 0, errno.ENETUNREACH, 0, 0, 0, errno.ENETUNREACH], window
            assert {f"10.244.{i}.0/24 via 192.168.0.{i + 1} dev v0" for i in range(5)} <= (
                route_lines(netns))
            gone = [Op("delete", good[1]), Op("delete", good[1]), Op("delete", good[3])]
            assert [r.errno for r in await nl.apply(gone, window=window)] == [
                0, errno.ESRCH, 0]


def table_1000(ns: NetNamespace) -> set[str]:
    return {line.strip() for line in ns.ip("route", "show", "table", "1000").stdout.splitlines()}


async def test_routes_in_other_tables(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    route = Route(net4("10.7.0.0/16"), ip4("192.168.0.2"), v0, table=1000)
    with RtNetlink.open(netns.name) as nl:
        assert [r.errno for r in await nl.apply([Op("replace", route)])] == [0]
        assert table_1000(netns) == {"10.7.0.0/16 via 192.168.0.2 dev v0"}
        assert [r async for r in nl.dump_routes(socket.AF_INET, table=1000)] == [route]
        assert route not in {r async for r in nl.dump_routes(socket.AF_INET)}
        everything = {r async for r in nl.dump_routes(socket.AF_INET, table=None)}
        assert route in everything and any(r.table == 255 for r in everything)  # local table
        assert [r async for r in nl.dump_routes(socket.AF_INET, table=77)] == []
        assert [r.errno for r in await nl.apply([Op("delete", route)])] == [0]
        assert table_1000(netns) == set()


async def test_ipv6_routes(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    netns.ip("-6", "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
    route = Route(IPv6Network("2001:db8:1::/64"), IPv6Address("2001:db8::2"), v0)
    with RtNetlink.open(netns.name) as nl:
        assert [r.errno for r in await nl.apply([Op("replace", route)])] == [0]
        assert "2001:db8:1::/64 via 2001:db8::2 dev v0 metric 1024 pref medium" in route_lines(
            netns, "-6")
        assert route in {r async for r in nl.dump_routes(socket.AF_INET6)}
        got = await nl.get_route(IPv6Address("2001:db8:1::5"))
        assert got is not None and (got.gateway, got.oif) == (IPv6Address("2001:db8::2"), v0)
        assert [r.errno for r in await nl.apply([Op("delete", route)])] == [0]
        assert not any(line.startswith("2001:db8:1::") for line in route_lines(netns, "-6"))


async def test_get_route(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    netns.ip("route", "add", "10.8.0.0/16", "via", "192.168.0.7", "dev", "v0")
    with RtNetlink.open(netns.name) as nl:
        direct = await nl.get_route(ip4("192.168.0.5"))
        assert direct is not None
        assert (direct.dst, direct.gateway, direct.oif) == (net4("192.168.0.5/32"), None, v0)
        via = await nl.get_route(ip4("10.8.1.1"))
        assert via is not None and (via.gateway, via.oif) == (ip4("192.168.0.7"), v0)
        assert await nl.get_route(ip4("172.31.0.1")) is None  # no default route here


async def test_open_inside_netns_leaves_this_thread_where_it_was(netns: NetNamespace) -> None:
    before = os.stat("/proc/thread-self/ns/net").st_ino
    with_veth(netns, "192.168.77.1/24")
    with RtNetlink.open(netns.name) as nl:
        assert os.stat("/proc/thread-self/ns/net").st_ino == before
        dsts = {r.dst async for r in nl.dump_routes(socket.AF_INET)}
    assert dsts == {net4("192.168.77.0/24")}


# --- vxlan peers: neighbour + fdb + onlink route ----------------------------------------------

def vxlan_setup(ns: NetNamespace) -> int:
    with_veth(ns)
    ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "v0",
          "local", "192.168.0.1", "nolearning", "dstport", "8472")
    ns.ip("addr", "add", "10.244.0.0/32", "dev", "flannel.1")
    ns.ip("link", "set", "flannel.1", "up")
    return ifindex(ns, "flannel.1")


def peer_ops(vx: int, i: int, action: str = "replace") -> list[Op]:
    mac = f"0e:00:00:00:00:{i:02x}"
    vtep = ip4(f"10.244.{i}.0")
    objs: list[Neighbour | FdbEntry | Route] = [
        Neighbour(vx, vtep, mac),
        FdbEntry(vx, mac, ip4(f"192.168.0.{i + 1}")),
        Route(net4(f"10.244.{i}.0/24"), vtep, vx, onlink=True),
    ]
    if action == "delete":
        objs.reverse()
    return [Op("replace" if action == "replace" else "delete", o) for o in objs]


def fdb_json(ns: NetNamespace) -> list[dict[str, object]]:
    out = ns.run("bridge", "-j", "fdb", "show", "dev", "flannel.1").stdout
    entries: list[dict[str, object]] = json.loads(out or "[]")
    return entries


RAW_FDB_DUMP = """
import json, socket
from pyflannel.netlink.codec import (NDA_LLADDR, NDMSG, NLMSG_DONE, encode_fdb_dump,
                                     iter_attrs, iter_messages)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.send(encode_fdb_dump(1, None))
out, done = {}, False
while not done:
    buf = s.recv(65536)
    for mtype, _f, _s, start, stop in iter_messages(buf):
        if mtype == NLMSG_DONE:
            done = True
        elif mtype == 28:
            _fam, _p1, _p2, _idx, state, flags, _t = NDMSG.unpack_from(buf, start)
            for atype, p, q in iter_attrs(buf, start + NDMSG.size, stop):
                if atype == NDA_LLADDR:
                    out[buf[p:q].hex(":")] = [state, flags]
print(json.dumps(out))
"""


def raw_fdb_state(ns: NetNamespace) -> dict[str, list[int]]:
    """(ndm_state, ndm_flags) per MAC, read in a separate process inside the namespace."""
    result: dict[str, list[int]] = json.loads(ns.run(sys.executable, "-c", RAW_FDB_DUMP).stdout)
    return result


async def test_vxlan_peers(netns: NetNamespace) -> None:
    vx = vxlan_setup(netns)
    ops = peer_ops(vx, 1) + peer_ops(vx, 2)
    with RtNetlink.open(netns.name) as nl:
        assert [r.errno for r in await nl.apply(ops)] == [0] * 6

        assert {line.strip() for line in netns.ip("neigh", "show", "dev", "flannel.1")
                .stdout.splitlines()} == {"10.244.1.0 lladdr 0e:00:00:00:00:01 PERMANENT",
                                          "10.244.2.0 lladdr 0e:00:00:00:00:02 PERMANENT"}
        fdb_text = netns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        assert "0e:00:00:00:00:01 dst 192.168.0.2 self permanent" in fdb_text
        assert "0e:00:00:00:00:02 dst 192.168.0.3 self permanent" in fdb_text
        assert {line for line in route_lines(netns) if "flannel.1" in line} == {
            "10.244.1.0/24 via 10.244.1.0 dev flannel.1 onlink",
            "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink",
        }

        # Our FDB entry is indistinguishable from one made by `bridge fdb replace ... self
        # permanent` (same state and flags), apart from its address fields.
        netns.run("bridge", "fdb", "replace", "0e:00:00:00:00:63", "dev", "flannel.1",
                  "dst", "192.168.0.100", "self", "permanent")
        by_mac = {str(e["mac"]): e for e in fdb_json(netns)}

        def strip(entry: dict[str, object]) -> dict[str, object]:
            return {k: v for k, v in entry.items() if k not in ("mac", "dst")}

        assert strip(by_mac["0e:00:00:00:00:01"]) == strip(by_mac["0e:00:00:00:00:63"])
        # `bridge` prints only "permanent"; the raw ndm_state/ndm_flags must match too.
        raw = raw_fdb_state(netns)
        assert raw["0e:00:00:00:00:01"] == raw["0e:00:00:00:00:63"] == [FDB_STATE, NTF_SELF]

        expected_fdb = {FdbEntry(vx, "0e:00:00:00:00:01", ip4("192.168.0.2")),
                        FdbEntry(vx, "0e:00:00:00:00:02", ip4("192.168.0.3")),
                        FdbEntry(vx, "0e:00:00:00:00:63", ip4("192.168.0.100"))}
        assert {e async for e in nl.dump_fdb(ifindex=vx)} == expected_fdb
        # Unfiltered: the veths' own multicast entries have no remote and are left out.
        assert {e async for e in nl.dump_fdb()} == expected_fdb
        assert {n async for n in nl.dump_neighbours(socket.AF_INET, ifindex=vx)} == {
            Neighbour(vx, ip4("10.244.1.0"), "0e:00:00:00:00:01"),
            Neighbour(vx, ip4("10.244.2.0"), "0e:00:00:00:00:02")}
        dumped_routes = {r async for r in nl.dump_routes(socket.AF_INET)}
        assert Route(net4("10.244.1.0/24"), ip4("10.244.1.0"), vx, onlink=True) in dumped_routes

        # A peer whose node address changed: replace moves the FDB remote, no second entry.
        moved = FdbEntry(vx, "0e:00:00:00:00:01", ip4("192.168.0.50"))
        assert [r.errno for r in await nl.apply([Op("replace", moved)])] == [0]
        remotes = [e["dst"] for e in fdb_json(netns) if e["mac"] == "0e:00:00:00:00:01"]
        assert remotes == ["192.168.0.50"]

        removal = [op if not isinstance(op.obj, FdbEntry) or op.obj.lladdr != moved.lladdr
                   else Op("delete", moved)
                   for op in peer_ops(vx, 1, "delete") + peer_ops(vx, 2, "delete")]
        assert [r.errno for r in await nl.apply(removal)] == [0] * 6
        assert netns.ip("neigh", "show", "dev", "flannel.1").stdout.strip() == ""
        assert {str(e["mac"]) for e in fdb_json(netns)} == {"0e:00:00:00:00:63"}
        assert not any("flannel.1" in line for line in route_lines(netns))
        again = await nl.apply([Op("delete", Neighbour(vx, ip4("10.244.1.0"), ""))])
        assert again[0].errno == errno.ENOENT


async def test_neighbour_dump_keeps_every_state(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    netns.ip("neigh", "add", "192.168.0.9", "lladdr", "aa:bb:cc:00:00:09", "dev", "v0",
             "nud", "stale")
    netns.ip("neigh", "add", "192.168.0.10", "lladdr", "aa:bb:cc:00:00:0a", "dev", "v0",
             "nud", "permanent")
    with RtNetlink.open(netns.name) as nl:
        got = {n async for n in nl.dump_neighbours(socket.AF_INET, ifindex=v0)}
    assert got == {Neighbour(v0, ip4("192.168.0.9"), "aa:bb:cc:00:00:09", NUD_STALE),
                   Neighbour(v0, ip4("192.168.0.10"), "aa:bb:cc:00:00:0a")}


# --- monitor ----------------------------------------------------------------------------------

class EventLog:
    """Reads the monitor continuously in a task, as a daemon would; tests wait on it."""

    def __init__(self, mon: RtMonitor, requester: int = 0) -> None:
        self.events: list[RtEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read(mon, requester))

    async def _read(self, mon: RtMonitor, requester: int) -> None:
        async for batch in mon.events(requester):
            self.events.extend(batch)
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, wanted: Callable[[RtEvent], bool]) -> None:
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: any(wanted(e) for e in self.events)),
                EVENT_TIMEOUT)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def test_monitor_sees_ip_route_del_and_link_events(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    route = Route(net4("10.5.0.0/16"), ip4("192.168.0.2"), v0)
    with RtMonitor.open(netns.name, routes=True, links=True) as mon:
        log = EventLog(mon)
        try:
            netns.ip("route", "add", "10.5.0.0/16", "via", "192.168.0.2", "dev", "v0")
            netns.ip("route", "del", "10.5.0.0/16")
            await log.wait_for(lambda e: e.kind == "route_del")
            assert [e for e in log.events if e.kind.startswith("route")] == [
                RtEvent("route_new", route), RtEvent("route_del", route)]

            netns.ip("link", "add", "x0", "type", "veth", "peer", "name", "x1")
            x0 = ifindex(netns, "x0")
            await log.wait_for(lambda e: e == RtEvent("link_new", LinkEvent(x0, "x0")))
            netns.ip("link", "del", "x0")
            await log.wait_for(lambda e: e == RtEvent("link_del", LinkEvent(x0, "x0")))
        finally:
            await log.stop()


async def test_monitor_neighbour_and_fdb_events(netns: NetNamespace) -> None:
    vx = vxlan_setup(netns)
    neigh, fdb, _route = (op.obj for op in peer_ops(vx, 1))
    with RtMonitor.open(netns.name, routes=False, neighbours=True) as mon, \
            RtNetlink.open(netns.name) as nl:
        log = EventLog(mon)
        try:
            assert [r.errno for r in await nl.apply(peer_ops(vx, 1)[:2])] == [0, 0]
            await log.wait_for(lambda e: e == RtEvent("neigh_new", fdb))
            await log.wait_for(lambda e: e == RtEvent("neigh_new", neigh))
            netns.ip("neigh", "del", "10.244.1.0", "dev", "flannel.1")
            # A deleted entry is reported in state FAILED without lladdr: match on the key.
            await log.wait_for(lambda e: e.kind == "neigh_del" and isinstance(e.obj, Neighbour)
                               and (e.obj.ifindex, e.obj.ip) == (vx, ip4("10.244.1.0")))
            netns.run("bridge", "fdb", "del", "0e:00:00:00:00:01", "dev", "flannel.1",
                      "dst", "192.168.0.2", "self")
            await log.wait_for(lambda e: e == RtEvent("neigh_del", fdb))
        finally:
            await log.stop()


async def test_notifications_of_our_requests_are_marked_ours(netns: NetNamespace) -> None:
    """The kernel names the requesting socket in the notifications of routes, nexthops and
    a neighbour's update, not in a neighbour's removal nor in vxlan FDB changes (the
    engine remembers only those to recognise its echoes); changes made by `ip` are not
    ours."""
    vx = vxlan_setup(netns)
    neigh, fdb, route = (op.obj for op in peer_ops(vx, 1))
    assert isinstance(route, Route)
    nh = Nexthop(77, route.gateway, vx, onlink=True)
    on_nh = Route(route.dst, route.gateway, vx, onlink=True, nhid=77)
    with RtMonitor.open(netns.name, routes=True, neighbours=True, nexthops=True) as mon, \
            RtNetlink.open(netns.name) as nl:
        log = EventLog(mon, nl.portid)
        try:
            adds = [Op("replace", o) for o in (nh, on_nh, neigh, fdb)]
            dels = [Op("delete", o) for o in (on_nh, nh, neigh, fdb)]
            assert [r.errno for r in await nl.apply(adds + dels)] == [0] * 8
            netns.ip("route", "add", "10.99.0.0/24", "dev", "flannel.1")  # the last event
            await log.wait_for(lambda e: e.kind == "route_new" and isinstance(e.obj, Route)
                               and str(e.obj.dst) == "10.99.0.0/24")
            seen = [(e.kind, type(e.obj).__name__, e.ours) for e in log.events
                    if not (isinstance(e.obj, Route) and e.obj.table != 254)]
            assert seen == [
                ("nexthop_new", "Nexthop", True), ("route_new", "Route", True),
                ("neigh_new", "Neighbour", True), ("neigh_new", "FdbEntry", False),
                ("route_del", "Route", True), ("nexthop_del", "Nexthop", True),
                ("neigh_new", "Neighbour", True),  # the removal's first report: FAILED
                ("neigh_del", "Neighbour", False), ("neigh_del", "FdbEntry", False),
                ("route_new", "Route", False)], seen
        finally:
            await log.stop()


async def test_monitor_without_route_group_sees_no_routes(netns: NetNamespace) -> None:
    with_veth(netns)
    with RtMonitor.open(netns.name, routes=False, links=True) as mon:
        log = EventLog(mon)
        try:
            netns.ip("route", "add", "10.5.0.0/16", "via", "192.168.0.2", "dev", "v0")
            netns.ip("link", "add", "x0", "type", "veth", "peer", "name", "x1")
            await log.wait_for(lambda e: isinstance(e.obj, LinkEvent) and e.obj.ifname == "x0")
            assert not any(e.kind.startswith("route") for e in log.events)
        finally:
            await log.stop()


async def test_monitor_reports_overflow_and_keeps_going(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    routes = [Route(net4(f"10.{i >> 8}.{i & 255}.0/24"), ip4("192.168.0.2"), v0)
              for i in range(2000)]
    # A tiny receive buffer that 2000 unread notifications cannot fit into.
    with RtMonitor.open(netns.name, rcvbuf=4096) as mon, RtNetlink.open(netns.name) as nl:
        # Nothing reads while the routes go in (apply never yields to the reader task
        # before the kernel has queued every notification).
        assert all(r.errno == 0 for r in await nl.apply([Op("replace", r) for r in routes]))
        log = EventLog(mon)
        try:
            await log.wait_for(lambda e: e.kind == "overflow")
            # What was queued behind the overflow is discarded: the caller resyncs anyway.
            assert log.events == [RtEvent("overflow", None)]
            late = Route(net4("10.99.0.0/24"), ip4("192.168.0.3"), v0)
            assert (await nl.apply([Op("replace", late)]))[0].errno == 0
            await log.wait_for(lambda e: e == RtEvent("route_new", late))
        finally:
            await log.stop()


# --- scale ------------------------------------------------------------------------------------

async def test_10k_route_dump_streams_and_early_exit_is_safe(netns: NetNamespace) -> None:
    v0 = with_veth(netns, "192.168.0.1/16")
    # One shared gateway keeps the kernel's insert cost linear (per-route gateways are O(N^2)).
    routes = [Route(net4(f"10.{i >> 8}.{i & 255}.0/24"), ip4("192.168.0.2"), v0)
              for i in range(10_000)]
    with RtNetlink.open(netns.name) as nl:
        results = await nl.apply([Op("replace", r) for r in routes], window=256)
        assert len(results) == 10_000 and not any(r.errno for r in results)
        ip_count = sum(1 for line in route_lines(netns) if line.startswith("10."))
        assert ip_count == 10_000

        seen = {r async for r in nl.dump_routes(socket.AF_INET)
                if r.dst.network_address.packed[0] == 10}
        assert seen == set(routes)

        # Between two receives the dump lets the event loop run: another task gets its turn
        # long before the end (a safety-net listing must not hold the lease events).
        listed = 0
        ran_after: list[int] = []

        async def other() -> None:
            ran_after.append(listed)

        task = None
        async for _ in nl.dump_routes(socket.AF_INET):
            listed += 1
            if task is None:
                task = asyncio.create_task(other())
        assert task is not None and task.done() and listed > 10_000
        assert ran_after[0] < 2_000, ran_after

        # Stop reading after a few routes: the unread rest must not break the next request.
        first = []
        async for r in nl.dump_routes(socket.AF_INET):
            first.append(r)
            if len(first) == 5:
                break
        results = await nl.apply([Op("delete", r) for r in routes])
        assert not any(r.errno for r in results)
        assert [r async for r in nl.dump_routes(socket.AF_INET)] == [
            Route(net4("192.168.0.0/16"), None, v0, protocol=RTPROT_KERNEL, scope=RT_SCOPE_LINK)]


async def test_what_a_listing_wakes_runs_before_its_next_piece(netns: NetNamespace) -> None:
    # A lease event met during a safety-net listing: its socket's callback wakes the watch
    # consumer, which must run before the listing takes its next piece (with a single turn
    # of the loop between pieces it ran two pieces later).
    v0 = with_veth(netns, "192.168.0.1/16")
    routes = [Route(net4(f"10.{i >> 8}.{i & 255}.0/24"), ip4("192.168.0.2"), v0)
              for i in range(2_000)]
    with RtNetlink.open(netns.name, recv_buffer=8192) as nl:
        assert not any(r.errno for r in await nl.apply([Op("replace", r) for r in routes]))
        listed = 0
        pieces: list[int] = []  # routes listed when each receive returned
        recv = nl._recv

        async def counted_recv() -> int:
            n = await recv()
            pieces.append(listed)
            return n

        nl._recv = counted_recv  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        ran_at: list[int] = []
        a, b = socket.socketpair()
        loop.add_reader(a.fileno(), lambda: readable.done() or readable.set_result(None))

        async def consumer() -> None:
            await readable
            ran_at.append(listed)

        task = asyncio.create_task(consumer())
        await asyncio.sleep(0)  # waiting
        try:
            async for _ in nl.dump_routes(socket.AF_INET):
                listed += 1
                if listed == 1:
                    b.send(b"event")
        finally:
            loop.remove_reader(a.fileno())
            a.close()
            b.close()
        assert task.done() and len(pieces) > 3
        assert ran_at == [pieces[1]], (ran_at, pieces[:4])


# --- nexthop objects and routes using them ----------------------------------------------------

def nexthop_lines(ns: NetNamespace) -> set[str]:
    return {line.strip() for line in ns.ip("nexthop", "show").stdout.splitlines()}


def nexthops_from_ip(ns: NetNamespace, oif_of: dict[str, int]) -> set[Nexthop]:
    """What `ip -j nexthop show` lists, as Nexthop objects (groups left out)."""
    protocols = {"boot": RTPROT_BOOT, "kernel": RTPROT_KERNEL, "unspec": 0}
    found = set()
    for e in json.loads(ns.ip("-j", "nexthop", "show").stdout or "[]"):
        if "group" in e:
            continue
        gw = e.get("gateway")
        found.add(Nexthop(
            int(e["id"]), None if gw is None else ip_address(gw),
            oif_of[e["dev"]] if "dev" in e else None,
            protocols[e.get("protocol", "unspec")], "onlink" in e.get("flags", [])))
    return found


async def test_nexthops_replace_dump_delete(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    v1 = ifindex(netns, "v1")
    netns.ip("addr", "add", "192.168.1.1/24", "dev", "v1")
    netns.ip("-6", "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
    nh7 = Nexthop(7, ip4("192.168.0.2"), v0)
    off_link = Nexthop(8, ip4("10.99.0.1"), v0)
    nh9 = Nexthop(9, ip4("10.244.9.0"), v0, onlink=True)  # vxlan's shape: an on-link VTEP
    nh10 = Nexthop(10, IPv6Address("2001:db8::2"), v0)
    nh11 = Nexthop(11, ip4("192.168.1.2"), v1)
    ops = [Op("replace", nh7), Op("replace", off_link), Op("replace", nh9),
           Op("replace", nh10), Op("replace", nh11)]
    with RtNetlink.open(netns.name) as nl:
        results = await nl.apply(ops, window=2)  # the failing op sits inside a window
        assert [r.op for r in results] == ops
        assert [r.errno for r in results] == [0, errno.ENETUNREACH, 0, 0, 0]
        assert results[1].message == "Nexthop has invalid gateway"
        assert nexthop_lines(netns) == {
            "id 7 via 192.168.0.2 dev v0 scope link proto boot",
            "id 9 via 10.244.9.0 dev v0 scope link proto boot onlink",
            "id 10 via 2001:db8::2 dev v0 scope link proto boot",
            "id 11 via 192.168.1.2 dev v1 scope link proto boot",
        }
        # Made by someone else (protocol unspec) and a group: both are in the kernel's dump.
        netns.ip("nexthop", "add", "id", "20", "via", "192.168.0.9", "dev", "v0")
        netns.ip("nexthop", "add", "id", "30", "group", "7/20")
        ours = {nh7, nh9, nh10, nh11}
        foreign = Nexthop(20, ip4("192.168.0.9"), v0, protocol=0)
        dumped = {nh async for nh in nl.dump_nexthops()}
        assert dumped == ours | {foreign}
        assert dumped == nexthops_from_ip(netns, {"v0": v0, "v1": v1})
        assert {nh async for nh in nl.dump_nexthops(protocol=RTPROT_BOOT)} == ours
        assert {nh async for nh in nl.dump_nexthops(oif=v1)} == {nh11}
        assert {nh async for nh in nl.dump_nexthops(oif=v0, protocol=RTPROT_BOOT)} == {
            nh7, nh9, nh10}

        # replace moves an existing nexthop object
        moved = Nexthop(7, ip4("192.168.0.3"), v0)
        assert [r.errno for r in await nl.apply([Op("replace", moved)])] == [0]
        assert "id 7 via 192.168.0.3 dev v0 scope link proto boot" in nexthop_lines(netns)

        netns.ip("nexthop", "del", "id", "30")
        deletes = [Op("delete", Nexthop(9, None, None)), Op("delete", nh11),
                   Op("delete", Nexthop(99, None, None))]
        results = await nl.apply(deletes)
        assert [r.errno for r in results] == [0, 0, errno.ENOENT]
        assert nexthop_lines(netns) == {
            "id 7 via 192.168.0.3 dev v0 scope link proto boot",
            "id 10 via 2001:db8::2 dev v0 scope link proto boot",
            "id 20 via 192.168.0.9 dev v0 scope link",
        }


async def test_objects_asked_for_by_key(netns: NetNamespace) -> None:
    """get_objects: the kernel's nexthop, neighbour and FDB entry at each key (made here
    with ip and bridge, so our encoder is not checked against itself), None where it has
    none; in windows of 2, so each window's last request carries the ack."""
    vx = vxlan_setup(netns)
    v0 = ifindex(netns, "v0")
    netns.ip("nexthop", "add", "id", "7", "via", "192.168.0.2", "dev", "v0", "proto", "boot")
    netns.ip("neigh", "add", "10.244.3.0", "lladdr", "0e:00:00:00:00:03", "dev", "flannel.1",
             "nud", "permanent")
    netns.run("bridge", "fdb", "add", "0e:00:00:00:00:03", "dev", "flannel.1", "dst",
              "192.168.0.4", "self", "permanent")
    nh = Nexthop(7, ip4("192.168.0.2"), v0)
    neigh = Neighbour(vx, ip4("10.244.3.0"), "0e:00:00:00:00:03")
    fdb = FdbEntry(vx, "0e:00:00:00:00:03", ip4("192.168.0.4"))
    absent = [Nexthop(8, None, None), Neighbour(vx, ip4("10.244.4.0"), "0e:00:00:00:00:04"),
              FdbEntry(vx, "0e:00:00:00:00:04", ip4("192.168.0.5"))]
    with RtNetlink.open(netns.name) as nl:
        got = await nl.get_objects([nh, absent[0], neigh, absent[1], fdb, absent[2]], window=2)
        assert got[1::2] == [None, None, None]
        have_nh, have_neigh, have_fdb = got[0::2]
        assert have_nh == nh
        assert isinstance(have_neigh, Neighbour) and (have_neigh.ip, have_neigh.lladdr) == (
            neigh.ip, neigh.lladdr)
        assert have_fdb == fdb
        assert await nl.get_objects([]) == []
        # A request the kernel refuses (id 0 is no nexthop's) raises; the socket serves
        # the next call, whose answers are told from the refused batch's by sequence.
        with pytest.raises(NetlinkError) as refused:
            await nl.get_objects([Nexthop(0, None, None), nh, absent[0]])
        assert refused.value.errno == errno.EINVAL
        assert await nl.get_objects([absent[0], nh]) == [None, nh]


async def test_routes_with_nhid(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    with RtNetlink.open(netns.name) as nl:
        nhs = [Nexthop(7, ip4("192.168.0.2"), v0), Nexthop(8, ip4("10.244.2.0"), v0, onlink=True)]
        routes = [Route(net4("10.244.1.0/24"), None, None, nhid=7),
                  Route(net4("10.244.2.0/24"), None, None, nhid=8)]
        no_such_nexthop = Route(net4("10.244.3.0/24"), None, None, nhid=99)
        objs: list[Nexthop | Route] = [*nhs, *routes, no_such_nexthop]
        results = await nl.apply([Op("replace", o) for o in objs])
        assert [r.errno for r in results] == [0, 0, 0, 0, errno.EINVAL]
        assert results[-1].message == "Nexthop id does not exist"
        # `proto boot` is not printed for routes; the nexthop's gateway and device are.
        assert route_lines(netns) == {
            "10.244.1.0/24 nhid 7 via 192.168.0.2 dev v0",
            "10.244.2.0/24 nhid 8 via 10.244.2.0 dev v0 onlink",
            "192.168.0.0/24 dev v0 proto kernel scope link src 192.168.0.1",
        }
        # With nexthop_compat_mode = 1 (the default) the dump carries RTA_NH_ID and the
        # nexthop's RTA_GATEWAY/RTA_OIF, and rtm_flags has the nexthop's RTNH_F_ONLINK.
        dumped = {r async for r in nl.dump_routes(socket.AF_INET) if r.nhid is not None}
        assert dumped == {
            Route(net4("10.244.1.0/24"), ip4("192.168.0.2"), v0, nhid=7),
            Route(net4("10.244.2.0/24"), ip4("10.244.2.0"), v0, onlink=True, nhid=8)}
        # `ip route get` answers with the resolved gateway and device but no RTA_NH_ID.
        got = await nl.get_route(ip4("10.244.1.5"))
        assert got is not None
        assert (got.gateway, got.oif, got.nhid) == (ip4("192.168.0.2"), v0, None)

        # Moving the nexthop moves the route (no route change needed).
        assert [r.errno for r in await nl.apply(
            [Op("replace", Nexthop(7, ip4("192.168.0.3"), v0))])] == [0]
        assert "10.244.1.0/24 nhid 7 via 192.168.0.3 dev v0" in route_lines(netns)

        # A dumped route can be deleted as it is (gateway/oif are not sent with an nhid);
        # a delete naming another nhid does not match.
        one = next(r for r in dumped if r.nhid == 8)
        wrong = Route(net4("10.244.1.0/24"), None, None, nhid=8)
        assert [r.errno for r in await nl.apply([Op("delete", one), Op("delete", wrong)])] == [
            0, errno.ESRCH]
        assert route_lines(netns) == {
            "10.244.1.0/24 nhid 7 via 192.168.0.3 dev v0",
            "192.168.0.0/24 dev v0 proto kernel scope link src 192.168.0.1",
        }

        # With compat mode off (per namespace) dumps carry only the id.
        netns.sysctl("net.ipv4.nexthop_compat_mode", "0")
        assert "10.244.1.0/24 nhid 7" in route_lines(netns)
        assert [r async for r in nl.dump_routes(socket.AF_INET) if r.nhid is not None] == [
            Route(net4("10.244.1.0/24"), None, None, nhid=7)]


async def test_monitor_nexthop_deletion_and_dependent_routes(netns: NetNamespace) -> None:
    v0 = with_veth(netns)
    netns.ip("-6", "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad")
    nh4 = Nexthop(7, ip4("192.168.0.2"), v0)
    nh6 = Nexthop(6, IPv6Address("2001:db8::2"), v0)
    r4 = Route(net4("10.244.1.0/24"), None, None, nhid=7)
    r6 = Route(IPv6Network("2001:db8:1::/64"), None, None, nhid=6)
    with RtMonitor.open(netns.name, routes=True, nexthops=True) as mon, \
            RtMonitor.open(netns.name, routes=True) as plain, RtNetlink.open(netns.name) as nl:
        log = EventLog(mon)
        plain_log = EventLog(plain)
        try:
            ops = [Op("replace", o) for o in (nh4, nh6, r4, r6)]
            assert [r.errno for r in await nl.apply(ops)] == [0] * 4
            await log.wait_for(lambda e: e == RtEvent("nexthop_new", nh4))
            await log.wait_for(lambda e: e == RtEvent("nexthop_new", nh6))
            await log.wait_for(lambda e: e.kind == "route_new" and isinstance(e.obj, Route)
                               and e.obj.nhid == 6)

            netns.ip("nexthop", "del", "id", "7")
            netns.ip("nexthop", "del", "id", "6")
            await log.wait_for(lambda e: e == RtEvent("nexthop_del", nh4))
            await log.wait_for(lambda e: e == RtEvent("nexthop_del", nh6))
            # IPv6 routes using the nexthop are reported deleted (compat mode 1) ...
            await log.wait_for(lambda e: e.kind == "route_del" and isinstance(e.obj, Route)
                               and e.obj.dst == r6.dst)
            # ... IPv4 ones vanish silently. A later change marks the end of what the kernel
            # sent for the deletion (notifications are delivered in order).
            netns.ip("route", "add", "10.9.0.0/16", "via", "192.168.0.2", "dev", "v0")
            for events in (log, plain_log):
                await events.wait_for(lambda e: e.kind == "route_new" and isinstance(e.obj, Route)
                                      and e.obj.dst == net4("10.9.0.0/16"))
            assert not any(e.kind == "route_del" and isinstance(e.obj, Route)
                           and e.obj.dst == r4.dst for e in log.events)
            assert not any(line.startswith("10.244.1.0/24") for line in route_lines(netns))
            # Without nexthops=True no nexthop events arrive.
            assert not any(e.kind.startswith("nexthop") for e in plain_log.events)
        finally:
            await log.stop()
            await plain_log.stop()


# --- links and addresses ----------------------------------------------------------------------

# The ifi_flags `ip` names (it leaves IFF_RUNNING out: NO-CARRIER is printed instead).
IP_LINK_FLAGS = {
    "UP": 0x1, "BROADCAST": 0x2, "DEBUG": 0x4, "LOOPBACK": 0x8, "POINTOPOINT": 0x10,
    "NOTRAILERS": 0x20, "NOARP": 0x80, "PROMISC": 0x100, "ALLMULTI": 0x200, "MASTER": 0x400,
    "SLAVE": 0x800, "MULTICAST": 0x1000, "PORTSEL": 0x2000, "AUTOMEDIA": 0x4000,
    "DYNAMIC": 0x8000, "LOWER_UP": 0x10000, "DORMANT": 0x20000, "ECHO": 0x40000,
}


async def test_dump_links_matches_ip(netns: NetNamespace) -> None:
    vxlan_setup(netns)
    netns.ip("link", "set", "v1", "mtu", "1400")
    netns.ip("link", "add", "x0", "type", "veth", "peer", "name", "x1")  # down, no carrier
    netns.ip("link", "set", "x0", "up")
    with RtNetlink.open(netns.name) as nl:
        links = {link.index: link async for link in nl.dump_links()}
    shown = json.loads(netns.ip("-j", "-d", "link", "show").stdout)
    assert sorted(links) == sorted(int(e["ifindex"]) for e in shown)
    for e in shown:
        link = links[int(e["ifindex"])]
        # NO-CARRIER and M-DOWN (peer down) are not ifi_flags bits.
        named = [f for f in e["flags"] if f not in ("NO-CARRIER", "M-DOWN")]
        assert (link.name, link.mtu, link.kind, link.address) == (
            e["ifname"], e["mtu"], e.get("linkinfo", {}).get("info_kind"), e.get("address"))
        assert link.flags & ~IFF_RUNNING == sum(IP_LINK_FLAGS[f] for f in named), e["ifname"]
    by_name = {link.name: link for link in links.values()}
    assert by_name["lo"].kind is None and by_name["lo"].address == "00:00:00:00:00:00"
    assert by_name["flannel.1"].kind == "vxlan" and by_name["v1"].mtu == 1400
    assert not by_name["x0"].flags & IFF_LOWER_UP and by_name["x0"].flags & IFF_UP


# The address flags `ip -j addr` names; "dynamic" stands for IFA_F_PERMANENT being unset.
IP_ADDR_FLAGS = {
    "secondary": 0x01, "temporary": 0x01, "nodad": 0x02, "optimistic": 0x04, "dadfailed": 0x08,
    "home": 0x10, "deprecated": 0x20, "tentative": 0x40, "mngtmpaddr": 0x100,
    "noprefixroute": 0x200, "autojoin": 0x400, "stable-privacy": 0x800,
}
IP_SCOPES = {"global": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}


def addresses_from_ip(ns: NetNamespace, *args: str) -> set[Address]:
    found = set()
    for link in json.loads(ns.ip("-j", *args, "addr", "show").stdout):
        for a in link.get("addr_info", []):
            flags = sum(bit for name, bit in IP_ADDR_FLAGS.items() if a.get(name))
            flags |= 0 if a.get("dynamic") else IFA_F_PERMANENT
            flags |= int(a.get("flags", "0"), 16)
            scope = a["scope"]
            found.add(Address(int(link["ifindex"]), ip_address(a["local"]), a["prefixlen"],
                              flags, IP_SCOPES[scope] if scope in IP_SCOPES else int(scope)))
    return found


async def test_dump_addresses_matches_ip(netns: NetNamespace) -> None:
    # No duplicate address detection: a link-local address must not turn from "tentative"
    # to final between our dump and `ip`'s.
    netns.sysctl("net.ipv6.conf.default.accept_dad", "0")
    netns.sysctl("net.ipv6.conf.all.accept_dad", "0")
    v0 = with_veth(netns)
    v1 = ifindex(netns, "v1")
    netns.ip("addr", "add", "192.168.0.7/24", "dev", "v0")  # secondary
    netns.ip("addr", "add", "192.168.9.1/24", "dev", "v0", "noprefixroute")
    netns.ip("addr", "add", "192.168.5.1/24", "dev", "v0", "preferred_lft", "0")  # deprecated
    netns.ip("addr", "add", "10.1.1.1", "peer", "10.1.1.2/32", "dev", "v1")
    netns.ip("-6", "addr", "add", "2001:db8::1/64", "dev", "v0", "nodad", "home")
    netns.ip("-6", "addr", "add", "2001:db8:5::1/64", "dev", "v0", "nodad",
             "preferred_lft", "0")
    with RtNetlink.open(netns.name) as nl:
        everything = {a async for a in nl.dump_addresses()}
        v4 = {a async for a in nl.dump_addresses(socket.AF_INET)}
        v6 = {a async for a in nl.dump_addresses(socket.AF_INET6)}
    assert everything == addresses_from_ip(netns)
    assert v4 == addresses_from_ip(netns, "-4") and v6 == addresses_from_ip(netns, "-6")
    assert everything == v4 | v6
    flags = {(a.index, str(a.ip)): a.flags for a in everything}
    assert flags[(v0, "192.168.0.7")] == IFA_F_PERMANENT | IFA_F_SECONDARY
    assert flags[(v0, "192.168.9.1")] == IFA_F_PERMANENT | IFA_F_NOPREFIXROUTE  # > 0xff
    assert flags[(v0, "192.168.5.1")] & IFA_F_DEPRECATED
    assert flags[(v0, "2001:db8::1")] == IFA_F_PERMANENT | IFA_F_NODAD | IFA_F_HOMEADDRESS
    assert flags[(v0, "2001:db8:5::1")] & IFA_F_DEPRECATED
    assert Address(v1, ip4("10.1.1.1"), 32, IFA_F_PERMANENT, 0) in everything  # not the peer
