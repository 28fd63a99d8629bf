"""VxlanBackend against the real kernel in a namespace: devices, MAC persistence,
recreation, per-peer programming through the KernelReconciler, drift repair, and the
DirectRouting decision."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from pyflannel.backend.vxlan import VxlanBackend, backend_data
from pyflannel.config.netconf import NetConf
from pyflannel.dataplane import NodeDataplane
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.netlink_ports import NetlinkRoutePort, PyrouteLinkPort
from pyflannel.lease.events import LeaseChanges, LeaseSnapshot
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.lease.table import LeasePolicy
from pyflannel.netlink import LinkEvent, RtEvent
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel_lab.netns import NetNamespace

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for network namespaces")

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.1.0/24")


def netconf(**backend: Any) -> NetConf:
    return NetConf(network=NETWORK, subnet_len=24, subnet_min=IPv4Address("10.244.1.0"),
                   subnet_max=IPv4Address("10.244.255.0"),
                   backend={"Type": "vxlan", **backend}, backend_type="vxlan")


def ext_of(ns: NetNamespace, *, public: str | None = None) -> ExternalInterface:
    link = json.loads(ns.ip("-j", "link", "show", "eth0").stdout)[0]
    return ExternalInterface("eth0", int(link["ifindex"]), int(link["mtu"]),
                             IPv4Address("192.168.90.1"),
                             IPv4Address(public or "192.168.90.1"))


def details(ns: NetNamespace, dev: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(ns.ip("-d", "-j", "link", "show", dev).stdout)[0]
    return out


def peer(n: int, mac: str, public: str | None = None) -> Lease:
    return Lease(IPv4Network(f"10.244.{n}.0/24"),
                 LeaseAttrs(public_ip=IPv4Address(public or f"192.168.90.{n}"),
                            backend_type="vxlan", backend_data=backend_data(1, mac)))


async def registered(node: NetNamespace, nc: NetConf, stored: StoredNodeState,
                     ext: ExternalInterface | None = None) -> VxlanBackend:
    """A backend registered in `node` through a link port of its own (closed at once:
    the port reopens its handle on the next use)."""
    be = VxlanBackend()
    links = PyrouteLinkPort(node.name)
    try:
        await be.register(ext or ext_of(node), nc, stored, links)
    finally:
        await links.aclose()
    return be


@pytest.fixture
def node(netns_factory: Callable[[str], NetNamespace]) -> NetNamespace:
    ns = netns_factory("pfvx")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    ns.ip("addr", "add", "192.168.90.1/24", "dev", "eth0")
    ns.ip("route", "add", "default", "via", "192.168.90.254")
    return ns


async def test_device_is_upstreams_and_local_is_the_interface_address(
        node: NetNamespace) -> None:
    be = VxlanBackend()
    # --public-ip differs (a NAT in front of us): the tunnel's source stays the interface's
    setup = await be.register(ext_of(node, public="203.0.113.7"), netconf(Port=4789, GBP=True),
                              StoredNodeState(), PyrouteLinkPort(node.name))
    d = details(node, "flannel.1")
    info = d["linkinfo"]["info_data"]
    assert d["linkinfo"]["info_kind"] == "vxlan"
    assert (info["id"], info["local"], info["port"], info["learning"], info.get("gbp")) == (
        1, "192.168.90.1", 4789, False, True)
    assert d["mtu"] == 1450 and setup.mtu == 1450  # FLANNEL_MTU = 1500 − 50
    assert setup.backend_type == "vxlan"
    assert setup.backend_data == f'{{"VNI":1,"VtepMAC":"{d["address"]}"}}'
    await be.configure(Lease(OWN, LeaseAttrs()))
    addrs = node.ip("-4", "addr", "show", "dev", "flannel.1").stdout
    assert "inet 10.244.1.0/32" in addrs and ",UP" in node.ip("link", "show", "flannel.1").stdout


async def test_configured_mtu_and_vni(node: NetNamespace) -> None:
    node.ip("link", "set", "eth0", "mtu", "9001")  # jumbo frames (AWS), MTU given explicitly
    be = VxlanBackend()
    setup = await be.register(ext_of(node), netconf(VNI=42, MTU=9000), StoredNodeState(),
                              PyrouteLinkPort(node.name))
    assert setup.mtu == 8950 and details(node, "flannel.42")["mtu"] == 8950
    assert json.loads(setup.backend_data)["VNI"] == 42


async def test_vtep_mac_comes_from_the_stored_lease_then_the_device(node: NetNamespace) -> None:
    stored = StoredNodeState(backend_data=backend_data(1, "0e:aa:bb:cc:dd:01"))
    be = VxlanBackend()
    setup = await be.register(ext_of(node), netconf(), stored, PyrouteLinkPort(node.name))
    assert details(node, "flannel.1")["address"] == "0e:aa:bb:cc:dd:01"
    assert json.loads(setup.backend_data)["VtepMAC"] == "0e:aa:bb:cc:dd:01"
    index = details(node, "flannel.1")["ifindex"]
    # restart without stored data (store wiped): the compatible device and its MAC are kept
    setup = await VxlanBackend().register(ext_of(node), netconf(), StoredNodeState(),
                                          PyrouteLinkPort(node.name))
    assert json.loads(setup.backend_data)["VtepMAC"] == "0e:aa:bb:cc:dd:01"
    assert details(node, "flannel.1")["ifindex"] == index
    # the store remembers another MAC (peers hold it): the device takes it, not recreated
    stored2 = StoredNodeState(backend_data=backend_data(1, "0e:aa:bb:cc:dd:02"))
    await registered(node, netconf(), stored2)
    assert details(node, "flannel.1")["address"] == "0e:aa:bb:cc:dd:02"
    assert details(node, "flannel.1")["ifindex"] == index


async def test_incompatible_device_is_recreated(node: NetNamespace,
                                                caplog: pytest.LogCaptureFixture) -> None:
    node.ip("link", "add", "flannel.1", "type", "vxlan", "id", "7", "dev", "eth0",
            "dstport", "8472")
    old = details(node, "flannel.1")["ifindex"]
    await registered(node, netconf(), StoredNodeState())
    d = details(node, "flannel.1")
    assert d["ifindex"] != old and d["linkinfo"]["info_data"]["id"] == 1
    assert "already exists with incompatible configuration: vni 7 != 1; recreating device" \
        in caplog.text
    # a non-vxlan device of that name too
    node.ip("link", "del", "flannel.1")
    node.ip("link", "add", "flannel.1", "type", "veth", "peer", "name", "fl1peer")
    await registered(node, netconf(), StoredNodeState())
    assert details(node, "flannel.1")["linkinfo"]["info_kind"] == "vxlan"


async def test_configure_removes_a_previous_leases_address(node: NetNamespace) -> None:
    be = await registered(node, netconf(), StoredNodeState())
    node.ip("addr", "add", "10.244.77.0/32", "dev", "flannel.1")
    node.ip("addr", "add", "172.16.0.1/32", "dev", "flannel.1")  # not in Network: kept
    await be.configure(Lease(OWN, LeaseAttrs()))
    addrs = node.ip("-4", "addr", "show", "dev", "flannel.1").stdout
    assert "10.244.1.0/32" in addrs and "10.244.77.0" not in addrs and "172.16.0.1" in addrs


class Harness:
    """The daemon's kernel loop in miniature: dataplane + engine on the netlink ports."""

    def __init__(self, ns: NetNamespace, be: VxlanBackend, leases: list[Lease]) -> None:
        self.ns, self.be, self.leases = ns, be, leases
        self.port = NetlinkRoutePort.open(ns.name)
        self.dp = NodeDataplane(be, LeasePolicy(network=NETWORK), "10.244.1.0-24", self.port)
        self.rec = KernelReconciler(self.port, self.dp.scope, resync_interval=3600)
        self.rec.on_links = self.on_links

    async def start(self) -> None:
        await self.dp.apply(LeaseSnapshot(tuple(self.leases)))
        self.rec.set_desired(self.dp.desired)

    async def remove(self, lease: Lease) -> None:
        await self.dp.apply(LeaseChanges(removed=(lease.ident,)))
        self.rec.set_desired(self.dp.desired)

    async def on_links(self, batch: list[RtEvent]) -> None:
        changed = False
        for ev in batch:
            if ev.kind in ("link_new", "link_del") and isinstance(ev.obj, LinkEvent):
                changed = await self.be.on_link_event(ev.kind, ev.obj) or changed
        if changed:
            await self.dp.rebuild()
            self.rec.set_scope(self.dp.scope)
            self.rec.set_desired(self.dp.desired)


@contextlib.asynccontextmanager
async def running(ns: NetNamespace, be: VxlanBackend,
                  leases: list[Lease]) -> AsyncIterator[Harness]:
    h = Harness(ns, be, leases)
    await h.start()
    task = asyncio.create_task(h.rec.run())
    try:
        yield h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        h.port.close()


async def wait_for(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def kernel_view(ns: NetNamespace, dev: str = "flannel.1") -> tuple[str, str, str]:
    # check=False: the device may be missing for a moment while it is recreated
    return (ns.ip("neigh", "show", "dev", dev, "nud", "permanent", check=False).stdout,
            ns.run("bridge", "fdb", "show", "dev", dev, check=False).stdout,
            ns.ip("route", "show", "dev", dev, check=False).stdout)


def programmed(ns: NetNamespace, n: int, mac: str, dev: str = "flannel.1") -> bool:
    neigh, fdb, routes = kernel_view(ns, dev)
    return (f"10.244.{n}.0 lladdr {mac} PERMANENT" in neigh
            and f"{mac} dst 192.168.90.{n} self permanent" in fdb
            and any(line.startswith(f"10.244.{n}.0/24 ") and f"via 10.244.{n}.0" in line
                    and "onlink" in line for line in routes.splitlines()))


MACS = {n: f"0e:00:00:00:00:{n:02x}" for n in (2, 3, 4)}


async def test_peers_programmed_drift_repaired_and_stale_entries_removed(
        node: NetNamespace) -> None:
    be = VxlanBackend()
    await be.register(ext_of(node), netconf(), StoredNodeState(), PyrouteLinkPort(node.name))
    await be.configure(Lease(OWN, LeaseAttrs()))
    # a peer that left while we were down
    node.ip("neigh", "add", "10.244.9.0", "lladdr", "0e:00:00:00:00:09", "dev", "flannel.1",
            "nud", "permanent")
    node.run("bridge", "fdb", "add", "0e:00:00:00:00:09", "dev", "flannel.1", "dst",
             "192.168.90.9", "self", "permanent")
    node.ip("route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", "flannel.1", "onlink")
    leases = [peer(n, mac) for n, mac in MACS.items()]
    async with running(node, be, leases) as h:
        await wait_for(lambda: all(programmed(node, n, m) for n, m in MACS.items()),
                       "every peer programmed")
        neigh, fdb, routes = kernel_view(node)
        assert "10.244.9.0" not in neigh + routes and "0e:00:00:00:00:09" not in fdb
        # drift: each object deleted by hand comes back through the event path
        for cmd in (("ip", "neigh", "del", "10.244.2.0", "dev", "flannel.1"),
                    ("bridge", "fdb", "del", MACS[3], "dev", "flannel.1", "dst",
                     "192.168.90.3", "self"),
                    ("ip", "route", "del", "10.244.4.0/24")):
            node.run(*cmd)
            assert not all(programmed(node, n, m) for n, m in MACS.items())
            await wait_for(lambda: all(programmed(node, n, m) for n, m in MACS.items()),
                           f"repair after {' '.join(cmd)}", timeout=5)
        # a wrong MAC for a peer is corrected
        node.ip("neigh", "replace", "10.244.2.0", "lladdr", "0e:ff:ff:ff:ff:ff", "dev",
                "flannel.1", "nud", "permanent")
        await wait_for(lambda: programmed(node, 2, MACS[2]), "the neighbour corrected", 5)
        assert h.rec.stats.drift_repairs >= 4
        # a peer leaves: all three objects go
        await h.remove(leases[0])
        await wait_for(lambda: "10.244.2.0" not in "".join(kernel_view(node)), "removal")
        assert MACS[2] not in kernel_view(node)[1]


async def test_deleted_device_is_recreated_and_every_peer_replayed(node: NetNamespace) -> None:
    stored = StoredNodeState(backend_data=backend_data(1, "0e:aa:bb:cc:dd:01"))
    be = VxlanBackend()
    await be.register(ext_of(node), netconf(), stored, PyrouteLinkPort(node.name))
    await be.configure(Lease(OWN, LeaseAttrs()))
    leases = [peer(n, mac) for n, mac in MACS.items()]
    async with running(node, be, leases):
        await wait_for(lambda: all(programmed(node, n, m) for n, m in MACS.items()), "peers")
        old = details(node, "flannel.1")["ifindex"]
        node.ip("link", "del", "flannel.1")
        await wait_for(lambda: all(programmed(node, n, m) for n, m in MACS.items()),
                       "peers replayed on the recreated device")
        d = details(node, "flannel.1")
        assert d["ifindex"] != old and d["address"] == "0e:aa:bb:cc:dd:01"
        assert "10.244.1.0/32" in node.ip("addr", "show", "dev", "flannel.1").stdout


async def test_direct_routing_for_peers_on_our_segment_only(node: NetNamespace) -> None:
    be = VxlanBackend()
    await be.register(ext_of(node), netconf(DirectRouting=True), StoredNodeState(),
                      PyrouteLinkPort(node.name))
    await be.configure(Lease(OWN, LeaseAttrs()))
    near, far = peer(2, MACS[2]), peer(3, MACS[3], public="10.77.0.5")
    async with running(node, be, [near, far]):
        await wait_for(lambda: "10.244.3.0/24" in node.ip("route").stdout
                       and "10.244.2.0/24" in node.ip("route").stdout, "both routes")
        routes = node.ip("route").stdout
        assert any(line.startswith("10.244.2.0/24") and "via 192.168.90.2 dev eth0" in line
                   for line in routes.splitlines()), routes
        assert any(line.startswith("10.244.3.0/24") and "via 10.244.3.0 dev flannel.1" in line
                   and "onlink" in line for line in routes.splitlines()), routes
        neigh, fdb, _ = kernel_view(node)
        # the direct peer needs no neighbour/FDB entry on flannel.1
        assert "10.244.2.0" not in neigh and MACS[2] not in fdb
        assert f"{MACS[3]} dst 10.77.0.5 self permanent" in fdb
