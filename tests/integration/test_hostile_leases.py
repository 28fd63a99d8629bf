"""Issue #9 on the lab: what a fault run wrote into etcd, replayed against real daemons.

A 3-node host-gw cluster; node2's lease is `$P/<subnet>`. Each planted key or value must
leave every route where it is, keep every daemon running, and be logged once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pyflannel_lab.cluster import Cluster, LabNode

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3, name="pfh") as cl:
        cl.wait_until(cl.converged, timeout=60, what="initial convergence")
        yield cl


def routes(cl: Cluster) -> dict[int, set[tuple[str, str]]]:
    return {n.index: cl.flannel_routes(n) for n in cl.nodes.values()}


def all_running(cl: Cluster) -> bool:
    return all(n.proc is not None and n.proc.poll() is None for n in cl.nodes.values())


def settle(cl: Cluster) -> None:
    # Long enough for a watch event to reach every daemon and a pass to run (both take
    # milliseconds): anything the planted key could do has happened by then.
    time.sleep(1.0)


def status_check(cl: Cluster, node: LabNode) -> subprocess.CompletedProcess[str]:
    return node.ns.run(sys.executable, "-m", "pyflannel.cli", "status", "--check",
                       f"--etcd-endpoints={cl.etcd_endpoint}",
                       f"--subnet-file={node.subnet_file}", check=False)


@pytest.mark.parametrize("bogus", ["x{s}", "{a}-024", "{s}&fd00::-64", "{s}junk",
                                   "0{s}", "{s}/extra"])
def test_a_key_that_is_not_canonical_cannot_move_or_remove_a_route(cluster: Cluster,
                                                                   bogus: str) -> None:
    node2 = cluster.nodes[2]
    subnet = cluster.subnet_of(node2)
    assert subnet is not None
    s, a = f"{subnet.network_address}-{subnet.prefixlen}", str(subnet.network_address)
    key = f"{cluster.prefix}/subnets/{bogus.format(s=s, a=a)}"
    before = routes(cluster)
    cluster.etcdctl("put", key, json.dumps({"PublicIP": "192.168.77.66",
                                            "BackendType": "host-gw"}))
    settle(cluster)
    assert routes(cluster) == before and all_running(cluster)
    if "&" in bogus:
        # Canonical, but a younger lease for node2's subnet: refused as a conflict, and
        # `pyflannel status` says so instead of "in order".
        r = status_check(cluster, cluster.nodes[1])
        assert r.returncode == 1 and "the older lease keeps it" in r.stdout, r.stdout
    cluster.etcdctl("del", key)
    settle(cluster)
    assert routes(cluster) == before and all_running(cluster)
    shown = key[len(f"{cluster.prefix}/subnets/"):]
    for n in cluster.nodes.values():
        if n is node2 and "&" in bogus:
            continue  # overlaps node2's own subnet: refused as such, also once
        assert sum(shown in line for line in n.log().splitlines()
                   if "Skipping" in line or "Refusing" in line) == 1, n.log()[-3000:]


def test_a_deeply_nested_lease_is_refused_and_every_daemon_keeps_running(
        cluster: Cluster) -> None:
    before = routes(cluster)
    key = f"{cluster.prefix}/subnets/10.244.250.0-24"
    value = '{"PublicIP":"192.168.77.66","BackendType":"host-gw","BackendData":' + \
        "[" * 1500 + "]" * 1500 + "}"
    cluster.etcdctl("put", key, value)
    settle(cluster)
    assert routes(cluster) == before and all_running(cluster)
    # A restart reads it again at start-up: still refused, once.
    node = cluster.nodes[3]
    cluster.stop_daemon(node)
    cluster.start_daemon(node)
    cluster.wait_until(lambda: "Running backend." in node.log().rsplit("Exiting", 1)[-1],
                       what="the restarted daemon to run")
    cluster.wait_until(cluster.converged, what="convergence after the restart")
    assert all_running(cluster)
    tail = node.log().rsplit("Exiting", 1)[-1]
    assert tail.count("nested too deeply") == 1, tail
    cluster.etcdctl("del", key)


def test_a_broadcast_public_ip_is_refused_once_not_retried(cluster: Cluster) -> None:
    before = routes(cluster)
    key = f"{cluster.prefix}/subnets/10.244.251.0-24"
    cluster.etcdctl("put", key, json.dumps({"PublicIP": "192.168.77.255",
                                            "BackendType": "host-gw"}))
    time.sleep(12)  # longer than the 10 s periodic pass: nothing is retried
    assert routes(cluster) == before and all_running(cluster)
    for n in cluster.nodes.values():
        lines = [x for x in n.log().splitlines() if "10.244.251.0" in x]
        assert len(lines) == 1 and "broadcast address" in lines[0], lines
        assert not any(x.startswith("E") for x in lines)
    cluster.etcdctl("del", key)


def test_a_numeric_public_ip_is_refused(cluster: Cluster) -> None:
    before = routes(cluster)
    key = f"{cluster.prefix}/subnets/10.244.252.0-24"
    cluster.etcdctl("put", key, '{"PublicIP":3232255290,"BackendType":"host-gw"}')
    settle(cluster)
    assert routes(cluster) == before
    assert all("expected an IP address string" in n.log() for n in cluster.nodes.values())
    cluster.etcdctl("del", key)
