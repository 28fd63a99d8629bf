"""What `pyflannel lab up --kubernetes` shows and does: the cluster coming up, then the
walk-through's commands with their output, the timings and the flannel pods' memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.controlplane import kube_binaries_missing
from pyflannel_lab.kubelab import KubeletLabStore, add_node, build_cluster
from pyflannel_lab.lifecycle import NodeLife, RouteWatch, TcpWatch, wait_routes
from pyflannel_lab.walkthrough import (
    FLANNEL_NS,
    FlannelDeployment,
    Kubectl,
    ProbePods,
    missing_log_lines,
)

Say = Callable[[str], None]
MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kube-flannel.yml"


class KubeLab:
    """A running --kubernetes lab: its cluster, kubectl, flannel, probe pods."""

    def __init__(self, cluster: Cluster, backend: str) -> None:
        self.cluster, self.backend = cluster, backend
        store = cluster.store
        assert isinstance(store, KubeletLabStore)
        assert store.cp is not None and store.kubeconfig is not None
        assert cluster.switch is not None
        self.store = store
        self.kubectl = Kubectl(cluster.switch, store.kubeconfig)
        self.flannel = FlannelDeployment(cluster, self.kubectl,
                                         (str(cluster.switch_addr), store.cp.api.port))
        self.probes = ProbePods(cluster, self.kubectl)
        self.life = NodeLife(cluster, self.kubectl)

    @property
    def workdir(self) -> Path:
        return self.cluster.workdir

    def close(self) -> None:
        for p in self.probes.pods.values():
            if p.server is not None:
                p.server.kill()
        self.cluster.close()


def build(name: str, opts: dict[str, Any], state_path: Path, say: Say) -> KubeLab:
    missing = kube_binaries_missing()
    if missing:
        raise ValueError(f"--kubernetes needs {', '.join(missing)}: run "
                         "scripts/build-kubernetes.sh as root (once per machine)")
    nodes = int(opts.get("nodes", 2))
    backend = str(opts.get("backend", "host-gw"))
    if backend not in ("host-gw", "vxlan"):
        raise ValueError(f"--backend must be host-gw or vxlan, not {backend!r}")
    say(f"Building a {nodes}-node Kubernetes v1.20.2 cluster (containerd + kubelet per "
        "node) in namespaces; the machine's own network and sysctls are not touched.")
    t0 = time.monotonic()
    cl = build_cluster(name, nodes, {"Network": "10.244.0.0/16", "Backend": {"Type": backend}},
                       state_path, say)
    lab = KubeLab(cl, backend)
    try:
        say(f"  {nodes} kubelets started {time.monotonic() - t0:.1f} s after the start")
        if opts.get("deploy", True):
            deploy(lab, say)
        else:
            say("The nodes stay NotReady until flannel's init containers install the CNI "
                "config. Next: pyflannel lab kubectl create -f <kube-flannel.yml>")
        return lab
    except BaseException:
        lab.close()
        raise


def deploy(lab: KubeLab, say: Say) -> None:
    fl = lab.flannel
    if lab.backend == "host-gw":
        say("$ sed 's/vxlan/host-gw/' -i kube-flannel.yml")
    say(f"  (no kube-proxy here: the container gets KUBERNETES_SERVICE_HOST={fl.api[0]} "
        f"KUBERNETES_SERVICE_PORT={fl.api[1]})")
    path = fl.create(MANIFEST, lab.backend)
    say(f"$ kubectl create -f {path}")
    took = fl.wait_ready()
    say(f"  every node Ready, one Running+Ready flannel pod per node and every route in "
        f"place {took:.1f} s after kubectl create")


def show(lab: KubeLab, say: Say) -> int:
    for args in (("get", "nodes", "-o", "wide"), ("get", "pods", "-n", FLANNEL_NS, "-o", "wide")):
        say(f"$ kubectl {' '.join(args)}")
        for line in lab.kubectl.run(*args, check=False).stdout.splitlines():
            say("  " + line)
    pods = lab.flannel.pods()
    if pods:
        node, pod = sorted(pods.items())[0]
        name = pod["metadata"]["name"]
        say(f"$ kubectl logs -n {FLANNEL_NS} {name}")
        log = lab.flannel.logs(name)
        for line in log.splitlines()[:40]:
            say("  " + line)
        backend = lab.cluster.netconf.get("Backend", {}).get("Type", lab.backend)
        missing = missing_log_lines(log, node, backend)
        if missing:  # the daemon's gap, not the cluster's: reported, not fatal
            say(f"  note: upstream's lines missing from the log: {missing}")
        for n in lab.cluster.nodes.values():
            say(f"$ pyflannel lab exec {n.name} -- ip route show")
            for line in n.routes().splitlines():
                say("  " + line)
        for node, (used, rss, req) in sorted(lab.flannel.memory().items()):
            say(f"  flannel pod memory on {node}: {used / 2**20:.1f} MiB charged to its "
                f"cgroup ({rss / 2**20:.1f} MiB RSS) against a request of {req}")
    return 0


def _node_ip(lab: KubeLab, pod: str) -> str:
    node = lab.probes.pods[pod].node
    return next(str(n.addr) for n in lab.cluster.nodes.values() if n.name == node)


def command(lab: KubeLab, cmd: str, req: dict[str, Any], say: Say) -> int:
    if cmd == "show":
        return show(lab, say)
    if cmd == "add-node":
        t0 = time.monotonic()
        n = add_node(lab.cluster, say)
        took = lab.flannel.wait_ready(since=t0)
        say(f"  {n.name} joined: Ready and routed everywhere ({took:.1f} s)")
        return 0
    if cmd == "pods":
        took = lab.probes.start()
        say(f"  a probe pod on every node in {took:.1f} s")
        out = lab.cluster.outside or lab.cluster.add_outside_host()
        ips = {p.name: p.ip for p in lab.probes.pods.values()}
        for p in lab.probes.pods.values():
            say(f"  {p.name} on {p.node}: {p.ip}")
        say(f"  outside host (not in the cluster): {out.addr}")
        rc = 0
        for (a, b), seen in sorted(lab.probes.matrix(str(out.addr)).items()):
            ok = seen == ips[a] if b != "outside" else seen == _node_ip(lab, a)
            rc |= 0 if ok else 1
            say(f"  {a} -> {b}: seen as {seen}{'' if ok else '   <-- unexpected'}")
        return rc
    if cmd in ("remove-node", "reboot", "replace-flannel"):
        return _node_event(lab, cmd, str(req.get("node", "")), say)
    if cmd == "rolling-update":
        tcp = _tcp_watch(lab)
        t0 = time.monotonic()
        lab.life.rolling_update(str(req.get("tag", "v0.1.1")))
        alive = tcp.finish()
        say(f"  rolled out in {time.monotonic() - t0:.1f} s; established pod-to-pod TCP "
            f"connections still answering: {alive} of {tcp.n}")
        return 0 if alive == tcp.n else 1
    raise ValueError(f"command {cmd!r} is not available in a --kubernetes lab (show, "
                     "add-node, remove-node, reboot, replace-flannel, rolling-update, pods, "
                     "kubectl, exec, down)")


def _tcp_watch(lab: KubeLab) -> TcpWatch:
    if not lab.probes.pods:
        lab.probes.start()
    a, b = list(lab.probes.pods.values())[:2]
    tcp = TcpWatch(a.net, b.net, b.ip)
    tcp.start()
    return tcp


def _node_event(lab: KubeLab, cmd: str, name: str, say: Say) -> int:
    nodes = {n.name: n for n in lab.cluster.nodes.values()}
    if name not in nodes:
        raise ValueError(f"node must be one of {', '.join(sorted(nodes))}, not {name!r}")
    node = nodes[name]
    t0 = time.monotonic()
    if cmd == "remove-node":
        lab.life.drain_and_delete(node)
        wait_routes(lab.cluster)
        say(f"  {name} drained and deleted; its route is gone everywhere "
            f"({time.monotonic() - t0:.1f} s)")
        return 0
    if cmd == "reboot":
        lab.life.reboot(node)
        say(f"  {name} rebooted (processes, /run, routes, devices gone); containerd and "
            "kubelet started again")
        took = lab.flannel.wait_ready(since=t0)
        say(f"  routes and pods back {took:.1f} s after the reboot")
        return 0
    with RouteWatch(lab.cluster) as watch:
        old = lab.life.replace_flannel_pod(node)
        took = lab.flannel.wait_ready(since=t0)
    say(f"  {old} deleted; the DaemonSet's new pod is Ready after {took:.1f} s; "
        f"peer routes missing meanwhile: {watch.gaps or 'none'}")
    return 0 if not watch.gaps else 1
