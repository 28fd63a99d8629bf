#!/usr/bin/env python3
"""Pod-to-pod TCP throughput over host-gw, vxlan and wireguard, beside node-to-node, in one run.

Run as root. Builds one lab cluster per backend side by side (lab.Cluster: real etcd, real
flanneld, pods through the real CNI plugins), each with two nodes on one L2 segment (a bridge
in the switch namespace) and one pod per node. wireguard runs its userspace implementation
(Debian's wireguard-go, started by flanneld; this kernel has no wireguard module). Debian's
iperf3 (TCP, one stream, default settings, receiver throughput) measures, in interleaved
order per repetition (the order rotates), for each backend B:

  node -> node in B's cluster (the baseline: the same topology in every cluster)
  pod -> pod over B (host-gw: a route; vxlan: flannel.1, MTU 1450; wireguard:
                     flannel-wg, MTU 1420, encrypted in userspace)

and prints medians, each backend's pod/node ratio, each backend's pod throughput against
the first backend's, and the TCP sender's mean RTT under load. Both iperf3 ends and the
whole "network" (and wireguard-go) share this machine's CPUs: these are software-path
figures.

    .venv/bin/python bench/dataplane_iperf.py [--reps 5] [--seconds 5]
        [--backends host-gw,vxlan,wireguard]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from contextlib import ExitStack

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.netns import NetNamespace
from pyflannel_lab.wireguard import peers_converged, userspace_wireguard_missing

BACKENDS = ("host-gw", "vxlan", "wireguard")
SHORT = {"host-gw": "hg", "vxlan": "vx", "wireguard": "wg"}


def iperf(src: NetNamespace, dst: NetNamespace, ip: str,
          seconds: int) -> tuple[float, float, int]:
    """Receiver-side Gbit/s of one TCP stream from `src` to `ip` (served in `dst`), the
    sender's mean smoothed RTT in ms (under that load) and its retransmitted segments."""
    port = str(random.randint(20000, 60000))  # fresh namespaces: nothing else listens there
    # --forceflush: the "listening" line must reach the pipe before the client starts
    server = subprocess.Popen(dst.exec_args("iperf3", "-s", "-1", "--forceflush", "-B", ip,
                                            "-p", port),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        for line in server.stdout:  # wait until it listens
            if "listening" in line:
                break
        out = src.run("iperf3", "-c", ip, "-p", port, "-t", str(seconds), "-J",
                      timeout=seconds + 30).stdout
        end = json.loads(out)["end"]
        rtt_us = end["streams"][0]["sender"].get("mean_rtt", float("nan"))
        retrans = int(end["sum_sent"].get("retransmits", 0))
        return (float(end["sum_received"]["bits_per_second"]) / 1e9, float(rtt_us) / 1000,
                retrans)
    finally:
        server.kill()
        server.wait()


def converged_vxlan(cl: Cluster) -> bool:
    return all(len([r for r in n.ns.ip("route", "show", "dev", "flannel.1",
                                       check=False).stdout.splitlines() if "onlink" in r])
               == len(cl.nodes) - 1 for n in cl.nodes.values())


def cluster_for(backend: str) -> Cluster:
    return Cluster(nodes=2, name=f"pfb{SHORT[backend]}", flanneld_args=["--ip-masq"],
                   netconf={"Network": "10.244.0.0/16", "Backend": {"Type": backend}},
                   wireguard_impl="userspace" if backend == "wireguard" else None)


def wait_converged(cl: Cluster, backend: str) -> None:
    cond = {"host-gw": cl.converged, "vxlan": lambda: converged_vxlan(cl),
            "wireguard": lambda: peers_converged(cl)}[backend]
    cl.wait_until(cond, timeout=60, interval=0.2, what=f"{backend} convergence")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--backends", default="host-gw,vxlan",
                    help=f"comma-separated, from {', '.join(BACKENDS)}; ratios against the "
                         "first")
    args = ap.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in BACKENDS for b in backends) or \
            len(set(backends)) != len(backends):
        print(f"--backends: expected distinct names from {', '.join(BACKENDS)}, got "
              f"{args.backends!r}", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3", file=sys.stderr)
        return 1
    if "wireguard" in backends and (why := userspace_wireguard_missing()) is not None:
        print(f"wireguard {why}", file=sys.stderr)
        return 1
    version = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {version.splitlines()[0]}")
    if "wireguard" in backends:
        wgv = subprocess.run(["wireguard-go", "--version"], capture_output=True,
                             text=True).stdout.strip()
        print(f"wireguard: userspace, {wgv.splitlines()[0] if wgv else 'wireguard-go'}")
    cases: list[str] = []
    pairs: dict[str, tuple[NetNamespace, NetNamespace, str]] = {}
    with ExitStack() as stack:
        clusters = {b: stack.enter_context(cluster_for(b)) for b in backends}
        for b, cl in clusters.items():
            wait_converged(cl, b)

        def node_pair(a: LabNode, b: LabNode) -> tuple[NetNamespace, NetNamespace, str]:
            return a.ns, b.ns, str(b.addr)

        for b, cl in clusters.items():
            n1, n2 = cl.nodes[1], cl.nodes[2]
            p1, p2 = cl.add_pod(n1, "p1", serve=False), cl.add_pod(n2, "p2", serve=False)
            cases += [f"node->node ({b} cluster)", f"pod->pod {b}"]
            pairs[cases[-2]] = node_pair(n1, n2)
            pairs[cases[-1]] = (p1.ns, p2.ns, str(p2.ip))
        results: dict[str, list[float]] = {c: [] for c in cases}
        rtts: dict[str, list[float]] = {c: [] for c in cases}
        retrans: dict[str, list[int]] = {c: [] for c in cases}
        for rep in range(args.reps):
            k = rep % len(cases)
            for case in cases[k:] + cases[:k]:
                src, dst, ip = pairs[case]
                gbps, rtt, rtx = iperf(src, dst, ip, args.seconds)
                results[case].append(gbps)
                rtts[case].append(rtt)
                retrans[case].append(rtx)
            print(f"rep {rep + 1}: " + ", ".join(f"{c}={results[c][-1]:.2f}" for c in cases),
                  flush=True)
        mtu = {c: dst.ip("-o", "link", "show", "eth0").stdout.split("mtu ")[1].split()[0]
               for c, (_src, dst, _ip) in pairs.items()}

    def med(case: str) -> float:
        return statistics.median(results[case])

    print(f"\nTCP, 1 stream, {args.seconds} s per run, {args.reps} interleaved repetitions")
    print(f"{'case':<34}{'median Gbit/s':>14}  {'runs':<40}{'RTT ms':>8}{'MTU':>6}"
          f"{'retrans':>9}")
    for case in cases:
        runs = ", ".join(f"{x:.2f}" for x in results[case])
        rtt = statistics.median(rtts[case])
        rtx_med = statistics.median(retrans[case])
        print(f"{case:<34}{med(case):>14.2f}  {runs:<40}{rtt:>8.3f}{mtu[case]:>6}{rtx_med:>9.0f}")
    print()
    for b in backends:
        print(f"{b}: pod / node = {med(f'pod->pod {b}') / med(f'node->node ({b} cluster)'):.2f}")
    first = backends[0]
    for b in backends[1:]:
        print(f"{b} / {first} (pod->pod) = {med(f'pod->pod {b}') / med(f'pod->pod {first}'):.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
