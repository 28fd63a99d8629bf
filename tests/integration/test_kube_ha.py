"""flanneld --kube-subnet-mgr while its kube-apiserver restarts mid-watch.

The API server goes down while three daemons watch Nodes and stays down long enough for
every daemon to see its watch fail and retry; routes are sampled all along and must all
stay. Once it is back, a node registered right away (a Node with a podCIDR) is routed by
every daemon (their watches resumed from their resourceVersion), and nothing a daemon
owns changed: its subnet, its annotations, its process.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from pyflannel_lab.cluster import Cluster
from pyflannel_lab.kube import MISSING_BINARY, KubeLabStore, kube_apiserver_binary
from pyflannel_lab.sampling import RouteSampler

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 (run the README's test command as root)"),
    pytest.mark.skipif(kube_apiserver_binary() is None, reason=MISSING_BINARY),
    pytest.mark.kernel,
]

P = "flannel.alpha.coreos.com/"
TIMEOUT = 90  # two shared cores, an API server and three daemons starting
PROGRAMMED_WITHIN = 30  # the new node routed everywhere after the restart: functional


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(nodes=3, name="pfkh", store=KubeLabStore()) as cl:
        cl.wait_until(cl.converged, timeout=TIMEOUT, what="initial convergence")
        yield cl


def flannel_annotations(ks: KubeLabStore, name: str) -> dict[str, str]:
    meta = ks.node(name)["metadata"]
    return {k: v for k, v in meta.get("annotations", {}).items() if k.startswith(P)}


def test_api_server_restart_mid_watch_keeps_routes_and_a_new_node_is_routed(
        cluster: Cluster) -> None:
    cl = cluster
    ks = cl.store
    assert isinstance(ks, KubeLabStore)
    nodes = list(cl.nodes.values())
    subnets_before = {n.index: cl.subnet_of(n) for n in nodes}
    annotations_before = {n.name: flannel_annotations(ks, n.name) for n in nodes}
    assert all(a for a in annotations_before.values())
    routes_before = {n.index: cl.flannel_routes(n) for n in nodes}
    assert all(len(r) == 2 for r in routes_before.values())
    logged_before = {n.index: n.log().count("Node watch:") for n in nodes}

    with RouteSampler(cl, routes_before) as sampler:
        ks.stop()
        # Down until every daemon has seen its watch fail (one line each, then quiet).
        cl.wait_until(lambda: all(n.log().count("Node watch:") > logged_before[n.index]
                                  for n in nodes), timeout=TIMEOUT,
                      what="every daemon noticing the API server is gone")
        assert all(n.proc is not None and n.proc.poll() is None for n in nodes)
        ks.resume()
        t_back = time.monotonic()
        new = cl.add_node()
        cl.wait_until(cl.converged, timeout=PROGRAMMED_WITHIN,
                      what="the node registered after the restart routed everywhere")
        print(f"\n[kube-apiserver restart] a node registered after the restart was routed "
              f"on every node {time.monotonic() - t_back:.2f}s after the server was back")
    assert sampler.samples > 5
    assert sampler.missing == [], sampler.missing[:5]

    assert all(n.proc is not None and n.proc.poll() is None for n in cl.nodes.values())
    assert {n.index: cl.subnet_of(n) for n in nodes} == subnets_before
    assert {n.name: flannel_annotations(ks, n.name) for n in nodes} == annotations_before
    assert str(cl.subnet_of(new)) == ks.node(new.name)["spec"]["podCIDR"]
    for n in cl.nodes.values():
        assert "Traceback" not in n.log(), n.log()[-3000:]
