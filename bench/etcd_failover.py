"""Benchmark: how long a lease takes to reach every node while the etcd member serving
the daemons' watches fails, against the same with no fault.

A 3-node host-gw lab on a 3-member etcd cluster (pyflannel_lab.etcdcluster). Each round
finds the member the daemons' watches stream from, makes another member the leader (so
the write itself is not held up by an election), breaks the watched member (`kill`,
`pause` = SIGSTOP, `partition` = link down, `isolate` = peer traffic dropped) or not
(`none`, the baseline), writes a lease through a healthy member and times until every node
routes it: detection of the silent member + reconnect elsewhere + catch-up + programming.
Prints medians per fault and the ratio against `none`. Needs root.

    sudo .venv/bin/python bench/etcd_failover.py [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.etcdcluster import EtcdClusterStore, EtcdMember, Fault

KINDS: tuple[Fault | None, ...] = (None, "kill", "pause", "partition", "isolate")
SETTLE = 6.0  # idle pooled connections to a former member expire after 5 s


def watched_member(cl: Cluster, store: EtcdClusterStore) -> tuple[EtcdMember, int]:
    """The member most daemons stream from, and how many do (they may have spread over
    members after earlier rounds: each leaves a silent member for the next one it can
    reach)."""
    nodes = {str(n.addr) for n in cl.nodes.values()}
    counts = [(len(nodes & m.clients()), m) for m in store.members.members]
    count, member = max(counts, key=lambda c: c[0])
    return member, count


def one_round(cl: Cluster, store: EtcdClusterStore, kind: Fault | None, n: int) -> float:
    target, count = watched_member(cl, store)
    print(f"  {kind or 'none'} on {target.name}, serving {count} of {len(cl.nodes)} daemons",
          flush=True)
    store.members.make_leader(next(m for m in store.members.members if m is not target))
    subnet, gw = f"10.244.{200 + n}.0/24", f"192.168.77.{100 + n}"
    nodes = list(cl.nodes.values())
    t0 = time.monotonic()
    if kind is not None:
        target.fault(kind)
    try:
        store.put_lease(subnet, gw)
        cl.wait_until(lambda: all((subnet, gw) in cl.flannel_routes(x) for x in nodes),
                      timeout=60, interval=0.02, what=f"lease routed ({kind})")
        elapsed = time.monotonic() - t0
    finally:
        if kind is not None:
            target.heal()
    target.wait_ready()
    cl.etcdctl("del", store.lease_key(subnet))
    cl.wait_until(cl.converged, timeout=60, what="lease removed")
    time.sleep(SETTLE)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    store = EtcdClusterStore()
    results: dict[str, list[float]] = {str(k or "none"): [] for k in KINDS}
    with Cluster(nodes=3, name="pfbf", store=store) as cl:
        cl.wait_until(cl.converged, timeout=60, what="initial convergence")
        time.sleep(SETTLE)
        n = 0
        for _ in range(args.reps):
            for kind in KINDS:
                n += 1
                took = one_round(cl, store, kind, n)
                print(f"round {n}: {kind or 'none'} {took:.3f}s", flush=True)
                results[str(kind or "none")].append(took)
    base = statistics.median(results["none"])
    print(f"{'fault':>10} {'median s':>9} {'ratio':>7}  runs (s)")
    for name, runs in results.items():
        med = statistics.median(runs)
        print(f"{name:>10} {med:>9.3f} {med / base:>7.1f}  {[round(x, 2) for x in runs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
