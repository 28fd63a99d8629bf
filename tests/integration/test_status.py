"""`pyflannel status`: the lease table, drift named on a node, exit status, the SVG."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyflannel_lab.cluster import Cluster, LabNode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3, name="pfs", flanneld_args=["--ip-masq"]) as cl:
        cl.wait_until(cl.converged, timeout=60, what="initial convergence")
        yield cl


def status(cl: Cluster, node: LabNode, *args: str) -> subprocess.CompletedProcess[str]:
    return node.ns.run(sys.executable, "-m", "pyflannel.cli", "status",
                       f"--etcd-endpoints={cl.etcd_endpoint}",
                       f"--subnet-file={node.subnet_file}", "--ip-masq", *args, check=False)


def test_lease_table_and_a_node_in_order(cluster: Cluster, tmp_path: Path) -> None:
    node = cluster.nodes[1]
    svg = tmp_path / "cluster.svg"
    r = status(cluster, node, "--check", "--svg", str(svg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 leases in the etcd store" in r.stdout
    for n in cluster.nodes.values():
        line = next(x for x in r.stdout.splitlines() if x.startswith(str(n.addr)))
        assert str(cluster.subnet_of(n)) in line and "host-gw" in line and "23h" in line
    assert "match the leases" in r.stdout
    assert r.stderr == ""
    # the picture: well-formed SVG naming every node and its subnet, and it renders
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    for n in cluster.nodes.values():
        assert str(n.addr) in text and str(cluster.subnet_of(n)) in text
    if shutil.which("rsvg-convert"):
        png = tmp_path / "cluster.png"
        subprocess.run(["rsvg-convert", "-o", str(png), str(svg)], check=True)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_drift_is_named_and_fails_the_exit_status(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    cluster.stop_daemon(node)  # so that nothing repairs the drift while we look
    try:
        missing_subnet, gw = sorted(cluster.expected_routes(node))[0]
        node.ns.ip("route", "del", missing_subnet)
        node.ns.ip("route", "add", "10.244.251.0/24", "via", "192.168.77.77", "dev", "eth0")
        node.ns.run("iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        r = status(cluster, node, "--check")
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"missing route: {missing_subnet} via {gw} dev eth0" in r.stdout
        assert "extra route: 10.244.251.0/24 via 192.168.77.77 dev eth0" in r.stdout
        assert "iptables rules:" in r.stdout
    finally:
        cluster.start_daemon(node)
    cluster.wait_until(lambda: status(cluster, node, "--check").returncode == 0,
                       timeout=30, interval=0.5, what="the restarted daemon to repair it all")


def test_errors_are_one_line_with_exit_status_2(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    r = node.ns.run(sys.executable, "-m", "pyflannel.cli", "status",
                    "--etcd-endpoints=http://127.0.0.1:1", check=False)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "pyflannel status:" in r.stderr


def test_vxlan_neighbour_and_fdb_drift_is_named() -> None:
    netconf = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
    with Cluster(nodes=2, name="pfs", netconf=netconf, flanneld_args=["--ip-masq"]) as cl:
        cl.wait_until(lambda: all(cl.subnet_of(n) for n in cl.nodes.values()), what="leases")
        node, peer = cl.nodes[1], cl.nodes[2]
        cl.wait_until(lambda: status(cl, node, "--check").returncode == 0, timeout=20,
                      interval=0.3, what="node1 in order")
        cl.stop_daemon(node)
        node.ns.run("ip", "neigh", "flush", "dev", "flannel.1", "nud", "permanent")
        mac = node.ns.run("bridge", "fdb", "show", "dev", "flannel.1").stdout.split()[0]
        node.ns.run("bridge", "fdb", "del", mac, "dev", "flannel.1", "dst", str(peer.addr))
        r = status(cl, node, "--check")
        assert r.returncode == 1, r.stdout + r.stderr
        peer_subnet = cl.subnet_of(peer)
        assert peer_subnet is not None
        assert f"missing neighbour: {peer_subnet.network_address} lladdr {mac} dev flannel.1" \
            in r.stdout
        assert f"missing fdb entry: {mac} dst {peer.addr} dev flannel.1" in r.stdout
