"""`pyflannel lab demo`: the README's first command. Builds a host-gw cluster with a real
etcd in network namespaces, shows what flannel programmed, and removes it all."""

from __future__ import annotations

import sys
import time

from pyflannel.lab.cluster import Cluster


def _say(msg: str) -> None:
    print(msg, flush=True)


def print_matrix(cl: Cluster) -> bool:
    """Who reaches whom, and with which source address the receiver saw."""
    matrix = cl.reachability()
    pods = list(cl.pods.values())
    cols = [p.name for p in pods] + (["outside"] if cl.outside else [])
    _say("\nReachability (TCP): each cell is the source address the receiver saw")
    _say("  " + "from \\ to".ljust(12) + "".join(c.ljust(16) for c in cols))
    ok = True
    for a in pods:
        row = []
        for c in cols:
            if c == a.name:
                row.append("-")
                continue
            seen = matrix[(a.name, c)]
            want = str(a.node.addr) if c == "outside" else str(a.ip)
            ok = ok and seen == want
            row.append(seen if seen == want else f"FAIL {seen}"[:15])
        _say("  " + a.name.ljust(12) + "".join(x.ljust(16) for x in row))
    _say("  Pod to pod keeps the pod IP (no NAT inside the cluster); pod to outside is "
         "masqueraded to the node's IP." if ok else "  Some paths FAILED (see above).")
    return ok


def run_demo(*, nodes: int = 3, keep: bool = False) -> int:
    _say(f"Building a {nodes}-node flannel cluster (host-gw, etcd) in network namespaces...")
    t0 = time.monotonic()
    with Cluster(nodes=nodes, name="pfl", flanneld_args=["--ip-masq"]) as cl:
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
        _say("\nCreating a pod on every node through the flannel CNI plugin "
             "(bridge + host-local), and an outside host that is not in the cluster...")
        cl.add_outside_host()
        for n in cl.nodes.values():
            pod = cl.add_pod(n, f"pod{n.index}")
            _say(f"  {pod.name} on {n.name}: {pod.ip}")
        all_ok = print_matrix(cl)
        if keep:
            _say("\nThe cluster stays up until you press Enter.")
            sys.stdin.readline()
        _say("\nRemoving the cluster (namespaces, daemons, etcd)...")
    _say("Done: nothing is left on this machine.")
    return 0 if all_ok else 1
