#!/usr/bin/env python3
"""vxlan peer programming: the daemon's path (VxlanBackend.peer_state + KernelReconciler)
vs `ip -batch` (neighbours) + `bridge -batch` (FDB) + `ip -batch` (routes), same run.

Run as root. Per size, a fresh namespace with a veth `d0` (192.168.0.1/16) and the real
`flannel.1` made by VxlanBackend.register/configure. N peers, peer i: subnet 10.a.b.0/24,
public IP 192.168.<1+i/250>.<1+i%250>, its own VtepMAC, i.e. per peer exactly upstream's
neighbour + FDB entry + onlink route (performance-facts.md §3).

Per repetition and tool (order alternates): program into empty tables, program again (all
exists: a resync), delete all. Ours is timed from the lease list: peer states, the diff
against a dump, and the netlink batch; `ip`/`bridge` timings include their process start.
Ours runs twice: with nexthop objects (the default) and with classic routes
(PYFLANNEL_NEXTHOP_OBJECTS=off), the latter being upstream's exact route form; under the
daemon's garbage-collector settings (tune_collector, settle_collector after the first pass).

    .venv/bin/python bench/vxlan_peers.py [--sizes 1000,10000] [--reps 3,2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network

from pyflannel.backend.base import DesiredTable
from pyflannel.backend.vxlan import VxlanBackend, backend_data
from pyflannel.config.netconf import NetConf
from pyflannel.daemon.main import settle_collector, tune_collector
from pyflannel.iface.select import ExternalInterface
from pyflannel.kernel.netlink_ports import NetlinkRoutePort, PyrouteLinkPort
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.reconcile.engine import KernelReconciler
from pyflannel.reconcile.plan import NHID_BASE, DesiredState
from pyflannel_lab.netns import NetNamespace

PHASES = ("program (empty)", "program (existing)", "delete")
IP, IP_NH, OURS_NH = "ip+bridge -batch", "ip+bridge, nexthops", "ours (nexthop objects)"
TOOLS = (IP, IP_NH, OURS_NH, "ours (classic routes)")


def peers(n: int) -> list[Lease]:
    out = []
    for i in range(n):
        j = i + 256  # skip 10.0.x.0: ours is 10.0.1.0/24
        mac = f"0e:00:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"
        out.append(Lease(IPv4Network(f"10.{j >> 8}.{j & 255}.0/24"), LeaseAttrs(
            public_ip=IPv4Address(f"192.168.{1 + i // 250}.{1 + i % 250}"),
            backend_type="vxlan", backend_data=backend_data(1, mac))))
    return out


def batch_files(leases: list[Lease], d: str) -> dict[str, list[tuple[str, str]]]:
    """phase -> [(tool, file)] in upstream's order (add: neigh, fdb, route)."""
    lines: dict[str, list[str]] = {k: [] for k in (
        "neigh", "fdb", "route", "route-del", "neigh-del", "fdb-del", "nh", "nh-route",
        "nh-route-del", "nh-del")}
    for i, lease in enumerate(leases):
        assert lease.subnet is not None
        gw, sub, pub = lease.subnet.network_address, lease.subnet, lease.attrs.public_ip
        mac = lease.attrs.backend_data.split('"VtepMAC":"')[1][:17]
        lines["neigh"].append(f"neigh replace {gw} lladdr {mac} dev flannel.1 nud permanent")
        lines["fdb"].append(f"fdb replace {mac} dev flannel.1 dst {pub} self permanent")
        lines["route"].append(f"route replace {sub} via {gw} dev flannel.1 onlink")
        lines["route-del"].append(f"route del {sub} via {gw} dev flannel.1")
        lines["neigh-del"].append(f"neigh del {gw} dev flannel.1")
        lines["fdb-del"].append(f"fdb del {mac} dev flannel.1 dst {pub} self")
        lines["nh"].append(f"nexthop replace id {NHID_BASE + i} via {gw} dev flannel.1 onlink")
        lines["nh-route"].append(f"route replace {sub} nhid {NHID_BASE + i}")
        lines["nh-route-del"].append(f"route del {sub} nhid {NHID_BASE + i}")
        lines["nh-del"].append(f"nexthop del id {NHID_BASE + i}")
    paths = {}
    for k, v in lines.items():
        paths[k] = os.path.join(d, k)
        with open(paths[k], "w") as f:
            f.write("\n".join(v) + "\n")
    # ours' order: nexthops before the routes on them; routes before their nexthops (a
    # nexthop deleted under its routes costs a FIB flush each), both before the neighbours
    return {"add": [("ip", paths["neigh"]), ("bridge", paths["fdb"]), ("ip", paths["route"])],
            "delete": [("ip", paths["route-del"]), ("ip", paths["neigh-del"]),
                       ("bridge", paths["fdb-del"])],
            "add-nh": [("ip", paths["nh"]), ("ip", paths["nh-route"]), ("ip", paths["neigh"]),
                       ("bridge", paths["fdb"])],
            "delete-nh": [("ip", paths["nh-route-del"]), ("ip", paths["nh-del"]),
                          ("ip", paths["neigh-del"]), ("bridge", paths["fdb-del"])]}


def run_batches(ns: NetNamespace, steps: list[tuple[str, str]]) -> float:
    t0 = time.perf_counter()
    for tool, path in steps:
        subprocess.run([tool, "-n", ns.name, "-batch", path], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def counts(ns: NetNamespace) -> tuple[int, int, int]:
    neigh = ns.ip("neigh", "show", "dev", "flannel.1", "nud", "permanent").stdout
    fdb = ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
    routes = ns.ip("route", "show", "dev", "flannel.1").stdout
    return (len(neigh.splitlines()), sum(1 for x in fdb.splitlines() if " dst " in x),
            sum(1 for x in routes.splitlines() if "onlink" in x))


async def run_size(n: int, reps: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {tool: {p: [] for p in PHASES} for tool in TOOLS}
    leases = peers(n)
    ns = NetNamespace.create("pfbv")
    try:
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d1")
        ns.ip("link", "set", "d0", "up")
        ns.ip("link", "set", "d1", "up")
        ns.ip("addr", "add", "192.168.0.1/16", "dev", "d0")
        idx = int(ns.ip("-o", "link", "show", "d0").stdout.split(":")[0])
        ext = ExternalInterface("d0", idx, 1500, IPv4Address("192.168.0.1"),
                                IPv4Address("192.168.0.1"))
        nc = NetConf(network=IPv4Network("10.0.0.0/8"), subnet_len=24,
                     subnet_min=IPv4Address("10.0.1.0"), subnet_max=IPv4Address("10.255.255.0"),
                     backend={"Type": "vxlan"}, backend_type="vxlan")
        be = VxlanBackend()
        links = PyrouteLinkPort(ns.name)
        await be.register(ext, nc, StoredNodeState(), links)
        await be.configure(Lease(IPv4Network("10.0.1.0/24"), LeaseAttrs()))
        await links.aclose()
        port = NetlinkRoutePort.open(ns.name, events=False)
        with tempfile.TemporaryDirectory() as d:
            files = batch_files(leases, d)
            for rep in range(reps):
                order = TOOLS if rep % 2 == 0 else tuple(reversed(TOOLS))
                for tool in order:
                    t = times[tool]
                    if tool in (IP, IP_NH):
                        sfx = "-nh" if tool == IP_NH else ""
                        t["program (empty)"].append(run_batches(ns, files["add" + sfx]))
                        assert counts(ns) == (n, n, n), counts(ns)
                        t["program (existing)"].append(run_batches(ns, files["add" + sfx]))
                        t["delete"].append(run_batches(ns, files["delete" + sfx]))
                        assert counts(ns) == (0, 0, 0), counts(ns)
                        continue
                    rec = KernelReconciler(port, be.scope(),
                                           nexthops=tool == "ours (nexthop objects)")

                    async def sync(with_peers: bool, rec: KernelReconciler = rec) -> float:
                        t0 = time.perf_counter()
                        table = DesiredTable()
                        if with_peers:
                            for lease in leases:
                                table.put(lease.key, be.peer_state(lease))
                        rec.set_desired(table.state if with_peers else DesiredState())
                        await rec.reconcile_once()
                        return time.perf_counter() - t0

                    t["program (empty)"].append(await sync(True))
                    settle_collector()  # as the daemon does after its first full pass
                    assert counts(ns) == (n, n, n), counts(ns)
                    t["program (existing)"].append(await sync(True))
                    t["delete"].append(await sync(False))
                    assert counts(ns) == (0, 0, 0), counts(ns)
        port.close()
    finally:
        ns.delete()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--reps", default="3,2", help="repetitions per size (comma list)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = [int(x) for x in args.sizes.split(",")]
    reps = [int(x) for x in args.reps.split(",")]
    reps += [reps[-1]] * (len(sizes) - len(reps))
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    tune_collector()  # the engine under the daemon's collector settings
    for n, r in zip(sizes, reps, strict=True):
        times = asyncio.run(run_size(n, r))
        print(f"\n{n} peers (neighbour + FDB + onlink route each), median of {r}, seconds:")
        print(f"{'phase':<20}" + "".join(f"{tool:>25}" for tool in TOOLS))
        for phase in PHASES:
            base = statistics.median(times[TOOLS[0]][phase])
            cells = []
            for tool in TOOLS:
                med = statistics.median(times[tool][phase])
                cells.append(f"{med:8.3f} ({n / med:7.0f}/s)" if tool == TOOLS[0] else
                             f"{med:8.3f} (x{med / base:5.2f})")
            print(f"{phase:<20}" + "".join(f"{c:>25}" for c in cells))
        med = {tool: {p: statistics.median(v) for p, v in times[tool].items()} for tool in TOOLS}
        print(f"same objects, {OURS_NH} / {IP_NH}: " + ", ".join(
            f"{p} x{med[OURS_NH][p] / med[IP_NH][p]:.2f}" for p in PHASES))
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; (xR) = against ip+bridge -batch "
          "(upstream's objects: neighbour, FDB entry, onlink route)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
