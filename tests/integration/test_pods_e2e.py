"""Pods talk: the flannel CNI plugin, host-gw routes and masquerade rules end to end.

Three nodes and an outside host on one segment; pods are created by invoking the CNI
plugins exactly as a container runtime does with upstream's conflist.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from pyflannel_lab.cluster import Cluster

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs etcd and containernetworking-plugins (scripts/setup.sh)"),
    pytest.mark.etcd,
]

HOST_GW = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
HOST_GW_NFT = {**HOST_GW, "EnableNFTables": True}


@pytest.fixture(params=[HOST_GW, HOST_GW_NFT], ids=["iptables", "nftables"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    netconf: dict[str, Any] = request.param
    with Cluster(nodes=3, name="pfe", netconf=netconf,
                 flanneld_args=["--ip-masq", "--iptables-resync=1"]) as cl:
        cl.wait_until(cl.converged, timeout=60, what="initial convergence")
        cl.add_outside_host()
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        cl.add_pod(cl.nodes[1], "pod1b")  # two pods on one node: the bridge path too
        yield cl


def test_every_pod_reaches_every_pod_with_its_own_ip_and_the_outside_masqueraded(
        cluster: Cluster) -> None:
    matrix = cluster.reachability()
    for (src, dst), seen in matrix.items():
        pod = cluster.pods[src]
        if dst == "outside":
            # leaving the cluster: masqueraded to the node's address
            assert seen == str(pod.node.addr), (src, dst, seen)
        else:
            # inside the cluster: no NAT, the receiver sees the sender's pod IP
            assert seen == str(pod.ip), (src, dst, seen)
    assert len(matrix) == 4 * 3 + 4


def test_pods_get_addresses_from_their_node_subnet_and_are_freed_on_del(
        cluster: Cluster) -> None:
    for pod in cluster.pods.values():
        subnet = cluster.subnet_of(pod.node)
        assert subnet is not None and pod.ip in subnet
        assert pod.ns.ip("link", "show", "eth0").stdout.count("mtu 1500") == 1
    pod = cluster.pods["pod2"]
    ipam_dir = pod.node.workdir / "cni-ipam" / "cbr0"
    assert (ipam_dir / str(pod.ip)).exists()
    cluster.delete_pod(pod)
    assert not (ipam_dir / str(pod.ip)).exists()
    # a DEL for a pod that is already gone succeeds (idempotent)
    cluster.cni_runtime(pod.node).delete(pod.attachment, pod.result)


def test_masquerade_rule_removed_by_hand_comes_back(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    pod = cluster.pods["pod1"]
    nft = cluster.netconf.get("EnableNFTables", False)
    if nft:
        node.ns.run("nft", "delete", "table", "ip", "flannel-ipv4")
    else:
        node.ns.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")

    def masqueraded() -> bool:
        return cluster.whoami(pod.ns, cluster.outside.addr, 1) == str(node.addr)  # type: ignore[union-attr]

    cluster.wait_until(masqueraded, timeout=15, interval=0.2,
                       what="the masquerade rules to be restored")
    # repaired by the daemon's resync, which says so
    log = node.log()
    assert "rules are missing" in log or log.count("Creating nftables table") >= 2, log[-2000:]
