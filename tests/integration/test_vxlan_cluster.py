"""The real flanneld with the vxlan backend on a lab cluster: nodes on two L2 segments
joined by a router namespace, etcd as the store, pods through the real CNI plugins.

Also the reason vxlan exists: host-gw cannot cross that router, and says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.wireguard import capture_segment, wire_report

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or not os.path.exists("/usr/lib/cni/bridge"),
                       reason="needs etcd and containernetworking-plugins (scripts/setup.sh)"),
    pytest.mark.etcd,
]

SEGMENTS = ["192.168.80.0/24", "192.168.81.0/24"]
VXLAN = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
TIMEOUT = 60


def vtep_macs(cl: Cluster) -> dict[str, str]:
    """Public IP -> VtepMAC, from the leases in etcd."""
    return {a["PublicIP"]: a["BackendData"]["VtepMAC"] for a in cl.leases().values()}


def kernel_view(node: LabNode, dev: str = "flannel.1") -> tuple[str, str, str]:
    ns = node.ns
    return (ns.ip("neigh", "show", "dev", dev, "nud", "permanent", check=False).stdout,
            ns.run("bridge", "fdb", "show", "dev", dev, check=False).stdout,
            ns.ip("route", "show", "dev", dev, check=False).stdout)


def tunnelled(cl: Cluster, node: LabNode, peer: LabNode, macs: dict[str, str]) -> bool:
    """node reaches peer through flannel.1: neighbour, FDB entry and onlink route."""
    subnet, mac = cl.subnet_of(peer), macs.get(str(peer.addr))
    if subnet is None or mac is None:
        return False
    gw = subnet.network_address
    neigh, fdb, routes = kernel_view(node)
    return (f"{gw} lladdr {mac} PERMANENT" in neigh
            and f"{mac} dst {peer.addr} self permanent" in fdb
            and any(line.startswith(f"{subnet} ") and f"via {gw} " in line and "onlink" in line
                    for line in routes.splitlines()))


def direct(cl: Cluster, node: LabNode, peer: LabNode) -> bool:
    return (str(cl.subnet_of(peer)), str(peer.addr)) in cl.flannel_routes(node)


def all_tunnelled(cl: Cluster) -> bool:
    try:
        macs = vtep_macs(cl)
    except (RuntimeError, KeyError, ValueError):
        return False
    return all(tunnelled(cl, a, b, macs) for a in cl.nodes.values() for b in cl.nodes.values()
               if a is not b)


def assert_pods_reach_each_other(cl: Cluster) -> None:
    matrix = cl.reachability()
    assert len(matrix) == len(cl.pods) * (len(cl.pods) - 1)
    for (src, dst), seen in matrix.items():
        # no NAT inside the cluster: the receiver sees the sender's pod IP
        assert seen == str(cl.pods[src].ip), (src, dst, seen)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(segments=SEGMENTS, nodes=[0, 0, 1], netconf=VXLAN, name="pfvc",
                 flanneld_args=["--ip-masq"]) as cl:
        cl.wait_until(lambda: all_tunnelled(cl), timeout=TIMEOUT, what="vxlan convergence")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl


def test_pods_reach_each_other_across_the_router(cluster: Cluster) -> None:
    n1, n2, n3 = (cluster.nodes[i] for i in (1, 2, 3))
    assert n1.segment == n2.segment != n3.segment
    assert_pods_reach_each_other(cluster)
    for node in cluster.nodes.values():
        # upstream's lease JSON and FLANNEL_MTU (1500 − 50)
        assert "FLANNEL_MTU=1450\n" in node.subnet_file.read_text()
        d = json.loads(node.ns.ip("-d", "-j", "link", "show", "flannel.1").stdout)[0]
        info = d["linkinfo"]["info_data"]
        assert (info["id"], info["local"], info["port"], info["learning"], d["mtu"]) == (
            1, str(node.addr), 8472, False, 1450)
        # one neighbour, one FDB entry and one route per peer, nothing else
        neigh, fdb, routes = kernel_view(node)
        assert len(neigh.splitlines()) == len(fdb.splitlines()) == 2
        assert len([r for r in routes.splitlines() if "onlink" in r]) == 2
    for attrs in cluster.leases().values():
        assert list(attrs) == ["PublicIP", "PublicIPv6", "BackendType", "BackendData"]
        assert attrs["BackendType"] == "vxlan" and list(attrs["BackendData"]) == [
            "VNI", "VtepMAC"]


def test_the_wire_shows_vxlan_in_clear(cluster: Cluster) -> None:
    """The lab's wire check (pyflannel_lab.capture), which proves wireguard encrypts, on
    vxlan: the outer packets are UDP 8472 between the nodes, and the pods' own IP headers
    are readable inside every one of them."""
    p1, p3 = cluster.pods["pod1"], cluster.pods["pod3"]
    with capture_segment(cluster, 1, "segment1") as cap:
        assert cluster.whoami(p1.ns, p3.ip) == str(p1.ip)
    rep = wire_report(cluster, cap, 8472)
    assert rep.tunnel > 0 and rep.tunnel == rep.node_to_node
    assert len(rep.violations) == rep.tunnel
    assert all("inside, in clear" in v for v in rep.violations)


def test_drift_is_repaired_by_the_event_path(cluster: Cluster) -> None:
    node, peer = cluster.nodes[1], cluster.nodes[3]
    subnet = cluster.subnet_of(peer)
    macs = vtep_macs(cluster)
    assert subnet is not None
    for what, cmd in (
            ("neighbour", ("ip", "neigh", "del", str(subnet.network_address), "dev",
                           "flannel.1")),
            ("fdb entry", ("bridge", "fdb", "del", macs[str(peer.addr)], "dev", "flannel.1",
                           "dst", str(peer.addr), "self")),
            ("route", ("ip", "route", "del", str(subnet)))):
        before = node.log().count("Drift:")
        node.ns.run(*cmd)
        # (not "assert it is gone" first: the repair can beat the next `ip` command)
        took = cluster.wait_until(lambda b=before: tunnelled(cluster, node, peer, macs)
                                  and node.log().count("Drift:") > b, timeout=5,
                                  interval=0.01, what=f"the deleted {what} restored")
        print(f"{what} restored after {took * 1000:.0f} ms")
    log = node.log()
    for what in ("neighbour", "FDB entry", "route to"):
        assert f"Drift: {what} " in log and "was deleted by someone else; repairing" in log


def test_deleted_device_is_recreated_and_every_peer_replayed(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    before = json.loads(node.ns.ip("-j", "link", "show", "flannel.1").stdout)[0]
    node.ns.ip("link", "del", "flannel.1")
    took = cluster.wait_until(lambda: all_tunnelled(cluster), timeout=15, interval=0.02,
                              what="flannel.1 recreated and its peers replayed")
    print(f"device recreated and peers replayed after {took * 1000:.0f} ms")
    after = json.loads(node.ns.ip("-j", "link", "show", "flannel.1").stdout)[0]
    assert after["ifindex"] != before["ifindex"] and after["address"] == before["address"]
    assert "Device flannel.1 was deleted; recreating it and replaying every peer" in node.log()
    assert_pods_reach_each_other(cluster)


def test_restart_keeps_the_vtep_mac_even_when_the_device_is_gone(cluster: Cluster) -> None:
    node = cluster.nodes[3]
    mac = vtep_macs(cluster)[str(node.addr)]
    assert cluster.stop_daemon(node) == 0
    node.ns.ip("link", "del", "flannel.1")  # e.g. a reboot
    cluster.start_daemon(node)
    cluster.wait_until(lambda: all_tunnelled(cluster), timeout=TIMEOUT, what="reconverged")
    assert json.loads(node.ns.ip("-j", "link", "show", "flannel.1").stdout)[0]["address"] == mac
    assert vtep_macs(cluster)[str(node.addr)] == mac  # peers' entries stayed valid
    assert_pods_reach_each_other(cluster)


def test_incompatible_device_and_stale_entries_are_fixed_at_start(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    assert cluster.stop_daemon(node) == 0
    node.ns.ip("link", "del", "flannel.1")
    node.ns.ip("link", "add", "flannel.1", "type", "vxlan", "id", "9", "dev", "eth0",
               "dstport", "4789")
    node.ns.ip("link", "set", "flannel.1", "up")
    cluster.start_daemon(node)
    cluster.wait_until(lambda: all_tunnelled(cluster), timeout=TIMEOUT, what="reconverged")
    info = json.loads(node.ns.ip("-d", "-j", "link", "show", "flannel.1").stdout)[0]
    assert info["linkinfo"]["info_data"]["id"] == 1
    assert "already exists with incompatible configuration: vni 9 != 1" in node.log()
    # stale entries of a departed peer, on the live device, before a restart
    assert cluster.stop_daemon(node) == 0
    ns = node.ns
    ns.ip("neigh", "add", "10.244.250.0", "lladdr", "0e:00:00:00:fa:00", "dev", "flannel.1",
          "nud", "permanent")
    ns.run("bridge", "fdb", "add", "0e:00:00:00:fa:00", "dev", "flannel.1", "dst",
           "192.168.81.99", "self", "permanent")
    ns.ip("route", "add", "10.244.250.0/24", "via", "10.244.250.0", "dev", "flannel.1", "onlink")
    cluster.start_daemon(node)
    cluster.wait_until(lambda: "10.244.250.0" not in "".join(kernel_view(node))
                       and "0e:00:00:00:fa:00" not in kernel_view(node)[1],
                       timeout=TIMEOUT, what="the departed peer's entries removed")
    cluster.wait_until(lambda: all_tunnelled(cluster), timeout=TIMEOUT, what="reconverged")


def test_direct_routing_on_our_segment_and_vxlan_across_the_router() -> None:
    netconf = {"Network": "10.244.0.0/16",
               "Backend": {"Type": "vxlan", "DirectRouting": True}}
    with Cluster(segments=SEGMENTS, nodes=[0, 0, 1], netconf=netconf, name="pfvd",
                 flanneld_args=["--ip-masq"]) as cl:
        n1, n2, n3 = (cl.nodes[i] for i in (1, 2, 3))

        def converged() -> bool:
            try:
                macs = vtep_macs(cl)
            except (RuntimeError, KeyError, ValueError):
                return False
            return (direct(cl, n1, n2) and direct(cl, n2, n1)
                    and all(tunnelled(cl, a, b, macs) for a, b in
                            ((n1, n3), (n2, n3), (n3, n1), (n3, n2))))

        cl.wait_until(converged, timeout=TIMEOUT, what="direct + vxlan routes")
        # the same-segment peer has no vxlan entries at all
        assert str(cl.subnet_of(n2)) not in kernel_view(n1)[2]
        assert str(n2.addr) not in kernel_view(n1)[1]
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        assert_pods_reach_each_other(cl)


def scrape(node: LabNode, port: int) -> str:
    code = (f"import urllib.request;print(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}/metrics',timeout=5).read().decode())")
    return str(node.ns.run(sys.executable, "-c", code).stdout)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def test_host_gw_reports_peers_across_the_router_and_keeps_the_others() -> None:
    netconf: dict[str, Any] = {"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}}
    port = random.randint(20000, 60000)  # inside fresh namespaces: nothing else listens
    with Cluster(segments=SEGMENTS, nodes=[0, 0, 1], netconf=netconf, name="pfvh",
                 flanneld_args=["--ip-masq", f"--healthz-port={port}",
                                "--healthz-ip=127.0.0.1"]) as cl:
        n1, n2, n3 = (cl.nodes[i] for i in (1, 2, 3))
        cl.wait_until(lambda: direct(cl, n1, n2) and direct(cl, n2, n1)
                      and all("not reachable on this node's L2 segment" in n.log()
                              for n in (n1, n2, n3)),
                      timeout=TIMEOUT, what="routes on the segment, peers across it reported")
        for node in (n1, n2):
            assert str(cl.subnet_of(n3)) not in node.routes()
            assert f"Error adding route to {cl.subnet_of(n3)}: peer {n3.addr} is not " \
                   "reachable on this node's L2 segment" in node.log()
        cl.wait_until(lambda: metric(scrape(n1, port), "flannel_unreachable_peers") == 1,
                      timeout=15, what="the metric")
        assert metric(scrape(n3, port), "flannel_unreachable_peers") == 2
        p1, p2, p3 = (cl.add_pod(n, f"pod{n.index}") for n in (n1, n2, n3))
        assert cl.whoami(p1.ns, p2.ip) == str(p1.ip)  # the same segment still works
        assert cl.whoami(p1.ns, p3.ip).startswith("error")
        assert n1.proc is not None and n1.proc.poll() is None  # and nothing crashed
