"""The wireguard backend in kube mode (--kube-subnet-mgr on a real kube-apiserver): the
public key and port travel in the Node's backend-data annotation exactly as upstream writes
them, every node's wireguard-go peers follow the other Nodes, pods reach each other, and a
Node deleted is removed from the others' peers."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator

import pytest

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.kube import MISSING_BINARY, KubeLabStore, kube_apiserver_binary
from pyflannel_lab.wireguard import WG_PORT, userspace_wireguard_missing, wg_show

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (run the README's test command as root)"),
    pytest.mark.skipif(kube_apiserver_binary() is None, reason=MISSING_BINARY),
    pytest.mark.skipif(userspace_wireguard_missing() is not None,
                       reason=str(userspace_wireguard_missing())),
    pytest.mark.kernel,
]
P = "flannel.alpha.coreos.com/"
TIMEOUT = 90


def annotated_keys(cl: Cluster) -> dict[str, str]:
    """Node name -> the public key its backend-data annotation carries."""
    assert isinstance(cl.store, KubeLabStore)
    out = {}
    for n in cl.nodes.values():
        ann = cl.store.node(n.name)["metadata"].get("annotations", {})
        if ann.get(P + "backend-type") == "wireguard" and P + "backend-data" in ann:
            out[n.name] = json.loads(ann[P + "backend-data"])["PublicKey"]
    return out


def peers_follow_nodes(cl: Cluster) -> bool:
    try:
        keys = annotated_keys(cl)
    except (RuntimeError, KeyError, ValueError):
        return False
    for node in cl.nodes.values():
        dev = wg_show(cl, node)
        want: set[tuple[str | None, str, tuple[str, ...]]] = {
            (keys.get(o.name), f"{o.addr}:{WG_PORT}", (str(cl.subnet_of(o)),))
            for o in cl.nodes.values() if o is not node}
        if dev is None or dev.public_key != keys.get(node.name) or {
                (p.public_key, p.endpoint, p.allowed_ips) for p in dev.peers.values()} != want:
            return False
    return True


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    netconf = {"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}
    with Cluster(nodes=3, name="pfwk", store=KubeLabStore(), netconf=netconf,
                 flanneld_args=["--ip-masq"], wireguard_impl="userspace") as cl:
        cl.wait_until(lambda: peers_follow_nodes(cl), timeout=TIMEOUT, interval=0.3,
                      what="wireguard peers from the Nodes' annotations")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl


def test_annotations_and_pods(cluster: Cluster) -> None:
    assert isinstance(cluster.store, KubeLabStore)
    for n in cluster.nodes.values():
        ann = cluster.store.node(n.name)["metadata"]["annotations"]
        data = ann[P + "backend-data"]
        key = json.loads(data)["PublicKey"]
        assert data == f'{{"PublicKey":"{key}","Port":{WG_PORT}}}'  # upstream's bytes
        assert ann[P + "public-ip"] == str(n.addr)
        assert "Traceback" not in n.log()
    matrix = cluster.reachability()
    assert len(matrix) == 6
    for (src, dst), seen in matrix.items():
        assert seen == str(cluster.pods[src].ip), (src, dst, seen)


def test_a_deleted_node_leaves_the_peers(cluster: Cluster) -> None:
    gone: LabNode = cluster.nodes[3]
    key = annotated_keys(cluster)[gone.name]
    cluster.remove_node(gone)
    cluster.wait_until(lambda: all(
        (dev := wg_show(cluster, n)) is not None and key not in dev.peers
        for n in cluster.nodes.values()), timeout=30, what="the deleted Node's peer removed")
    assert peers_follow_nodes(cluster)
