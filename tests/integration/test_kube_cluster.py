"""flanneld --kube-subnet-mgr on a real kube-apiserver (v1.20.2) and etcd: three node
namespaces, Node objects created as a kubelet registers them, a daemon per node with the
`flannel` ServiceAccount's token under upstream's ClusterRole."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.kube import MISSING_BINARY, KubeLabStore, kube_apiserver_binary, kubelet_node

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (run the README's test command as root)"),
    pytest.mark.skipif(kube_apiserver_binary() is None, reason=MISSING_BINARY),
    pytest.mark.kernel,
]

P = "flannel.alpha.coreos.com/"
TIMEOUT = 90  # two shared cores, an API server and three daemons starting


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3, name="pfk", store=KubeLabStore()) as cl:
        yield cl


def store(cl: Cluster) -> KubeLabStore:
    assert isinstance(cl.store, KubeLabStore)
    return cl.store


def no_tracebacks(cl: Cluster) -> None:
    for n in cl.nodes.values():
        assert "Traceback" not in n.log(), n.log()[-3000:]


def condition(node: dict[str, Any], typ: str) -> dict[str, Any]:
    return next(c for c in node["status"]["conditions"] if c["type"] == typ)


def flannel_annotations(node: dict[str, Any]) -> dict[str, str]:
    return {k[len(P):]: v for k, v in node["metadata"].get("annotations", {}).items()
            if k.startswith(P)}


def route_gone_everywhere(cl: Cluster, subnet: str) -> bool:
    return all(subnet not in {d for d, _ in cl.flannel_routes(n)} for n in cl.nodes.values())


def test_three_nodes_routes_annotations_condition_add_delete_restart(cluster: Cluster) -> None:
    cl, ks = cluster, store(cluster)
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes on every node")
    for n in cl.nodes.values():
        obj = ks.node(n.name)
        # The lease is the podCIDR the controller (our allocator) gave the node.
        assert str(cl.subnet_of(n)) == obj["spec"]["podCIDR"]
        assert flannel_annotations(obj) == {
            "kube-subnet-manager": "true", "backend-type": "host-gw", "backend-data": "null",
            "public-ip": str(n.addr)}
        def network_available(name: str = n.name) -> bool:
            return bool(condition(ks.node(name), "NetworkUnavailable")["status"] == "False")

        cl.wait_until(network_available, timeout=TIMEOUT, what="NetworkUnavailable=False")
        cond = condition(ks.node(n.name), "NetworkUnavailable")
        assert cond["reason"] == "FlannelIsUp"
        assert condition(ks.node(n.name), "Ready")["status"] == "True"  # kept by the merge
    assert len(cl.flannel_routes(cl.nodes[1])) == 2

    # A daemon restart finds its annotations and condition in place: no write at all.
    n1 = cl.nodes[1]
    version = ks.node(n1.name)["metadata"]["resourceVersion"]
    cl.stop_daemon(n1)
    cl.start_daemon(n1)
    cl.wait_until(lambda: n1.log().count("Node list:") == 2, timeout=TIMEOUT,
                  what="the restarted daemon's node list")
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes after the restart")
    assert ks.node(n1.name)["metadata"]["resourceVersion"] == version

    # A node joins; every node routes to it.
    n4 = cl.add_node()
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes after node4 joined")
    assert len(cl.flannel_routes(cl.nodes[1])) == 3

    # A Node object deleted: its route goes on every peer.
    gone = str(cl.subnet_of(n4))
    cl.remove_node(n4)
    cl.wait_until(lambda: route_gone_everywhere(cl, gone), timeout=TIMEOUT,
                  what="route of the deleted node removed")

    # The API server restarts mid-run; changes made right after are not lost.
    ks.stop()
    assert all(n.proc is not None and n.proc.poll() is None for n in cl.nodes.values())
    ks.resume()
    n5 = cl.add_node()
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes after the API server restart")
    gone = str(cl.subnet_of(n5))
    cl.remove_node(n5)
    cl.wait_until(lambda: route_gone_everywhere(cl, gone), timeout=TIMEOUT,
                  what="deletion seen after the restart")
    assert all(n.proc is not None and n.proc.poll() is None for n in cl.nodes.values())
    no_tracebacks(cl)


def test_public_ip_and_podcidr_changes_and_deletion_while_down(cluster: Cluster) -> None:
    cl, ks = cluster, store(cluster)
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes on every node")
    n1, n2, n3 = (cl.nodes[i] for i in (1, 2, 3))

    # public-ip-overwrite (a node behind NAT): node3 publishes the new address and
    # every peer reprograms its route through it (upstream reads it only at start).
    new_ip = n3.addr + 100
    n3.ns.ip("addr", "add", f"{new_ip}/{cl.segment.prefixlen}", "dev", "eth0")
    ks.admin.patch(f"/api/v1/nodes/{n3.name}",
                   {"metadata": {"annotations": {P + "public-ip-overwrite": str(new_ip)}}})
    sub3 = str(cl.subnet_of(n3))
    cl.wait_until(lambda: all((sub3, str(new_ip)) in cl.flannel_routes(n) for n in (n1, n2)),
                  timeout=TIMEOUT, what="routes via node3's new public IP")
    assert flannel_annotations(ks.node(n3.name))["public-ip"] == str(new_ip)

    # node3 re-registers with another podCIDR: its daemon exits to take it, and
    # after a restart every peer routes the new podCIDR and none the old one.
    ks.admin.delete(f"/api/v1/nodes/{n3.name}")
    new_cidr = IPv4Network("10.244.200.0/24")
    ks.admin.create(kubelet_node(n3.name, str(n3.addr), str(new_cidr)))
    cl.wait_until(lambda: n3.proc is not None and n3.proc.poll() is not None,
                  timeout=TIMEOUT, what="node3's daemon noticing its new podCIDR")
    assert n3.proc is not None and n3.proc.returncode == 1
    assert "podCIDR changed" in n3.log()
    cl.start_daemon(n3)
    cl.wait_until(lambda: cl.subnet_of(n3) == new_cidr and cl.converged(),
                  timeout=TIMEOUT, what="routes to node3's new podCIDR")
    assert route_gone_everywhere(cl, sub3)

    # node2 deleted while node1's daemon is down: node1 removes the route at start.
    cl.stop_daemon(n1, sig=signal.SIGTERM)
    sub2 = str(cl.subnet_of(n2))
    assert (sub2, str(n2.addr)) in cl.flannel_routes(n1)  # shutdown removes nothing
    cl.remove_node(n2)
    cl.start_daemon(n1)
    cl.wait_until(lambda: route_gone_everywhere(cl, sub2) and cl.converged(),
                  timeout=TIMEOUT, what="stale route removed at start")
    no_tracebacks(cl)


class PodNamedStore(KubeLabStore):
    """Nodes identify themselves as a DaemonSet pod does: POD_NAME/POD_NAMESPACE."""

    def node_added(self, node: LabNode) -> None:
        super().node_added(node)
        self.admin.create({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"kube-flannel-ds-{node.name}", "namespace": "kube-flannel"},
            "spec": {"nodeName": node.name, "serviceAccountName": "flannel",
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "kube-flannel", "image": "pyflannel"}]}})

    def node_env(self, node: LabNode) -> dict[str, str]:
        return {"POD_NAME": f"kube-flannel-ds-{node.name}", "POD_NAMESPACE": "kube-flannel"}


def test_node_name_from_pod_and_missing_podcidr() -> None:
    with Cluster(nodes=2, name="pfp", store=PodNamedStore()) as cl:
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes on both nodes")
        # A node without a podCIDR: one clear line saying how to get one, exit 1.
        ks = store(cl)
        ks.assign_pod_cidrs = False
        n3 = cl.add_node(start=False)
        cl.start_daemon(n3)
        cl.wait_until(lambda: n3.proc is not None and n3.proc.poll() is not None,
                      timeout=TIMEOUT, what="daemon without podCIDR exiting")
        log = n3.log()
        assert n3.proc is not None and n3.proc.returncode == 1
        assert f'node "{n3.name}" pod cidr not assigned' in log.replace("'", '"')
        assert "--allocate-node-cidrs" in log and "kubectl patch node" in log
        assert "Traceback" not in log


def test_vxlan_in_kube_mode_mac_in_annotation_and_kept_across_restart() -> None:
    netconf = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
    with Cluster(nodes=2, name="pfk", netconf=netconf, store=KubeLabStore(),
                 flanneld_args=["--ip-masq"]) as cl:
        ks = store(cl)
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="vxlan routes on every node")
        n1, n2 = cl.nodes[1], cl.nodes[2]
        data = flannel_annotations(ks.node(n1.name))["backend-data"]
        mac = n1.ns.ip("link", "show", "flannel.1").stdout.split("link/ether ")[1].split()[0]
        assert data == f'{{"VNI":1,"VtepMAC":"{mac}"}}'
        # the peer programmed our VTEP: neighbour + FDB entry with our MAC
        assert mac in n2.ns.run("ip", "neigh", "show", "dev", "flannel.1").stdout
        assert str(n1.addr) in n2.ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout
        # the device goes away with a restart; the MAC comes back from the annotation
        cl.stop_daemon(n1)
        n1.ns.ip("link", "del", "flannel.1")
        cl.start_daemon(n1)
        cl.wait_until(lambda: "flannel.1" in n1.ns.ip("link", "show", check=False).stdout
                      and cl.converged(), timeout=TIMEOUT, what="the device recreated")
        assert f"link/ether {mac}" in n1.ns.ip("link", "show", "flannel.1").stdout
        p1, p2 = cl.add_pod(n1), cl.add_pod(n2)
        assert cl.whoami(p1.ns, p2.ip) == str(p1.ip)
        no_tracebacks(cl)


def test_a_younger_node_with_an_overlapping_podcidr_never_takes_a_route(
        cluster: Cluster) -> None:
    """Issue #9 in kube mode: a Node created later claiming node2's podCIDR (or a wider one
    containing it) with flannel's annotations and another public IP is refused on every
    node; deleting it changes nothing."""
    cl, ks = cluster, store(cluster)
    cl.wait_until(cl.converged, timeout=TIMEOUT, what="routes on every node")
    before = {n.index: cl.flannel_routes(n) for n in cl.nodes.values()}
    victim = str(cl.subnet_of(cl.nodes[2]))
    for name, cidr in (("rogue-same", victim), ("rogue-wide", "10.244.0.0/20")):
        rogue = kubelet_node(name, "192.168.77.66", cidr)
        rogue["metadata"]["annotations"] = {
            f"{P}kube-subnet-manager": "true", f"{P}backend-type": "host-gw",
            f"{P}backend-data": "null", f"{P}public-ip": "192.168.77.66"}
        ks.admin.create(rogue)
        cl.wait_until(lambda nm=name: all(f"Refusing lease {nm}" in n.log()
                                          for n in cl.nodes.values()),
                      timeout=TIMEOUT, what=f"{name} to be refused everywhere")
        assert {n.index: cl.flannel_routes(n) for n in cl.nodes.values()} == before
        ks.admin.delete(f"/api/v1/nodes/{name}")
    time.sleep(1.0)  # the deletions reach every daemon within milliseconds
    assert {n.index: cl.flannel_routes(n) for n in cl.nodes.values()} == before
    no_tracebacks(cl)
