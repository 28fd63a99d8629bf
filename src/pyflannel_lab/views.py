"""What the lab shows: building a cluster with progress, every node's `ip route` as in
flannel's host-gw walk-through, the pod reachability matrix, live route changes when
nodes join or leave, and the SVG picture."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Any

from pyflannel.status.svg import GraphEdge, GraphNode, render_svg
from pyflannel_lab.cluster import Cluster, EtcdLabStore, LabNode, LabStore

Say = Callable[[str], None]
NETWORK = "10.244.0.0/16"


def make_store(kind: str) -> LabStore | None:
    if kind == "etcd":
        return None  # the Cluster's default
    if kind == "kube":
        try:
            from pyflannel_lab.kube import KubeLabStore
        except ImportError:
            raise ValueError("--store kube needs the Kubernetes lab store, which this "
                             "version does not have") from None
        store: LabStore = KubeLabStore()
        return store
    if kind in ("etcd-cluster", "etcd-cluster-tls"):
        from pyflannel_lab.etcdcluster import EtcdClusterStore

        return EtcdClusterStore(tls=kind.endswith("-tls"))
    raise ValueError(f"--store must be etcd, etcd-cluster, etcd-cluster-tls or kube, "
                     f"not {kind!r}")


def build(name: str, opts: dict[str, Any], say: Say,
          on_created: Callable[[], None] | None = None) -> Cluster:
    nodes = int(opts.get("nodes", 3))
    backend = str(opts.get("backend", "host-gw"))
    store_kind = str(opts.get("store", "etcd"))
    if backend not in ("host-gw", "vxlan", "wireguard"):
        raise ValueError(f"--backend must be host-gw, vxlan or wireguard, not {backend!r}")
    netconf = {"Network": NETWORK, "Backend": {"Type": backend}}
    say(f"Building a {nodes}-node flannel cluster ({backend}, {store_kind}) in network "
        "namespaces; the machine's own network is not touched.")
    cl = Cluster(nodes=0, name=name, netconf=netconf, store=make_store(store_kind),
                 flanneld_args=["--ip-masq"])
    try:
        if on_created is not None:
            on_created()
        t0 = time.monotonic()
        cl.start()
        say(f"  switch namespace {cl.switch.name if cl.switch else '-'}: bridge for the "
            f"nodes' segment {cl.segment}, {store_kind} at "
            f"{cl.store.endpoint if isinstance(cl.store, EtcdLabStore) else cl.switch_addr}")
        for _ in range(nodes):
            n = cl.add_node()
            say(f"  {n.name}: namespace {n.ns.name}, eth0 {n.addr}, flanneld started "
                f"(pid {n.proc.pid if n.proc else '-'})")
        say("Waiting for every node's lease and routes...")
        took = cl.wait_until(cl.converged, timeout=90, what="routes on every node")
        say(f"  converged {took:.1f} s after the last daemon started "
            f"({time.monotonic() - t0:.1f} s in all)")
        say("Creating a pod on every node through the flannel CNI plugin (bridge + "
            "host-local), and an outside host that is not in the cluster...")
        cl.add_outside_host()
        for n in cl.nodes.values():
            pod = cl.add_pod(n, f"pod{n.index}")
            say(f"  {pod.name} on {n.name}: {pod.ip}")
        return cl
    except BaseException:
        cl.close()
        raise


def routes_text(cl: Cluster, node: LabNode) -> list[str]:
    return [line.strip() for line in node.routes().splitlines()]


def cluster_routes(cl: Cluster, node: LabNode) -> dict[str, str]:
    """dst -> `ip route` line, for routes to other nodes' pod subnets (any backend)."""
    network = ip_network(cl.netconf.get("Network", NETWORK))
    out: dict[str, str] = {}
    for line in routes_text(cl, node):
        parts = line.split()
        if not parts or "/" not in parts[0] or "via" not in parts:
            continue
        dst = ip_network(parts[0], strict=False)
        if isinstance(dst, IPv4Network) and dst.subnet_of(network):  # type: ignore[arg-type]
            out[parts[0]] = line
    return out


def show_routes(cl: Cluster, say: Say) -> None:
    for n in cl.nodes.values():
        say("")
        say(f"{n.name} ({n.addr}, pods {cl.subnet_of(n)}) $ ip route")
        for line in routes_text(cl, n):
            say(f"  {line}")
        if cl.wireguard_dirs:
            say(f"{n.name} $ wg show")
            for line in cl.node_run(n, "wg", "show", check=False).stdout.splitlines():
                say(f"  {line}")


def matrix(cl: Cluster, say: Say) -> bool:
    """Who reaches whom, and with which source address the receiver saw."""
    seen = cl.reachability()
    pods = list(cl.pods.values())
    cols = [p.name for p in pods] + (["outside"] if cl.outside else [])
    say("")
    say("Reachability (TCP): each cell is the source address the receiver saw")
    say("  " + "from \\ to".ljust(12) + "".join(c.ljust(16) for c in cols))
    ok = True
    for a in pods:
        row = []
        for c in cols:
            if c == a.name:
                row.append("-")
                continue
            got = seen[(a.name, c)]
            want = str(a.node.addr) if c == "outside" else str(a.ip)
            ok = ok and got == want
            row.append(got if got == want else f"FAIL {got}"[:15])
        say("  " + a.name.ljust(12) + "".join(x.ljust(16) for x in row))
    say("  Pod to pod keeps the pod IP (no NAT inside the cluster); pod to outside is "
        "masqueraded to the node's IP." if ok else "  Some paths FAILED (see above).")
    return ok


def show(cl: Cluster, say: Say, *, hint: bool = True) -> int:
    show_routes(cl, say)
    ok = matrix(cl, say)
    if hint:
        say("")
        say("Try: pyflannel lab add-node | lab remove-node NODE | lab graph | lab status | "
            "lab down")
    return 0 if ok else 1


def route_snapshot(cl: Cluster) -> dict[int, dict[str, str]]:
    return {n.index: cluster_routes(cl, n) for n in cl.nodes.values()}


def watch_routes(cl: Cluster, say: Say, done: Callable[[], bool], timeout: float = 60,
                 before: dict[int, dict[str, str]] | None = None) -> None:
    """Prints routes appearing (+) and disappearing (-) on every node until `done()`."""
    before = route_snapshot(cl) if before is None else before
    t0 = time.monotonic()
    while True:
        finished = done()
        for n in list(cl.nodes.values()):
            now = cluster_routes(cl, n)
            old = before.get(n.index, {})
            for dst in sorted(now.keys() - old.keys()):
                say(f"  {time.monotonic() - t0:5.2f}s  {n.name}: + {now[dst]}")
            for dst in sorted(old.keys() - now.keys()):
                say(f"  {time.monotonic() - t0:5.2f}s  {n.name}: - {old[dst]}")
            before[n.index] = now
        if finished:
            return
        if time.monotonic() - t0 > timeout:
            say("  (timed out waiting; see `pyflannel lab status`)")
            return
        time.sleep(0.05)


def graph(cl: Cluster, out: Path) -> None:
    nodes, edges = [], []
    subnets = {n.index: cl.subnet_of(n) for n in cl.nodes.values()}
    for n in cl.nodes.values():
        nodes.append(GraphNode(n.name, str(subnets[n.index] or "-"), str(n.addr),
                               f"segment {n.segment}" if len(cl.segments) > 1 else ""))
    for n in cl.nodes.values():
        have = cluster_routes(cl, n)
        for m in cl.nodes.values():
            if m is n or subnets[m.index] is None:
                continue
            line = have.get(str(subnets[m.index]))
            via = line.split(" via ")[1].split()[0] if line else str(m.addr)
            edges.append(GraphEdge(n.name, m.name, "ok" if line else "missing", f"via {via}"))
    backend = cl.netconf.get("Backend", {}).get("Type", "?")
    out.write_text(render_svg(nodes, edges, title=f"flannel lab: {len(nodes)} nodes, "
                              f"{backend}, {cl.netconf.get('Network')}"))


def node_status(cl: Cluster, say: Say) -> int:
    """`pyflannel status --check` inside every node, with the daemons' own flags."""
    import subprocess

    worst = 0
    for n in cl.nodes.values():
        r = subprocess.run(
            cl.node_exec_args(n, *cl.status_argv(n)), capture_output=True, text=True,
            timeout=60,
            env=cl.daemon_env(n))  # NODE_NAME in kube mode, the wireguard key file
        say(f"== {n.name} ({n.ns.name}) ==")
        for line in (r.stdout + r.stderr).splitlines():
            say(f"  {line}")
        worst = max(worst, r.returncode)
    return worst


def command(cl: Cluster, cmd: str, req: dict[str, Any], say: Say) -> int:
    if cmd == "add-node":
        n = cl.add_node()
        say(f"{n.name} joins: namespace {n.ns.name}, eth0 {n.addr}; routes change live:")
        watch_routes(cl, say, cl.converged)
        pod = cl.add_pod(n, f"pod{n.index}")
        say(f"  {pod.name} on {n.name}: {pod.ip}")
        return 0 if matrix(cl, say) else 1
    if cmd == "remove-node":
        name = str(req.get("node") or "")
        node = next((x for x in cl.nodes.values() if x.name == name), None)
        if node is None:
            raise ValueError(f"no node {name!r}; nodes: "
                             f"{', '.join(x.name for x in cl.nodes.values())}")
        for pod in [p for p in cl.pods.values() if p.node is node]:
            cl.delete_pod(pod)
        say(f"{node.name} leaves (its daemon stops, its lease is deleted); routes change live:")
        before = route_snapshot(cl)
        before.pop(node.index, None)
        cl.remove_node(node)
        watch_routes(cl, say, cl.converged, before=before)
        return 0
    if cmd == "graph":
        out = Path(str(req.get("out") or "flannel-lab.svg"))
        graph(cl, out)
        say(f"Wrote {out}: open it in a browser.")
        return 0
    if cmd == "show":
        return show(cl, say)
    if cmd == "status":
        return node_status(cl, say)
    raise ValueError(f"unknown lab command {cmd!r}")
