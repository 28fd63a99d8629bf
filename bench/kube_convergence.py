"""Benchmark: one flanneld --kube-subnet-mgr started in a cluster of N Nodes (host-gw),
on a real kube-apiserver, against the same daemon in etcd mode with N leases.

Same topology for both (a node namespace on a /16 segment, so every peer gateway is
on-link): the N peers are Node objects annotated as their flanneld would have left them
(kube), or N lease keys (etcd, seeded by bench/daemon_convergence.py's code). Measures
from process start until the kernel holds all N routes, and the daemon's peak RSS. Also
prints the API server's own floor: one unpaged GET of all N Nodes (transfer + JSON parse).
Prints medians and the ratio kube / etcd.

Run as root:  .venv/bin/python bench/kube_convergence.py [--sizes 1000,3000] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.kube import KubeLabStore, kube_apiserver_binary

P = "flannel.alpha.coreos.com/"


def etcd_bench() -> ModuleType:
    path = Path(__file__).with_name("daemon_convergence.py")
    spec = importlib.util.spec_from_file_location("daemon_convergence", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peer_node(i: int, dc: ModuleType) -> dict[str, Any]:
    subnet, gw = dc.peer(i)
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"peer{i:05d}", "annotations": {
                P + "kube-subnet-manager": "true", P + "backend-type": "host-gw",
                P + "backend-data": "null", P + "public-ip": str(gw)}},
            "spec": {"podCIDR": str(subnet), "podCIDRs": [str(subnet)]}}


def kube_runs(n: int, reps: int, dc: ModuleType) -> tuple[list[float], list[float],
                                                          list[float]]:
    """(seconds to all N routes, peak RSS MiB, unpaged list seconds) per repetition."""
    netconf = {"Network": str(dc.NETWORK), "Backend": {"Type": "host-gw"}}
    took, rss, floor = [], [], []
    with Cluster(nodes=0, name="pfkb", netconf=netconf, segment=dc.SEGMENT,
                 store=KubeLabStore()) as cl:
        ks = cl.store
        assert isinstance(ks, KubeLabStore)
        for i in range(n):
            ks.admin.create(peer_node(i, dc))
        for _ in range(reps):
            t0 = time.perf_counter()
            items = ks.admin.get("/api/v1/nodes")["items"]
            json.dumps(items)
            floor.append(time.perf_counter() - t0)
            node = cl.add_node(start=False)
            t0 = time.perf_counter()
            cl.start_daemon(node)
            assert node.proc is not None
            pid, hwm = node.proc.pid, 0.0
            while True:
                c = dc.count_routes(node.ns)
                hwm = max(hwm, dc.vm_hwm_mib(pid))
                if c >= n:
                    break
                if time.perf_counter() - t0 > 900 or node.proc.poll() is not None:
                    raise RuntimeError(f"no convergence ({c}/{n}):\n{node.log()[-3000:]}")
                time.sleep(0.02)
            took.append(time.perf_counter() - t0)
            time.sleep(1.0)
            rss.append(max(hwm, dc.vm_hwm_mib(pid)))
            cl.remove_node(node)
    return took, rss, floor


def main() -> int:
    if kube_apiserver_binary() is None:
        print("kube-apiserver not installed: run scripts/build-kubernetes.sh")
        return 1
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    dc = etcd_bench()
    print(f"{'N':>6} {'etcd s':>8} {'kube s':>8} {'kube/etcd':>10} {'list floor s':>13} "
          f"{'RSS etcd MiB':>13} {'RSS kube MiB':>13}")
    for n in (int(x) for x in args.sizes.split(",")):
        etcd_t, etcd_rss = [], []
        for _ in range(args.reps):
            t, _first, h, _after_check = dc.flanneld_run(n)
            etcd_t.append(t)
            etcd_rss.append(h)
        kube_t, kube_rss, floor = kube_runs(n, args.reps, dc)
        me, mk = statistics.median(etcd_t), statistics.median(kube_t)
        print(f"{n:>6} {me:>8.3f} {mk:>8.3f} {mk / me:>10.2f} {statistics.median(floor):>13.3f} "
              f"{max(etcd_rss):>13.1f} {max(kube_rss):>13.1f}", flush=True)
        print(f"        runs: etcd {[round(x, 3) for x in etcd_t]}  "
              f"kube {[round(x, 3) for x in kube_t]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
