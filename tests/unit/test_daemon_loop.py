"""The whole daemon loop on fakes (FakeKernel, InMemoryStore, FakeRules): no root, no
kernel, milliseconds. Start-up against N leases, joins and leaves, drift repair, a vxlan
device deleted and replayed, the nexthop fallback, a revoked lease, and `status --check`
on the same data plane."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from pyflannel.config.flags import parse_flags
from pyflannel.daemon.main import EXIT_ERROR, EXIT_OK, Daemon
from pyflannel.netlink import Op
from pyflannel.platform import Platform
from pyflannel.reconcile.plan import NHID_BASE
from pyflannel.status.command import check_node
from pyflannel.subnet.subnetenv import read_subnet_env
from tests.fakes.kernel import FakeKernel
from tests.fakes.rules import FakeRules
from tests.fakes.store import InMemoryStore
from tests.waiting import until

NETWORK = IPv4Network("10.244.0.0/16")
VXLAN = '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'


@dataclass
class Running:
    daemon: Daemon
    kernel: FakeKernel
    store: InMemoryStore
    rules: FakeRules
    task: asyncio.Task[int]
    subnet_file: Path



def platform(kernel: FakeKernel, store: InMemoryStore, rules: FakeRules, *,
             nexthops: bool = True) -> Platform:
    return Platform(open_routes=lambda: kernel, links=kernel,
                    find_interface=kernel.find_interface, make_rules=lambda _nft: rules,
                    make_store=lambda _f, _e: store, br_netfilter=lambda _4, _6: None,
                    nexthops=nexthops, nexthop_compat=lambda: kernel.compat_mode)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future[Running]]]:
    runs: list[Running] = []

    async def go(store: InMemoryStore | None = None, kernel: FakeKernel | None = None,
                 *, nexthops: bool = True, args: tuple[str, ...] = ()) -> Running:
        store = store or InMemoryStore()
        kernel = kernel or FakeKernel()
        rules = FakeRules()
        subnet_file = tmp_path / "subnet.env"
        flags = parse_flags([f"--subnet-file={subnet_file}", "--iptables-resync=1", *args], {})
        d = Daemon(flags, platform(kernel, store, rules, nexthops=nexthops))
        r = Running(d, kernel, store, rules, asyncio.create_task(d.run()), subnet_file)
        runs.append(r)
        await until(lambda: d.ready or r.task.done(), "start-up")
        return r

    yield go  # type: ignore[misc]
    for r in runs:
        if not r.task.done():
            r.daemon._stop.set()
        await asyncio.wait_for(r.task, 5)


def host_gw_routes(k: FakeKernel) -> dict[str, str]:
    return {str(r.dst): str(r.gateway) for r in k.routes.values()
            if r.oif == 2 and r.dst.subnet_of(NETWORK)}  # type: ignore[arg-type]


async def test_start_up_against_many_leases_then_joins_and_leaves(
        start: Callable[..., asyncio.Future[Running]], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    store = InMemoryStore()
    for n in range(2, 202):
        store.put(store.peer(n, f"192.168.77.{n}" if n < 250 else None))
    r = await start(store)
    await until(lambda: len(host_gw_routes(r.kernel)) == 200, "200 routes")
    route = r.kernel.route("10.244.7.0/24")
    assert route is not None and str(route.gateway) == "192.168.77.7" and route.oif == 2
    assert route.nhid is not None and route.nhid >= NHID_BASE  # through a nexthop object
    env = read_subnet_env(r.subnet_file)
    assert env is not None and str(env.subnet) == "10.244.1.1/24"
    assert r.rules.ensured and r.daemon.unready_reason() == ""
    # a node joins, a node leaves: programmed at once, never reported as drift; each
    # costs its own objects only (nexthop + route), and no dump
    dumps, applied = r.kernel.dumps, r.kernel.applied
    store.put(store.peer(230))
    await until(lambda: "10.244.230.0/24" in host_gw_routes(r.kernel), "the join")
    assert r.kernel.applied == applied + 2
    store.delete("10.244.7.0-24")
    await until(lambda: "10.244.7.0/24" not in host_gw_routes(r.kernel), "the leave")
    assert len(r.kernel.nexthops) == 200  # the leaver's nexthop went with it
    assert r.kernel.applied == applied + 4
    assert r.kernel.dumps == dumps
    assert "Drift" not in caplog.text and "Traceback" not in caplog.text


async def test_drift_is_repaired_from_the_event(
        start: Callable[..., asyncio.Future[Running]], caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    store.put(store.peer(2))
    r = await start(store)
    await until(lambda: r.kernel.route("10.244.2.0/24") is not None, "the route")
    route = r.kernel.route("10.244.2.0/24")
    assert route is not None
    dumps = r.kernel.dumps
    r.kernel.foreign(Op("delete", route))
    await until(lambda: r.kernel.route("10.244.2.0/24") is not None, "the repair", 1.0)
    assert "Drift: route to 10.244.2.0/24 via 192.168.77.2 was deleted by someone else" \
        in caplog.text
    # repaired from the event against the cache, within the 1 s above (the periodic pass
    # is 10 s away): no dump
    assert r.kernel.dumps == dumps


async def test_vxlan_device_deleted_is_recreated_and_every_peer_replayed(
        start: Callable[..., asyncio.Future[Running]]) -> None:
    store = InMemoryStore(VXLAN)
    for n in (2, 3, 4):
        store.put(store.peer(n, data=json.dumps({"VNI": 1, "VtepMAC": f"0e:00:00:00:00:0{n}"},
                                                separators=(",", ":"))))
    r = await start(store)
    k = r.kernel
    await until(lambda: len(k.fdb) == 3 and len(k.neighbours) == 3, "peers programmed")
    old = k.devices["flannel.1"].index
    mac = k.devices["flannel.1"].mac
    k.delete_device("flannel.1")
    await until(lambda: "flannel.1" in k.devices and len(k.fdb) == 3
                and len(k.neighbours) == 3, "the device recreated and peers replayed")
    new = k.devices["flannel.1"]
    assert new.index != old and new.mac == mac and new.index in k.up
    assert {f.ifindex for f in k.fdb.values()} == {new.index}
    route = k.route("10.244.3.0/24")
    assert route is not None and route.oif == new.index and route.onlink


async def test_nexthop_objects_unsupported_falls_back_to_classic_routes(
        start: Callable[..., asyncio.Future[Running]], caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    store.put(store.peer(2))
    r = await start(store, FakeKernel(nexthops_supported=False))
    await until(lambda: r.kernel.route("10.244.2.0/24") is not None, "the route")
    route = r.kernel.route("10.244.2.0/24")
    assert route is not None and route.nhid is None and str(route.gateway) == "192.168.77.2"
    assert "does not support nexthop objects" in caplog.text


async def test_a_revoked_lease_ends_the_daemon_with_status_1(
        start: Callable[..., asyncio.Future[Running]]) -> None:
    r = await start()
    r.store.revoke()
    assert await asyncio.wait_for(r.task, 3) == EXIT_ERROR
    assert r.store.closed and r.kernel.closed


async def test_stop_leaves_everything_in_place(
        start: Callable[..., asyncio.Future[Running]]) -> None:
    store = InMemoryStore()
    store.put(store.peer(2))
    r = await start(store)
    await until(lambda: r.kernel.route("10.244.2.0/24") is not None, "the route")
    r.daemon._stop.set()
    assert await asyncio.wait_for(r.task, 3) == EXIT_OK
    assert r.kernel.route("10.244.2.0/24") is not None and r.subnet_file.exists()


async def test_blackhole_route_is_an_ordinary_desired_entry(
        start: Callable[..., asyncio.Future[Running]]) -> None:
    r = await start(args=("--ip-blackhole-route",))
    await until(lambda: any(rt.type == 6 for rt in r.kernel.routes.values()), "the blackhole")


async def test_status_check_runs_the_same_data_plane(
        start: Callable[..., asyncio.Future[Running]]) -> None:
    store = InMemoryStore()
    for n in (2, 3):
        store.put(store.peer(n))
    r = await start(store)
    await until(lambda: len(host_gw_routes(r.kernel)) == 2, "routes")
    plat = platform(r.kernel, store, r.rules)
    env = read_subnet_env(r.subnet_file)
    leases = list(store.leases.values())
    problems, _ = await check_node(r.daemon.flags, store.netconf, leases, env, "etcd", plat)
    assert problems == []
    route = r.kernel.route("10.244.3.0/24")
    assert route is not None
    r.daemon._stop.set()
    await asyncio.wait_for(r.task, 3)
    r.kernel.foreign(Op("delete", route))
    problems, _ = await check_node(r.daemon.flags, store.netconf, leases, env, "etcd", plat)
    assert problems == ["missing route: 10.244.3.0/24 via 192.168.77.3 dev eth0"], problems
