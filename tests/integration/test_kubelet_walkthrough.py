"""Flannel's walk-through on a real cluster on this machine: kube-apiserver,
kube-controller-manager (--allocate-node-cidrs), kube-scheduler, and two nodes each with
its own containerd and kubelet; `kubectl create -f deploy/kube-flannel.yml` (after the
walk-through's sed for host-gw; as shipped for vxlan), pods on every node, and the
machine left exactly as it was (kubelet must not change kernel.panic and friends).

Needs root and the binaries of scripts/build-kubernetes.sh (and what scripts/image.sh needs
for the verified image, built once per source state); about 90 s per backend on two cores.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from kubelab_marks import KUBELET_LAB, other_kube_labs

from pyflannel_lab.nodehost import CGROUP_ROOT, KUBELET_SYSCTLS, PRIVATE_DIRS, PRIVATE_FILES

pytestmark = KUBELET_LAB

# The kubelet settings the machine must keep (pitfall 4 of the fact sheet).
GLOBAL_SYSCTLS = [Path("/proc/sys") / k for k in KUBELET_SYSCTLS]


def host_sysctls() -> dict[str, str]:
    return {str(p): p.read_text().strip() for p in GLOBAL_SYSCTLS}


def host_footprint(name: str) -> dict[str, object]:
    """What of a lab named `name` could be left on the machine."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {
        "netns": [ln.split()[0] for ln in netns.splitlines() if ln.startswith(f"{name}-")],
        "cgroups": sorted(str(p) for p in CGROUP_ROOT.glob(f"*/{name}-*")),
        "paths": sorted(p for p in PRIVATE_DIRS + PRIVATE_FILES if Path(p).exists()),
    }


@pytest.fixture(scope="module", params=["host-gw", "vxlan"])
def lab(request: pytest.FixtureRequest) -> Iterator[object]:
    from pyflannel_lab import kubeviews, session

    backend = str(request.param)
    before_sysctls = host_sysctls()
    before_paths = host_footprint("-")["paths"]
    label = f"test-{secrets.token_hex(3)}"
    name = f"pft{secrets.token_hex(2)}"
    lines: list[str] = []
    kl = kubeviews.build(name, {"nodes": 2, "backend": backend, "deploy": True},
                         session.kube_state_path(label), lines.append)
    kl.before = (before_sysctls, before_paths, name, label)  # type: ignore[attr-defined]
    kl.lines = lines  # type: ignore[attr-defined]
    try:
        yield kl
    finally:
        kl.close()
        with __import__("contextlib").suppress(OSError):
            session.kube_state_path(label).parent.rmdir()


def test_nodes_registered_with_podcidrs_from_the_controller_manager(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    nodes = lab.kubectl.json("get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
    cidrs = [IPv4Network(n["spec"]["podCIDR"]) for n in nodes]
    assert len(set(cidrs)) == 2
    assert all(c.prefixlen == 24 and c.subnet_of(IPv4Network("10.244.0.0/16")) for c in cidrs)
    runtime = {n["status"]["nodeInfo"]["containerRuntimeVersion"] for n in nodes}
    assert runtime == {"containerd://1.6.20"}


def test_one_ready_flannel_pod_per_node_and_one_route_per_peer(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    pods = lab.flannel.pods()
    assert set(pods) == {"node1", "node2"}
    for p in pods.values():
        assert p["status"]["phase"] == "Running"
        assert all(c["ready"] for c in p["status"]["containerStatuses"])
    nodes = list(lab.cluster.nodes.values())
    podcidr = {n["metadata"]["name"]: n["spec"]["podCIDR"]
               for n in lab.kubectl.json("get", "nodes")["items"]}
    for n in nodes:
        # The lease flannel wrote is the node's podCIDR.
        assert str(lab.cluster.subnet_of(n)) == podcidr[n.name]
        peers = {(podcidr[o.name], str(o.addr)) for o in nodes if o is not n}
        if lab.backend == "host-gw":
            assert lab.cluster.flannel_routes(n) == peers
        else:
            assert lab.cluster.routed_subnets(n) == {c for c, _ in peers}
    # The init containers installed the plugin and its conflist: that made the node Ready.
    ls = lab.store.nodes["node1"].host.run("ls", "/opt/cni/bin", "/etc/cni/net.d").stdout
    assert "flannel" in ls.split() and "10-flannel.conflist" in ls.split()


def test_kubectl_logs_show_upstreams_lines(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab
    from pyflannel_lab.walkthrough import missing_log_lines

    assert isinstance(lab, KubeLab)
    for node, p in lab.flannel.pods().items():
        log = lab.flannel.logs(p["metadata"]["name"])
        assert missing_log_lines(log, node, lab.backend) == [], log
        other = next(o for o in lab.cluster.nodes.values() if o.name != node)
        assert f"via {other.addr}" in log or lab.backend == "vxlan"


def test_pods_reach_each_other_and_outside_is_masqueraded(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    lab.probes.start()
    outside = lab.cluster.outside or lab.cluster.add_outside_host()
    podcidr = {n["metadata"]["name"]: IPv4Network(n["spec"]["podCIDR"])
               for n in lab.kubectl.json("get", "nodes")["items"]}
    pods = lab.probes.pods
    assert {p.node for p in pods.values()} == {"node1", "node2"}
    for p in pods.values():
        assert IPv4Network(p.ip).subnet_of(podcidr[p.node])
    node_ip = {n.name: str(n.addr) for n in lab.cluster.nodes.values()}
    seen = lab.probes.matrix(str(outside.addr))
    for (a, b), src in seen.items():
        want = node_ip[pods[a].node] if b == "outside" else pods[a].ip
        assert src == want, (a, b, seen)


def test_machine_unchanged_and_down_leaves_nothing(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    before_sysctls, before_paths, name, label = lab.before  # type: ignore[attr-defined]
    assert host_sysctls() == before_sysctls  # kubelet ran for minutes and changed nothing
    lab.close()
    assert host_sysctls() == before_sysctls
    left = host_footprint(name)
    assert left["netns"] == [] and left["cgroups"] == []
    if not other_kube_labs(label):  # no mountpoint of ours stays behind
        assert set(left["paths"]) <= set(before_paths)  # type: ignore[arg-type]
    assert not lab.cluster.workdir.exists()
