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

from pyflannel.lab.netns import NetNamespace
from pyflannel.netlink import Op, Route, RtNetlink

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


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (needs network namespaces)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--reps", default="5,3", help="repetitions per size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    reps = [int(r) for r in args.reps.split(",")]
    reps += [reps[-1]] * (len(sizes) - len(reps))

    print(f"RSS after imports: {vm_kib('VmRSS') / 1024:.1f} MiB; load avg {os.getloadavg()}")
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
