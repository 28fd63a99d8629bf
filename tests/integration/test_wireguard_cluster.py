"""The real flanneld with the wireguard backend, userspace implementation (wireguard-go,
started and supervised by the daemon), on a lab cluster of three nodes on three L2 segments
joined by a router: no two nodes are L2 neighbours. etcd as the store, pods through the real
CNI plugins; each node's daemon has its own /run/wireguard and key file
(pyflannel_lab.daemons), and `wg` is run as the node sees it.

Proven here: pods reach each other across the router; the wire between the segments carries
only UDP to or from the listen port, with no pod address in any readable IP header; a key
rotation re-establishes traffic without touching the other peers; drift (a peer removed, the
device deleted) is repaired; a daemon restart keeps the tunnels; a node leaving is removed
from the others' peers.

"Never drops" is measured with pyflannel_lab.probe: one UDP datagram every 50 ms between two
pods, echoed back; a probe is lost when its echo has not come back 1 s after the last probe
was sent. A tunnel is kept when no two consecutive probes are lost (the longest run of lost
probes is at most 1, i.e. no gap longer than one probe interval): one datagram may be lost to
the machine's load, an interruption of the tunnel costs many.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Iterator
from ipaddress import IPv4Network

import pytest

from pyflannel_lab.cluster import Cluster, LabNode
from pyflannel_lab.daemons import WIREGUARD_RUN_DIR
from pyflannel_lab.netns import run
from pyflannel_lab.probe import UdpProbe
from pyflannel_lab.wireguard import (
    WG_DEV,
    WG_DEV6,
    WG_PORT,
    WG_PORT6,
    capture_segment,
    lease_public_keys,
    peers_converged,
    wg_show,
    wire_report,
)
from tests.integration.wireguard_marks import WIREGUARD_LAB

pytestmark = WIREGUARD_LAB

SEGMENTS = ["192.168.83.0/24", "192.168.84.0/24", "192.168.85.0/24"]
NETWORK = "10.244.0.0/16"
PSK = base64.b64encode(os.urandom(32)).decode()
KEEPALIVE = 25
WIREGUARD = {"Network": NETWORK, "Backend": {"Type": "wireguard", "PSK": PSK,
                                             "PersistentKeepaliveInterval": KEEPALIVE}}
TIMEOUT = 60
MAX_LOST_RUN = 1  # see the module's docstring


def wireguard_go_pids(node: LabNode) -> list[int]:
    """The wireguard-go processes inside the node's namespace."""
    out = []
    for pid in run(["ip", "netns", "pids", node.ns.name], check=False).stdout.split():
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()  # noqa: SIM115
        except OSError:
            continue
        if comm == "wireguard-go":
            out.append(int(pid))
    return out


def wg_route_ok(node: LabNode) -> bool:
    """The one route of the wireguard backend: the whole Network via flannel-wg, scope link."""
    routes = node.ns.ip("route", "show", "dev", WG_DEV, check=False).stdout
    return any(line.split()[0] == NETWORK and "scope link" in line
               for line in routes.splitlines() if line.strip())


def all_ready(cl: Cluster) -> bool:
    for n in cl.nodes.values():  # a daemon that exited will not converge: say so at once
        if n.proc is not None and n.proc.poll() is not None:
            raise AssertionError(f"{n.name}'s daemon exited ({n.proc.returncode}):\n"
                                 f"{n.log()[-3000:]}")
    return (all(cl.subnet_of(n) is not None and wg_route_ok(n) for n in cl.nodes.values())
            and peers_converged(cl))


# A pair's first packet starts a handshake; WireGuard resends a lost initiation only after
# 5 s (REKEY_TIMEOUT, plus up to 1/3 s of jitter), so a 3 s connection can time out under load.
CONNECT_TIMEOUT = 8.0


def assert_pods_reach_each_other(cl: Cluster) -> None:
    matrix = cl.reachability(timeout=CONNECT_TIMEOUT)
    assert len(matrix) == len(cl.pods) * (len(cl.pods) - 1)
    for (src, dst), seen in matrix.items():
        # no NAT inside the cluster: the receiver sees the sender's pod IP
        assert seen == str(cl.pods[src].ip), (src, dst, seen)


def peer_view(cl: Cluster, node: LabNode, peer: LabNode) -> tuple[str, ...]:
    """How `node`'s flannel-wg holds `peer` (key, psk, endpoint, allowed IPs, keepalive)."""
    dev = wg_show(cl, node)
    assert dev is not None, f"{node.name}: no {WG_DEV}"
    key = lease_public_keys(cl)[str(peer.addr)]
    assert key in dev.peers, f"{node.name} has no peer {peer.name} ({key})"
    return tuple(str(x) for x in dev.peers[key].identity)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(segments=SEGMENTS, nodes=[0, 1, 2], netconf=WIREGUARD, name="pfwg",
                 flanneld_args=["--ip-masq"], wireguard_impl="userspace") as cl:
        cl.wait_until(lambda: all_ready(cl), timeout=TIMEOUT, interval=0.2,
                      what="wireguard peers and routes on every node")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl


def test_pods_reach_each_other_across_the_router(cluster: Cluster) -> None:
    assert len({n.segment for n in cluster.nodes.values()}) == 3  # no L2 adjacency
    assert_pods_reach_each_other(cluster)
    keys = lease_public_keys(cluster)
    for node in cluster.nodes.values():
        subnet = cluster.subnet_of(node)
        assert subnet is not None
        # upstream's subnet.env MTU (1500 − 80) and lease JSON
        assert "FLANNEL_MTU=1420\n" in node.subnet_file.read_text()
        link = json.loads(node.ns.ip("-j", "addr", "show", "dev", WG_DEV).stdout)[0]
        assert link["mtu"] == 1420
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]
                if a["family"] == "inet"] == [(str(subnet.network_address), 32)]
        dev = wg_show(cluster, node)
        assert dev is not None and dev.listen_port == WG_PORT
        assert dev.public_key == keys[str(node.addr)]
        assert len(dev.peers) == 2
        assert {(p.preshared_key, p.keepalive) for p in dev.peers.values()} == {
            (PSK, str(KEEPALIVE))}
        # the userspace implementation, started by the daemon, its socket in the node's
        # own /run/wireguard (none on the machine's)
        assert len(wireguard_go_pids(node)) == 1
        assert (cluster.wireguard_dir(node) / f"{WG_DEV}.sock").exists()
        assert not (WIREGUARD_RUN_DIR / f"{WG_DEV}.sock").exists()
        log = node.log().lower()
        assert any("wireguard" in line and "userspace" in line for line in log.splitlines())
        # the private key, persisted 0400 where WIREGUARD_KEY_FILE says
        mode = cluster.wireguard_key_file(node).stat().st_mode
        assert stat.S_IMODE(mode) == 0o400
    for attrs in cluster.leases().values():
        assert attrs["BackendType"] == "wireguard"
        assert list(attrs["BackendData"]) == ["PublicKey", "Port"]
        assert attrs["BackendData"]["Port"] == WG_PORT


def test_status_shows_the_implementation_and_no_problem(cluster: Cluster) -> None:
    for node in cluster.nodes.values():
        status = cluster.node_run(node, *cluster.status_argv(node), check=False,
                                  env=cluster.daemon_env(node))
        out = status.stdout + status.stderr
        assert "wireguard" in out.lower() and "userspace" in out.lower(), out
        assert status.returncode == 0, out  # --check: the node as it should be


def test_the_wire_carries_only_the_tunnel(cluster: Cluster) -> None:
    """Everything node2 (segment 1) sends or receives crosses the router's leg r1."""
    p1, p2, p3 = (cluster.pods[f"pod{i}"] for i in (1, 2, 3))
    with capture_segment(cluster, 1, "segment1") as cap, \
            UdpProbe(p1.ns, p2.ns, str(p2.ip)) as probe:
        assert_pods_reach_each_other(cluster)
        assert cluster.whoami(p3.ns, p2.ip) == str(p3.ip)
        time.sleep(1)
    assert probe.result is not None
    received = probe.result.sent - len(probe.result.lost)
    rep = wire_report(cluster, cap, WG_PORT)
    print(f"{rep.frames} frames, {rep.node_to_node} node-to-node, {rep.tunnel} UDP to/from "
          f"{WG_PORT}; probe: {probe.result}")
    assert rep.violations == [], "\n".join(rep.violations[:20])
    # the pods' traffic was on this wire, inside the tunnel: every probe and its echo
    assert received >= 15 and rep.tunnel >= 2 * received


def test_key_rotation_touches_no_other_peer(cluster: Cluster) -> None:
    n1, n2, n3 = (cluster.nodes[i] for i in (1, 2, 3))
    p1, p2 = cluster.pods["pod1"], cluster.pods["pod2"]
    old_key = lease_public_keys(cluster)[str(n3.addr)]
    before = {(a.index, b.index): peer_view(cluster, a, b) for a, b in ((n1, n2), (n2, n1))}
    dev1 = wg_show(cluster, n1)
    assert dev1 is not None
    counters = dev1.peers[lease_public_keys(cluster)[str(n2.addr)]]
    with UdpProbe(p1.ns, p2.ns, str(p2.ip)) as probe:
        assert cluster.stop_daemon(n3) == 0
        cluster.wireguard_key_file(n3).unlink()
        cluster.start_daemon(n3)
        took = cluster.wait_until(
            lambda: lease_public_keys(cluster).get(str(n3.addr)) not in (None, old_key)
            and all_ready(cluster), timeout=TIMEOUT, interval=0.2,
            what="node3's new key in its lease and on every peer")
        assert_pods_reach_each_other(cluster)
        time.sleep(1.2)  # the probe goes on past the rotation, however quick that was
    print(f"new key everywhere after {took:.1f} s; probe node1->node2: {probe.result}")
    new_key = lease_public_keys(cluster)[str(n3.addr)]
    assert new_key != old_key and len(new_key) == 44
    for node in (n1, n2):
        dev = wg_show(cluster, node)
        assert dev is not None and old_key not in dev.peers and new_key in dev.peers
    # the untouched peers: same configuration, never removed and re-added (its counters
    # and handshake would start again from 0), and traffic between them never stopped
    assert {k: peer_view(cluster, cluster.nodes[k[0]], cluster.nodes[k[1]])
            for k in before} == before
    dev1 = wg_show(cluster, n1)
    assert dev1 is not None
    after = dev1.peers[lease_public_keys(cluster)[str(n2.addr)]]
    assert after.latest_handshake >= counters.latest_handshake > 0
    assert after.rx > counters.rx and after.tx > counters.tx
    assert probe.result is not None and probe.result.sent >= 20
    assert probe.result.max_lost_run <= MAX_LOST_RUN, str(probe.result)


def test_drift_is_repaired(cluster: Cluster) -> None:
    n1, n3 = cluster.nodes[1], cluster.nodes[3]
    key3 = lease_public_keys(cluster)[str(n3.addr)]
    # a peer removed by hand: no event tells the daemon, its resync puts it back
    cluster.node_run(n1, "wg", "set", WG_DEV, "peer", key3, "remove")
    dev = wg_show(cluster, n1)
    assert dev is not None and key3 not in dev.peers
    took = cluster.wait_until(lambda: peers_converged(cluster), timeout=15, interval=0.1,
                              what="the removed peer restored at the resync")
    print(f"removed peer restored after {took:.1f} s")
    assert_pods_reach_each_other(cluster)
    # the device deleted by hand: wireguard-go goes with it; the daemon starts another
    old_pids = wireguard_go_pids(n1)
    n1.ns.ip("link", "del", WG_DEV)
    took = cluster.wait_until(lambda: all_ready(cluster), timeout=3, interval=0.05,
                              what="flannel-wg recreated with its peers and route")
    print(f"deleted device repaired after {took * 1000:.0f} ms")
    pids = wireguard_go_pids(n1)
    assert len(pids) == 1 and pids != old_pids
    cluster.wait_until(lambda: cluster.whoami(cluster.pods["pod1"].ns, cluster.pods["pod3"].ip,
                                              timeout=1) == str(cluster.pods["pod1"].ip),
                       timeout=10, interval=0.2, what="traffic over the new device")
    assert_pods_reach_each_other(cluster)


def test_restart_keeps_the_tunnel(cluster: Cluster) -> None:
    n1, n3 = cluster.nodes[1], cluster.nodes[3]
    p1, p3 = cluster.pods["pod1"], cluster.pods["pod3"]
    pids = wireguard_go_pids(n3)
    before = peer_view(cluster, n1, n3)
    mark = len(n3.log())
    with UdpProbe(p1.ns, p3.ns, str(p3.ip)) as probe:
        time.sleep(0.5)
        assert cluster.stop_daemon(n3) == 0
        time.sleep(1)  # the daemon is gone; the tunnel is not
        cluster.start_daemon(n3)
        cluster.wait_until(lambda: "wireguard" in n3.log()[mark:].lower()
                           and all_ready(cluster), timeout=TIMEOUT, interval=0.1,
                           what="node3's daemon back")
        time.sleep(1)
    print(f"probe node1->node3 across node3's restart: {probe.result}")
    assert wireguard_go_pids(n3) == pids  # the same wireguard-go: adopted, not restarted
    assert peer_view(cluster, n1, n3) == before
    assert probe.result is not None and probe.result.sent >= 40
    assert probe.result.max_lost_run <= MAX_LOST_RUN, str(probe.result)
    assert_pods_reach_each_other(cluster)


def test_a_node_leaving_is_removed_from_the_peers(cluster: Cluster) -> None:
    """node3 sees node2 leave; node1's daemon is down meanwhile (its wireguard-go keeps the
    stale peer) and removes it when it starts."""
    n1, n2, n3 = cluster.nodes[1], cluster.nodes[2], cluster.nodes[3]
    key2 = lease_public_keys(cluster)[str(n2.addr)]
    subnet2 = cluster.subnet_of(n2)
    assert isinstance(subnet2, IPv4Network)
    assert cluster.stop_daemon(n1) == 0
    cluster.delete_pod(cluster.pods["pod2"])
    cluster.remove_node(n2)
    took = cluster.wait_until(lambda: (dev := wg_show(cluster, n3)) is not None
                              and key2 not in dev.peers, timeout=TIMEOUT, interval=0.1,
                              what="node2's peer removed on node3")
    print(f"departed node's peer removed after {took:.1f} s")
    dev1 = wg_show(cluster, n1)
    assert dev1 is not None and key2 in dev1.peers  # stale while node1's daemon is down
    mark = len(n1.log())
    cluster.start_daemon(n1)
    cluster.wait_until(lambda: peers_converged(cluster), timeout=TIMEOUT, interval=0.1,
                       what="node1 removing the stale peer at start")
    assert "Removing 1 stale WireGuard peer(s) from flannel-wg" in n1.log()[mark:]
    for node in cluster.nodes.values():
        dev = wg_show(cluster, node)
        assert dev is not None and key2 not in dev.peers and len(dev.peers) == 1
        assert all(str(subnet2) not in p.allowed_ips for p in dev.peers.values())
    assert_pods_reach_each_other(cluster)


# -- dual-stack, separate mode: flannel-wg for IPv4 peers, flannel-wg-v6 for IPv6 peers ----

V6_NETWORK = "fd10:244::/56"
DUAL = {"Network": NETWORK, "EnableIPv6": True, "IPv6Network": V6_NETWORK,
        "Backend": {"Type": "wireguard", "Mode": "separate"}}
DUAL_SEGMENTS = ["192.168.86.0/24", "192.168.87.0/24", "192.168.88.0/24"]


def v6_peers_converged(cl: Cluster) -> bool:
    """Every node's flannel-wg-v6: one peer per other node, its IPv6 endpoint on
    ListenPortV6 and its IPv6 subnet."""
    keys = lease_public_keys(cl, "BackendV6Data")
    for node in cl.nodes.values():
        dev = wg_show(cl, node, WG_DEV6)
        if dev is None or dev.listen_port != WG_PORT6:
            return False
        want = {(keys.get(str(o.addr)), f"[{o.addr6}]:{WG_PORT6}", (str(cl.subnet6_of(o)),))
                for o in cl.nodes.values() if o is not node}
        if {(p.public_key, p.endpoint, p.allowed_ips) for p in dev.peers.values()} != want:
            return False
    return True


@pytest.fixture(scope="module")
def dual() -> Iterator[Cluster]:
    with Cluster(segments=DUAL_SEGMENTS, nodes=[0, 1, 2], netconf=DUAL, name="pfw6",
                 ipv6=True, flanneld_args=["--ip-masq"], wireguard_impl="userspace") as cl:
        cl.wait_until(lambda: all_ready(cl) and v6_peers_converged(cl), timeout=TIMEOUT,
                      interval=0.2, what="wireguard peers of both families on every node")
        for node in cl.nodes.values():
            cl.add_pod(node, f"pod{node.index}")
        yield cl


def test_dual_stack_pods_reach_each_other_in_both_families(dual: Cluster) -> None:
    for family in (4, 6):
        matrix = dual.reachability(family, timeout=CONNECT_TIMEOUT)
        assert len(matrix) == 6
        for (src, dst), seen in matrix.items():
            assert seen == str(dual.pods[src].address(family)), (family, src, dst, seen)
    for node in dual.nodes.values():
        assert "FLANNEL_MTU=1420\n" in node.subnet_file.read_text()
        routes6 = node.ns.ip("-6", "route", "show", "dev", WG_DEV6).stdout
        assert any(line.split()[0] == V6_NETWORK for line in routes6.splitlines() if line)
        assert len(wireguard_go_pids(node)) == 2  # one per device
    for attrs in dual.leases().values():
        assert attrs["BackendData"]["Port"] == WG_PORT
        assert attrs["BackendV6Data"]["Port"] == WG_PORT6


def test_dual_stack_wire_carries_only_the_tunnels(dual: Cluster) -> None:
    p1, p2 = dual.pods["pod1"], dual.pods["pod2"]
    assert p2.ip6 is not None
    with capture_segment(dual, 1, "segment1") as cap, \
            UdpProbe(p1.ns, p2.ns, str(p2.ip)) as probe4, \
            UdpProbe(p1.ns, p2.ns, str(p2.ip6)) as probe6:
        for family in (4, 6):
            dual.reachability(family)
        time.sleep(1)
    rep = wire_report(dual, cap, (WG_PORT, WG_PORT6))
    assert probe4.result is not None and probe6.result is not None
    print(f"{rep.frames} frames, {rep.node_to_node} node-to-node, {rep.tunnel} tunnel; "
          f"probes: {probe4.result}; {probe6.result}")
    assert rep.violations == [], "\n".join(rep.violations[:20])
    v6_tunnel = [p for p in cap.packets() if p is not None and p.src.version == 6
                 and WG_PORT6 in (p.sport, p.dport)]
    received6 = probe6.result.sent - len(probe6.result.lost)
    assert received6 >= 15 and len(v6_tunnel) >= 2 * received6
