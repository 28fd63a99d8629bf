"""`pyflannel lab demo`: the README's first command. Builds a host-gw cluster with a real
etcd in network namespaces, shows what flannel programmed, and removes it all."""

from __future__ import annotations

import sys
import time

from pyflannel.lab.cluster import Cluster


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_demo(*, nodes: int = 3, keep: bool = False) -> int:
    _say(f"Building a {nodes}-node flannel cluster (host-gw, etcd) in network namespaces...")
    t0 = time.monotonic()
    with Cluster(nodes=nodes, name="pfl") as cl:
        _say(f"  etcd at {cl.etcd_endpoint} (inside namespace {cl.switch.name})"  # type: ignore[union-attr]
             )
        for n in cl.nodes.values():
            _say(f"  {n.name}: namespace {n.ns.name}, eth0 {n.addr}, flanneld pid "
                 f"{n.proc.pid if n.proc else '-'}")
        _say("Waiting for every node to have a lease and a route to every other node...")
        took = cl.wait_until(cl.converged, timeout=60, what="routes on every node")
        _say(f"Converged in {took:.2f} s ({time.monotonic() - t0:.1f} s including setup).\n")
        _say("Leases in etcd:")
        for key, attrs in sorted(cl.leases().items()):
            _say(f"  {key}  {attrs}")
        for n in cl.nodes.values():
            _say(f"\n{n.name} ({n.addr}, subnet {cl.subnet_of(n)}) $ ip route")
            for line in n.routes().splitlines():
                _say(f"  {line}")
            _say(f"{n.name} $ cat {n.subnet_file.name}")
            for line in n.subnet_file.read_text().splitlines():
                _say(f"  {line}")
        if keep:
            _say("\nThe cluster stays up until you press Enter.")
            sys.stdin.readline()
        _say("\nRemoving the cluster (namespaces, daemons, etcd)...")
    _say("Done: nothing is left on this machine.")
    return 0
