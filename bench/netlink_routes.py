#!/usr/bin/env python3
"""Route programming and dumping: `ip -batch` vs pyflannel.netlink.RtNetlink.

Run as root. Builds its own network namespace (deleted afterwards, also on failure) with a
veth `d0` holding 192.168.255.254/16, and N routes
`10.x.y.0/24 via <distinct gateway on the /16> dev d0` — the host-gw/vxlan shape, one gateway
per peer, which makes the kernel's insert cost grow with N (performance-facts.md §1.2).

Per repetition and tool: replace into an empty table, replace again (resync of existing
routes), dump the main table, delete all. The `ip` timings include its process start, as a
daemon shelling out would pay it. Prints medians, ratios ours/ip-batch, and our peak RSS.

    .venv/bin/python bench/netlink_routes.py [--sizes 1000,10000] [--reps 5,3]

`--mode nexthop` programs the same N peers three ways in one run and namespace: classic
routes with `ip -batch` (the baseline), classic routes with RtNetlink, and nexthop objects +
`nhid` routes with RtNetlink (and with `ip -batch` for reference); it also times replacing
the existing nexthops with net.ipv4.nexthop_compat_mode 1 (default) and 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network

from pyflannel.netlink import Nexthop, Op, Route, RtNetlink
from pyflannel_lab.netns import NetNamespace

PHASES = ("replace (empty)", "replace (existing)", "dump", "delete")


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def route_specs(n: int) -> list[tuple[str, str]]:
    return [(f"10.{i >> 8}.{i & 255}.0/24", f"192.168.{i // 250}.{1 + i % 250}")
            for i in range(n)]


def count_routes(ns: NetNamespace) -> int:
    out = ns.ip("-4", "route", "show").stdout
    return sum(1 for line in out.splitlines() if line.startswith("10."))


def time_ip_batch(ns: NetNamespace, path: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ip", "-n", ns.name, "-batch", path], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_ip_dump(ns: NetNamespace) -> tuple[float, int]:
    start = time.perf_counter()
    out = subprocess.run(["ip", "-n", ns.name, "-4", "route", "show"], check=True,
                         capture_output=True, text=True).stdout
    elapsed = time.perf_counter() - start
    return elapsed, out.count("\n")


async def timed(step: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    start = time.perf_counter()
    result = await step()
    return time.perf_counter() - start, result


async def run_size(n: int, reps: int) -> dict[str, dict[str, list[float]]]:
    ns = NetNamespace.create("nlbench")
    times: dict[str, dict[str, list[float]]] = {
        tool: {phase: [] for phase in PHASES} for tool in ("ip-batch", "ours")}
    try:
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p")
        ns.ip("addr", "add", "192.168.255.254/16", "dev", "d0")
        ns.ip("link", "set", "d0", "up")
        ns.ip("link", "set", "d0p", "up")
        ifindex = int(ns.ip("-o", "link", "show", "d0").stdout.split(":", 1)[0])
        specs = route_specs(n)
        routes = [Route(IPv4Network(dst), IPv4Address(gw), ifindex) for dst, gw in specs]
        replace_ops = [Op("replace", r) for r in routes]
        delete_ops = [Op("delete", r) for r in routes]
        with tempfile.TemporaryDirectory() as tmp:
            replace_file = os.path.join(tmp, "replace")
            delete_file = os.path.join(tmp, "delete")
            with open(replace_file, "w") as f:
                f.writelines(f"route replace {d} via {g} dev d0\n" for d, g in specs)
            with open(delete_file, "w") as f:
                f.writelines(f"route del {d} via {g} dev d0\n" for d, g in specs)

            nl = RtNetlink.open(ns.name)
            try:
                async def dump_count() -> int:
                    return sum([1 async for r in nl.dump_routes(socket.AF_INET)
                                if r.dst.network_address.packed[0] == 10])

                async def apply_all(ops: list[Op]) -> None:
                    failed = [r for r in await nl.apply(ops) if r.errno]
                    if failed:
                        raise RuntimeError(f"{len(failed)} ops failed, first: {failed[0]}")

                for rep in range(reps):
                    # Alternate which tool goes first, so neither always meets a warm cache.
                    order = ("ip-batch", "ours") if rep % 2 == 0 else ("ours", "ip-batch")
                    for tool in order:
                        t = times[tool]
                        if tool == "ip-batch":
                            t["replace (empty)"].append(time_ip_batch(ns, replace_file))
                            t["replace (existing)"].append(time_ip_batch(ns, replace_file))
                            elapsed, _lines = time_ip_dump(ns)
                            t["dump"].append(elapsed)
                            assert count_routes(ns) == n
                            t["delete"].append(time_ip_batch(ns, delete_file))
                        else:
                            t["replace (empty)"].append(
                                (await timed(lambda: apply_all(replace_ops)))[0])
                            t["replace (existing)"].append(
                                (await timed(lambda: apply_all(replace_ops)))[0])
                            elapsed, seen = await timed(dump_count)
                            t["dump"].append(elapsed)
                            assert seen == n, (seen, n)
                            assert count_routes(ns) == n
                            t["delete"].append((await timed(lambda: apply_all(delete_ops)))[0])
                        assert count_routes(ns) == 0
            finally:
                nl.close()
    finally:
        ns.delete()
    return times


NEXTHOP_PHASES = (
    "classic ip-batch: replace (empty)",
    "classic ours: replace (empty)",
    "nexthop ip-batch: nexthops + routes",
    "nexthop ours: nexthops",
    "nexthop ours: nhid routes",
    "nexthop ours: nexthops + routes",
    "nexthop ours: replace nexthops (existing)",
    "nexthop ours: replace nexthops (existing, compat 0)",
    "nexthop ours: delete routes + nexthops",
)
BASELINE = NEXTHOP_PHASES[0]


async def run_nexthop_size(n: int, reps: int) -> dict[str, list[float]]:
    ns = NetNamespace.create("nlbench")
    times: dict[str, list[float]] = {phase: [] for phase in NEXTHOP_PHASES}
    try:
        ns.ip("link", "add", "d0", "type", "veth", "peer", "name", "d0p")
        ns.ip("addr", "add", "192.168.255.254/16", "dev", "d0")
        ns.ip("link", "set", "d0", "up")
        ns.ip("link", "set", "d0p", "up")  # a nexthop needs carrier on its device
        ifindex = int(ns.ip("-o", "link", "show", "d0").stdout.split(":", 1)[0])
        specs = route_specs(n)
        classic = [Route(IPv4Network(dst), IPv4Address(gw), ifindex) for dst, gw in specs]
        nexthops = [Nexthop(i + 1, IPv4Address(gw), ifindex) for i, (_d, gw) in enumerate(specs)]
        nhid_routes = [Route(IPv4Network(dst), None, None, nhid=i + 1)
                       for i, (dst, _gw) in enumerate(specs)]
        with tempfile.TemporaryDirectory() as tmp:
            classic_file = os.path.join(tmp, "classic")
            nexthop_file = os.path.join(tmp, "nexthop")
            cleanup_file = os.path.join(tmp, "cleanup")
            with open(classic_file, "w") as f:
                f.writelines(f"route replace {d} via {g} dev d0\n" for d, g in specs)
            with open(nexthop_file, "w") as f:
                f.writelines(f"nexthop replace id {i + 1} via {g} dev d0\n"
                             for i, (_d, g) in enumerate(specs))
                f.writelines(f"route replace {d} nhid {i + 1}\n"
                             for i, (d, _g) in enumerate(specs))
            with open(cleanup_file, "w") as f:
                f.writelines(f"route del {d}\n" for d, _g in specs)
                f.write("nexthop flush\n")

            nl = RtNetlink.open(ns.name)
            try:
                async def apply_all(ops: list[Op]) -> float:
                    start = time.perf_counter()
                    results = await nl.apply(ops)
                    elapsed = time.perf_counter() - start
                    failed = [r for r in results if r.errno]
                    if failed:
                        raise RuntimeError(f"{len(failed)} ops failed, first: {failed[0]}")
                    return elapsed

                def clean() -> None:
                    subprocess.run(["ip", "-n", ns.name, "-batch", cleanup_file],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    assert count_routes(ns) == 0

                def check_nhid_routes() -> None:
                    out = ns.ip("-4", "route", "show").stdout
                    assert sum(1 for line in out.splitlines()
                               if line.startswith("10.") and " nhid " in line) == n

                for rep in range(reps):
                    t = times
                    order = [0, 1, 2, 3] if rep % 2 == 0 else [3, 2, 1, 0]
                    for step in order:
                        if step == 0:
                            t["classic ip-batch: replace (empty)"].append(
                                time_ip_batch(ns, classic_file))
                            assert count_routes(ns) == n
                            clean()
                        elif step == 1:
                            t["classic ours: replace (empty)"].append(
                                await apply_all([Op("replace", r) for r in classic]))
                            assert count_routes(ns) == n
                            clean()
                        elif step == 2:
                            t["nexthop ip-batch: nexthops + routes"].append(
                                time_ip_batch(ns, nexthop_file))
                            check_nhid_routes()
                            clean()
                        else:
                            a = await apply_all([Op("replace", nh) for nh in nexthops])
                            b = await apply_all([Op("replace", r) for r in nhid_routes])
                            check_nhid_routes()
                            t["nexthop ours: nexthops"].append(a)
                            t["nexthop ours: nhid routes"].append(b)
                            t["nexthop ours: nexthops + routes"].append(a + b)
                            t["nexthop ours: replace nexthops (existing)"].append(
                                await apply_all([Op("replace", nh) for nh in nexthops]))
                            ns.sysctl("net.ipv4.nexthop_compat_mode", "0")
                            t["nexthop ours: replace nexthops (existing, compat 0)"].append(
                                await apply_all([Op("replace", nh) for nh in nexthops]))
                            ns.sysctl("net.ipv4.nexthop_compat_mode", "1")
                            check_nhid_routes()
                            start = time.perf_counter()
                            await apply_all([Op("delete", r) for r in nhid_routes])
                            await apply_all([Op("delete", nh) for nh in nexthops])
                            t["nexthop ours: delete routes + nexthops"].append(
                                time.perf_counter() - start)
                            assert count_routes(ns) == 0
                            assert ns.ip("nexthop", "show").stdout.strip() == ""
            finally:
                nl.close()
    finally:
        ns.delete()
    return times


def print_nexthop_table(n: int, reps: int, times: dict[str, list[float]]) -> None:
    base = statistics.median(times[BASELINE])
    print(f"\nN = {n:,} peers, distinct gateways, {reps} repetitions (median seconds; "
          f"ratio = phase / '{BASELINE}')")
    print(f"{'phase':<52} {'median s':>9} {'ratio':>7} {'per s':>9}   runs")
    for phase in NEXTHOP_PHASES:
        med = statistics.median(times[phase])
        runs = ", ".join(f"{x:.3f}" for x in times[phase])
        print(f"{phase:<52} {med:>9.4f} {med / base:>7.3f} {n / med:>9,.0f}   {runs}")


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (needs network namespaces)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--reps", default="5,3", help="repetitions per size")
    parser.add_argument("--mode", choices=("classic", "nexthop"), default="classic")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    reps = [int(r) for r in args.reps.split(",")]
    reps += [reps[-1]] * (len(sizes) - len(reps))

    print(f"RSS after imports: {vm_kib('VmRSS') / 1024:.1f} MiB; load avg {os.getloadavg()}")
    if args.mode == "nexthop":
        for n, r in zip(sizes, reps, strict=False):
            print_nexthop_table(n, r, asyncio.run(run_nexthop_size(n, r)))
        print(f"\nload avg after: {os.getloadavg()}")
        return 0
    for n, r in zip(sizes, reps, strict=False):
        times = asyncio.run(run_size(n, r))
        print(f"\nN = {n:,} routes, distinct gateways, {r} repetitions (median seconds)")
        print(f"{'phase':<20} {'ip-batch':>10} {'ours':>10} {'ours/ip':>8} {'ours routes/s':>14}"
              "   runs (ours)")
        for phase in PHASES:
            ip_med = statistics.median(times["ip-batch"][phase])
            our_med = statistics.median(times["ours"][phase])
            runs = ", ".join(f"{x:.3f}" for x in times["ours"][phase])
            print(f"{phase:<20} {ip_med:>10.4f} {our_med:>10.4f} {our_med / ip_med:>8.2f} "
                  f"{n / our_med:>14,.0f}   {runs}")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\npeak RSS of this process (VmHWM): {vm_kib('VmHWM') / 1024:.1f} MiB "
          f"(ru_maxrss {ru / 1024:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
