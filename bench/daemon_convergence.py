"""Benchmark: one flanneld started against N existing leases (host-gw).

Measures, in the same run and topology (a node namespace on a /16 segment, so every
peer gateway is on-link, and a real etcd in a switch namespace):
  * floor: `ip -batch` adding the same N peers as the daemon does, one nexthop object and
    one `nhid` route each (the kernel's own cost for the same objects);
  * classic: `ip -batch` adding N plain `via` routes (upstream's form; distinct gateways
    make it quadratic in the kernel, performance-facts.md §1.2), up to --classic-max;
  * flanneld: from process start until the kernel holds all N routes, and its peak RSS
    (VmHWM) then and again after its first 10 s safety-net check (--check-wait) has run.
Prints medians over the repetitions and the ratios flanneld / floor and flanneld / classic.

Run as root:  .venv/bin/python bench/daemon_convergence.py [--sizes 1000,10000,50000]
              [--reps 3] [--classic-max 10000] [--check-wait 12]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.netns import NetNamespace, veth_between

NETWORK = IPv4Network("10.0.0.0/8")
SEGMENT = "172.20.0.0/16"
PREFIX = "/coreos.com/network"


def peer(i: int) -> tuple[IPv4Network, IPv4Address]:
    """The i-th peer: subnet 10.x.y.0/24 and a gateway on the /16 segment."""
    subnet = IPv4Network((int(IPv4Address("10.1.0.0")) + (i << 8), 24))
    gw = IPv4Address(int(IPv4Address("172.20.1.0")) + i)
    return subnet, gw


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def peer_lease(i: int, backend: str = "host-gw") -> tuple[str, str]:
    """(etcd key, value) of the i-th peer's lease, as upstream's flanneld writes it."""
    subnet, gw = peer(i)
    key = f"{PREFIX}/subnets/{subnet.network_address}-24"
    attrs: dict[str, object] = {"PublicIP": str(gw), "PublicIPv6": None, "BackendType": backend}
    if backend == "vxlan":
        attrs["BackendData"] = {"VNI": 1, "VtepMAC": vtep_mac(i)}
    return key, json.dumps(attrs, separators=(",", ":"))


def vtep_mac(i: int) -> str:
    return f"0e:00:{(i >> 24) & 255:02x}:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


async def seed(endpoint: str, n: int, backend: str = "host-gw") -> None:
    """Writes N leases as upstream nodes would (one shared etcd lease for speed)."""
    import httpx

    async with httpx.AsyncClient(base_url=endpoint, timeout=30) as c:
        lease = (await c.post("/v3/lease/grant", json={"TTL": 86400})).json()["ID"]
        ops = []
        for i in range(n):
            key, val = peer_lease(i, backend)
            ops.append({"requestPut": {"key": b64(key), "value": b64(val), "lease": lease}})
        for i in range(0, len(ops), 128):  # etcd's default --max-txn-ops
            r = await c.post("/v3/kv/txn", json={"success": ops[i:i + 128]})
            r.raise_for_status()


def count_routes(ns: NetNamespace, dev: str = "eth0") -> int:
    out = ns.ip("-4", "route", "show", "dev", dev, check=False).stdout  # dev may be coming
    return sum(1 for line in out.splitlines() if line.startswith("10.") and " via " in line)


def ip_batch_baseline(n: int, *, nexthops: bool = False) -> float:
    """Seconds for `ip -batch` to add the N routes in a fresh namespace (with `nexthops`:
    one nexthop object per peer and the route on it, in one batch)."""
    a = NetNamespace.create("pfb-ipb")
    b = NetNamespace.create("pfb-ipp")
    try:
        veth_between(a, "eth0", b, "eth0p")
        a.ip("addr", "add", "172.20.0.1/16", "dev", "eth0")
        with tempfile.NamedTemporaryFile("w", suffix=".batch", delete=False) as f:
            for i in range(n):
                subnet, gw = peer(i)
                if nexthops:
                    f.write(f"nexthop add id {i + 1} via {gw} dev eth0\n")
                else:
                    f.write(f"route add {subnet} via {gw} dev eth0\n")
            if nexthops:
                for i in range(n):
                    f.write(f"route add {peer(i)[0]} nhid {i + 1}\n")
        t0 = time.perf_counter()
        subprocess.run(["ip", "-n", a.name, "-batch", f.name], check=True)
        took = time.perf_counter() - t0
        os.unlink(f.name)
        assert count_routes(a) == n
        return took
    finally:
        a.delete()
        b.delete()


def flanneld_run(n: int, check_wait: float = 0.0) -> tuple[float, float, float, float]:
    """(seconds to all N routes, seconds of which were before the daemon's first route,
    peak RSS MiB at convergence, and after `check_wait` more seconds) for one daemon start
    against N leases."""
    netconf = {"Network": str(NETWORK), "SubnetLen": 24, "Backend": {"Type": "host-gw"}}
    with Cluster(nodes=0, name="pfb", netconf=netconf, segment=SEGMENT) as cl:
        assert cl.switch is not None and cl.etcd is not None
        cl.switch.run(sys.executable, __file__, "--seed", cl.etcd_endpoint, str(n),
                      timeout=600)
        node = cl.add_node(start=False)
        t0 = time.perf_counter()
        cl.start_daemon(node)
        assert node.proc is not None
        pid = node.proc.pid
        first = None
        hwm = 0.0
        while True:
            c = count_routes(node.ns)
            now = time.perf_counter()
            if c and first is None:
                first = now - t0
            hwm = max(hwm, vm_hwm_mib(pid))
            if c >= n:
                break
            if now - t0 > 900 or node.proc.poll() is not None:
                raise RuntimeError(f"flanneld did not converge ({c}/{n}):\n{node.log()[-3000:]}")
            time.sleep(0.02)
        took = time.perf_counter() - t0
        time.sleep(1.0)  # let it settle, then read the high-water mark once more
        hwm = max(hwm, vm_hwm_mib(pid))
        time.sleep(check_wait)  # the safety net's first dump and check
        if node.proc.poll() is not None:
            raise RuntimeError(f"flanneld exited:\n{node.log()[-3000:]}")
        return took, first or took, hwm, vm_hwm_mib(pid)


def vm_hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--seed":
        asyncio.run(seed(sys.argv[2], int(sys.argv[3]), *sys.argv[4:]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--classic-max", type=int, default=10000,
                    help="largest N for the classic-route baseline (quadratic: 50k ~200 s)")
    ap.add_argument("--check-wait", type=float, default=12.0,
                    help="seconds after convergence before the last RSS reading (the safety "
                         "net's first check runs 10 s after the first pass)")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(f"{'N':>6} {'floor s':>8} {'classic s':>10} {'flanneld s':>11} {'/floor':>7} "
          f"{'/classic':>9} {'first route s':>14} {'peak RSS MiB':>13} {'after check':>12}")
    for n in (int(x) for x in args.sizes.split(",")):
        floor, base, ours, first, rss, rss2 = [], [], [], [], [], []
        for _ in range(args.reps):  # interleaved, so load drift hits all alike
            floor.append(ip_batch_baseline(n, nexthops=True))
            if n <= args.classic_max:
                base.append(ip_batch_baseline(n))
            t, f0, h, h2 = flanneld_run(n, args.check_wait)
            ours.append(t)
            first.append(f0)
            rss.append(h)
            rss2.append(h2)
        mf, mo = statistics.median(floor), statistics.median(ours)
        mb = statistics.median(base) if base else float("nan")
        print(f"{n:>6} {mf:>8.3f} {mb:>10.3f} {mo:>11.3f} {mo / mf:>7.2f} {mo / mb:>9.2f} "
              f"{statistics.median(first):>14.3f} {max(rss):>13.1f} {max(rss2):>12.1f}",
              flush=True)
        print(f"        runs: floor {[round(x, 3) for x in floor]}  classic "
              f"{[round(x, 3) for x in base]}  flanneld {[round(x, 3) for x in ours]}  "
              f"RSS {[round(x, 1) for x in rss]} after check {[round(x, 1) for x in rss2]}",
              flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
