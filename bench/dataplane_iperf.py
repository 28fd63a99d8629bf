#!/usr/bin/env python3
"""Pod-to-pod TCP throughput over host-gw and over vxlan, beside node-to-node, in one run.

Run as root. Builds two lab clusters side by side (lab.Cluster: real etcd, real flanneld,
pods through the real CNI plugins), each with two nodes on one L2 segment (a bridge in
the switch namespace) and one pod per node: one cluster runs host-gw, the other vxlan.
Debian's iperf3 (TCP, one stream, default settings, receiver throughput) measures, in
interleaved order per repetition (the order rotates):

  a) node → node in the host-gw cluster (the baseline for b)
  b) pod → pod over host-gw
  a') node → node in the vxlan cluster (the baseline for c; same topology as a)
  c) pod → pod over vxlan (flannel.1, MTU 1450)

and prints medians, the ratios b/a, c/a', c/b, and the TCP sender's mean RTT under load.
Both iperf3 ends and the whole "network" share this machine's CPUs: these are
software-path figures.

    .venv/bin/python bench/dataplane_iperf.py [--reps 5] [--seconds 5]
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

CASES = ("a) node->node (host-gw cluster)", "b) pod->pod host-gw",
         "a') node->node (vxlan cluster)", "c) pod->pod vxlan")


def iperf(src: NetNamespace, dst: NetNamespace, ip: str, seconds: int) -> tuple[float, float]:
    """Receiver-side Gbit/s of one TCP stream from `src` to `ip` (served in `dst`), and the
    sender's mean smoothed RTT in ms (under that load)."""
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
        return float(end["sum_received"]["bits_per_second"]) / 1e9, float(rtt_us) / 1000
    finally:
        server.kill()
        server.wait()


def converged_vxlan(cl: Cluster) -> bool:
    return all(len([r for r in n.ns.ip("route", "show", "dev", "flannel.1",
                                       check=False).stdout.splitlines() if "onlink" in r])
               == len(cl.nodes) - 1 for n in cl.nodes.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("iperf3") is None:
        print("needs root and iperf3", file=sys.stderr)
        return 1
    version = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout
    print(f"load average at start: {os.getloadavg()[0]:.2f}; {version.splitlines()[0]}")
    with ExitStack() as stack:
        hg = stack.enter_context(Cluster(
            nodes=2, name="pfbh", flanneld_args=["--ip-masq"],
            netconf={"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}))
        vx = stack.enter_context(Cluster(
            nodes=2, name="pfbx", flanneld_args=["--ip-masq"],
            netconf={"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}))
        hg.wait_until(hg.converged, timeout=60, what="host-gw routes")
        vx.wait_until(lambda: converged_vxlan(vx), timeout=60, what="vxlan routes")
        h1, h2 = hg.nodes[1], hg.nodes[2]
        v1, v2 = vx.nodes[1], vx.nodes[2]
        hp1, hp2 = hg.add_pod(h1, "p1", serve=False), hg.add_pod(h2, "p2", serve=False)
        vp1, vp2 = vx.add_pod(v1, "p1", serve=False), vx.add_pod(v2, "p2", serve=False)

        def node_pair(a: LabNode, b: LabNode) -> tuple[NetNamespace, NetNamespace, str]:
            return a.ns, b.ns, str(b.addr)

        pairs: dict[str, tuple[NetNamespace, NetNamespace, str]] = {
            CASES[0]: node_pair(h1, h2),
            CASES[1]: (hp1.ns, hp2.ns, str(hp2.ip)),
            CASES[2]: node_pair(v1, v2),
            CASES[3]: (vp1.ns, vp2.ns, str(vp2.ip)),
        }
        results: dict[str, list[float]] = {c: [] for c in CASES}
        rtts: dict[str, list[float]] = {c: [] for c in CASES}
        for rep in range(args.reps):
            order = CASES[rep % 4:] + CASES[:rep % 4]
            for case in order:
                src, dst, ip = pairs[case]
                gbps, rtt = iperf(src, dst, ip, args.seconds)
                results[case].append(gbps)
                rtts[case].append(rtt)
            print(f"rep {rep + 1}: " + ", ".join(f"{c.split(')')[0]})={results[c][-1]:.2f}"
                                                  for c in CASES), flush=True)
        mtu = {c: dst.ip("-o", "link", "show", "eth0").stdout.split("mtu ")[1].split()[0]
               for c, (_src, dst, _ip) in pairs.items()}

    def med(case: str) -> float:
        return statistics.median(results[case])

    print(f"\nTCP, 1 stream, {args.seconds} s per run, {args.reps} interleaved repetitions")
    print(f"{'case':<34}{'median Gbit/s':>14}  {'runs':<40}{'RTT ms':>8}{'MTU':>6}")
    for case in CASES:
        runs = ", ".join(f"{x:.2f}" for x in results[case])
        rtt = statistics.median(rtts[case])
        print(f"{case:<34}{med(case):>14.2f}  {runs:<40}{rtt:>8.3f}{mtu[case]:>6}")
    a, b, a2, c = (med(x) for x in CASES)
    print(f"\nb/a (host-gw pod / node) = {b / a:.2f}; c/a' (vxlan pod / node) = {c / a2:.2f}; "
          f"c/b (vxlan / host-gw) = {c / b:.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
