"""The real flanneld on a real etcd, three or more nodes in network namespaces.

Each test builds its own cluster (lab.Cluster) and removes it, also when it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyflannel_lab.cluster import Cluster

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3, name="pft") as cl:
        cl.wait_until(cl.converged, timeout=60, what="initial convergence")
        yield cl


def test_every_node_routes_to_every_other_node(cluster: Cluster) -> None:
    subnets = {cluster.subnet_of(n) for n in cluster.nodes.values()}
    assert len(subnets) == 3 and None not in subnets
    for node in cluster.nodes.values():
        assert cluster.flannel_routes(node) == cluster.expected_routes(node)
        assert len(cluster.flannel_routes(node)) == 2
        # upstream's shape, `<subnet> via <peer> dev eth0` (proto boot is hidden), through
        # a nexthop object: `<subnet> nhid <id> via <peer> dev eth0`
        lines = [line.strip() for line in node.routes().splitlines()]
        for subnet, gw in cluster.expected_routes(node):
            assert any(re.fullmatch(rf"{re.escape(subnet)} nhid \d+ via {re.escape(gw)} "
                                    r"dev eth0", line) for line in lines), lines
    # the lease JSON in etcd is upstream's, byte for byte
    for key, attrs in cluster.leases().items():
        assert key.startswith("/coreos.com/network/subnets/10.244.")
        assert list(attrs) == ["PublicIP", "PublicIPv6", "BackendType"]
        assert attrs["PublicIPv6"] is None and attrs["BackendType"] == "host-gw"


def test_subnet_env_has_upstreams_bytes(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    subnet = cluster.subnet_of(node)
    assert subnet is not None
    assert node.subnet_file.read_bytes() == (
        f"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet.network_address + 1}/24\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n").encode()
    assert oct(node.subnet_file.stat().st_mode & 0o777) == "0o644"


def test_node_joining_and_leaving_is_seen_everywhere(cluster: Cluster) -> None:
    new = cluster.add_node()
    cluster.wait_until(cluster.converged, what="the new node's routes everywhere")
    assert all(len(cluster.flannel_routes(n)) == 3 for n in cluster.nodes.values())
    new_subnet = str(cluster.subnet_of(new))
    cluster.remove_node(new)  # stops its daemon and deletes its lease
    cluster.wait_until(cluster.converged, what="the departed node's routes gone")
    for n in cluster.nodes.values():
        assert new_subnet not in {dst for dst, _ in cluster.flannel_routes(n)}


def test_revoked_lease_stops_the_daemon_with_a_clear_message(cluster: Cluster) -> None:
    node = cluster.nodes[3]
    key = cluster.lease_key_of(node)
    assert key
    cluster.etcdctl("del", key)
    assert node.proc is not None
    rc = node.proc.wait(timeout=20)
    assert rc != 0
    assert "Lease has been revoked. Shutting down daemon." in node.log()
    others = [n for n in cluster.nodes.values() if n is not node]
    cluster.wait_until(lambda: all(len(cluster.flannel_routes(n)) == 1 for n in others),
                       what="the revoked subnet's route removed from the peers")


def test_hand_deleted_route_is_restored_by_the_event_path(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    subnet, gw = sorted(cluster.expected_routes(node))[0]
    for _ in range(3):
        node.ns.ip("route", "del", subnet)
        t0 = time.monotonic()
        cluster.wait_until(lambda: (subnet, gw) in cluster.flannel_routes(node), timeout=5,
                           interval=0.01, what="the deleted route to come back")
        took = time.monotonic() - t0
        print(f"route restored after {took * 1000:.0f} ms")
    # it was the netlink event, not the 10 s periodic resync, that repaired it
    assert f"Drift: route to {subnet} via {gw} was deleted by someone else; repairing" \
        in node.log()
    # a route altered by hand (another gateway) is put back too
    other = "192.168.77.200"
    node.ns.ip("route", "replace", subnet, "via", other, "dev", "eth0")
    cluster.wait_until(lambda: (subnet, gw) in cluster.flannel_routes(node), timeout=5,
                       what="the altered route to be corrected")


def test_every_kind_of_route_drift_is_repaired_from_its_event_and_logged_once(
        cluster: Cluster) -> None:
    """Moved to another device, replaced by a blackhole or an unreachable route, shadowed by
    a lower metric: each is one netlink event, one "Drift:" line, and a repair well before
    the 10 s periodic pass (the wait allows 3 s, so only the event path can pass it)."""
    node = cluster.nodes[1]
    subnet, gw = sorted(cluster.expected_routes(node))[0]
    node.ns.ip("link", "add", "dummy9", "type", "veth", "peer", "name", "dummy9p")
    node.ns.ip("link", "set", "dummy9p", "up")
    node.ns.ip("link", "set", "dummy9", "up")
    node.ns.ip("addr", "add", "192.0.2.1/24", "dev", "dummy9")
    tampers = [("route", "replace", subnet, "via", "192.0.2.7", "dev", "dummy9"),
               ("route", "replace", "blackhole", subnet),
               ("route", "replace", "unreachable", subnet)]
    for tamper in tampers:
        before = node.log().count("Drift:")
        node.ns.ip(*tamper)
        cluster.wait_until(lambda b=before: (subnet, gw) in cluster.flannel_routes(node)
                           and node.log().count("Drift:") > b, timeout=3, interval=0.01,
                           what=f"the route to come back after `ip {' '.join(tamper)}`")
        time.sleep(0.3)  # our own repair must not be reported as drift as well
        assert node.log().count("Drift:") == before + 1, node.log()[-2000:]
    # A second route to the subnet with another metric is reported (and, on our device,
    # removed by its metric so ours stays).
    node.ns.ip("route", "append", subnet, "via", gw, "dev", "eth0", "metric", "7")
    cluster.wait_until(lambda: "metric 7" in node.log()
                       and (subnet, gw) in cluster.flannel_routes(node)
                       and "metric 7" not in node.ns.ip("route", "show", subnet).stdout,
                       timeout=3, interval=0.01, what="the extra metric-7 route to go")
    # Our own changes are never drift: a node joining and leaving is programmed quietly.
    before = node.log().count("Drift:")
    new = cluster.add_node()
    cluster.wait_until(cluster.converged, timeout=30, what="the new node to join")
    cluster.remove_node(new)
    cluster.wait_until(cluster.converged, timeout=30, what="the new node to leave")
    time.sleep(0.5)
    assert node.log().count("Drift:") == before, node.log()[-2000:]
    node.ns.ip("link", "del", "dummy9")


def test_stale_routes_are_removed_at_start_and_foreign_routes_kept(cluster: Cluster) -> None:
    node = cluster.nodes[2]
    cluster.stop_daemon(node)
    # a node that left while this daemon was down, and routes that are not ours
    node.ns.ip("route", "add", "10.244.250.0/24", "via", "192.168.77.99", "dev", "eth0")
    node.ns.ip("route", "add", "10.99.0.0/24", "via", "192.168.77.98", "dev", "eth0")
    cluster.start_daemon(node)
    cluster.wait_until(cluster.converged, what="the stale route removed")
    assert "10.99.0.0/24 via 192.168.77.98 dev eth0" in node.routes()  # not ours: kept


def test_restart_removes_no_route(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    before = cluster.flannel_routes(node)
    mon = subprocess.Popen(node.ns.exec_args("ip", "monitor", "route"), stdout=subprocess.PIPE,
                           text=True)
    try:
        time.sleep(0.3)
        assert cluster.stop_daemon(node) == 0
        assert cluster.flannel_routes(node) == before  # SIGTERM leaves routes in place
        assert node.subnet_file.exists() and cluster.lease_key_of(node)
        cluster.start_daemon(node)
        cluster.wait_until(lambda: "flannel is ready" in node.log().split("Exiting cleanly")[-1],
                           what="the restarted daemon to be ready")
        time.sleep(1.5)
    finally:
        mon.terminate()
        out, _ = mon.communicate(timeout=5)
    assert "Deleted" not in out, out
    assert cluster.flannel_routes(node) == before


def test_etcd_outage_keeps_routes_and_the_watch_resumes(cluster: Cluster) -> None:
    assert cluster.etcd is not None
    before = {n.index: cluster.flannel_routes(n) for n in cluster.nodes.values()}
    cluster.store.stop()
    new = cluster.add_node()  # its daemon waits for etcd
    time.sleep(10)
    assert {n.index: cluster.flannel_routes(n) for n in cluster.nodes.values()
            if n is not new} == before
    cluster.store.resume()
    cluster.wait_until(cluster.converged, timeout=40,
                       what="the lease added after the outage to be routed everywhere")
    assert all(len(cluster.flannel_routes(n)) == 3 for n in cluster.nodes.values())


def test_health_endpoints_and_metrics() -> None:
    with Cluster(nodes=2, name="pft", flanneld_args=["--healthz-ip=127.0.0.1",
                                                     "--healthz-port=18081"]) as cl:
        node = cl.nodes[1]
        cl.wait_until(cl.converged, what="convergence")

        def get(path: str) -> tuple[int, str]:
            out = node.ns.run(sys.executable, "-c",
                              "import urllib.request, urllib.error\n"
                              "try:\n r=urllib.request.urlopen('http://127.0.0.1:18081"
                              + path + "');print(r.status);print(r.read().decode())\n"
                              "except urllib.error.HTTPError as e:\n print(e.code);"
                              "print(e.read().decode())",
                              check=False).stdout.splitlines()
            return int(out[0]), "\n".join(out[1:])

        cl.wait_until(lambda: get("/readyz")[0] == 200, what="/readyz")
        assert get("/healthz") == (200, "flanneld is running")
        assert get("/readyz") == (200, "flanneld is ready")
        # a hand-made drift shows up in the counters
        subnet, _ = sorted(cl.expected_routes(node))[0]
        node.ns.ip("route", "del", subnet)
        cl.wait_until(cl.converged, what="the route repaired")

        def metrics() -> dict[str, float]:
            code, text = get("/metrics")
            assert code == 200
            return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
                    for fam in text_string_to_metric_families(text) for s in fam.samples}

        cl.wait_until(lambda: metrics().get(
            "flannel_drift_repairs_total[('kind', 'kernel')]", 0) >= 1, timeout=10,
            what="the drift repair to be counted")
        m = metrics()
        assert m["flannel_leases"] == 1
        assert m["flannel_routes_programmed"] == 1
        assert m["flannel_unreachable_peers"] == 0
        assert m["flannel_reconcile_duration_seconds_count"] >= 1
        assert abs(m["flannel_last_sync_timestamp_seconds"] - time.time()) < 60
        assert m["flannel_lease_expiration_timestamp_seconds"] > time.time() + 23 * 3600
        assert "flannel_watch_reconnects_total" in m
        assert "flannel_neighbours_programmed" in m and "flannel_fdb_entries_programmed" in m

        # subnet.env removed: rewritten at the next resync, with our exact bytes.
        good = node.subnet_file.read_bytes()
        node.subnet_file.unlink()
        cl.wait_until(lambda: node.subnet_file.exists(), timeout=15,
                      what="subnet.env to be rewritten")
        assert node.subnet_file.read_bytes() == good and get("/readyz")[0] == 200
        # subnet.env cannot be written (a directory in its place): not ready, and why.
        node.subnet_file.unlink()
        node.subnet_file.mkdir()
        cl.wait_until(lambda: get("/readyz")[0] == 503, timeout=15, what="/readyz to say 503")
        code, body = get("/readyz")
        assert body.startswith(f"flanneld is not ready: cannot write {node.subnet_file}"), body
        assert get("/healthz") == (200, "flanneld is running")  # liveness is unaffected
        node.subnet_file.rmdir()
        cl.wait_until(lambda: get("/readyz") == (200, "flanneld is ready"), timeout=15,
                      what="/readyz to recover")
        assert node.subnet_file.read_bytes() == good


def test_racing_daemons_get_distinct_leases() -> None:
    # Only two subnets exist: two daemons starting together must not both take one.
    netconf = {"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0",
               "SubnetMax": "10.244.2.0", "Backend": {"Type": "host-gw"}}
    with Cluster(nodes=0, name="pft", netconf=netconf) as cl:
        for _round in range(3):
            a, b = cl.add_node(start=False), cl.add_node(start=False)
            cl.start_daemon(a)
            cl.start_daemon(b)
            cl.wait_until(lambda a=a, b=b: cl.subnet_of(a) is not None  # type: ignore[misc]
                          and cl.subnet_of(b) is not None, what="both leases")
            assert cl.subnet_of(a) != cl.subnet_of(b)
            assert len(cl.leases()) == 2
            cl.remove_node(a)
            cl.remove_node(b)


def test_bad_leases_are_refused_and_unreachable_peers_retried(cluster: Cluster) -> None:
    node = cluster.nodes[1]
    prefix = "/coreos.com/network/subnets/"
    own = cluster.subnet_of(node)
    bad = {
        "10.99.7.0-24": "192.168.77.50",       # outside Network
        "10.244.200.0-25": "192.168.77.51",    # wrong prefix length
        "10.244.201.0-24": "127.0.0.1",        # unusable public IP
    }
    for key, ip in bad.items():
        cluster.etcdctl("put", prefix + key,
                        f'{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"host-gw"}}')
    # a peer that is not on our L2 segment: the kernel refuses a route via it
    cluster.etcdctl("put", prefix + "10.244.202.0-24",
                    '{"PublicIP":"10.77.0.5","PublicIPv6":null,"BackendType":"host-gw"}')
    cluster.wait_until(lambda: node.log().count("Refusing lease") >= 3
                       and "not reachable on this node's L2 segment" in node.log(),
                       what="refusals and the unreachable peer logged")
    routes = node.routes()
    for key in bad:
        assert key.split("-")[0] not in routes
    assert "10.244.202.0" not in routes
    assert own is not None and f"{own}" not in {d for d, _ in cluster.flannel_routes(node)}
    # the good peers are untouched
    assert cluster.expected_routes(node) <= cluster.flannel_routes(node)
    # logged once, not on every retry
    time.sleep(11)  # past one periodic resync
    assert node.log().count("not reachable on this node's L2 segment") == 1
    # once the peer becomes reachable (an address on its subnet), the retry programs it
    node.ns.ip("addr", "add", "10.77.0.1/24", "dev", "eth0")
    cluster.wait_until(lambda: ("10.244.202.0/24", "10.77.0.5") in cluster.flannel_routes(node),
                       timeout=15, what="the unreachable peer's route after it became reachable")


def test_ip_blackhole_route() -> None:
    with Cluster(nodes=1, name="pft",
                 flanneld_args=["--ip-blackhole-route", "--iptables-resync=1"]) as cl:
        node = cl.nodes[1]
        cl.wait_until(lambda: cl.subnet_of(node) is not None, what="the lease")
        want = f"blackhole {cl.subnet_of(node)}"
        cl.wait_until(lambda: want in node.routes(), what="the blackhole route")
        node.ns.ip("route", "del", "blackhole", str(cl.subnet_of(node)))
        cl.wait_until(lambda: want in node.routes(), what="the blackhole route restored")
        assert node.log().count("Added blackhole route") == 2
