"""The life of a real cluster with flannel (the walk-through's reasons to use it): a node
joins and every node routes to it; the flannel pod is deleted and its replacement takes
over with no peer route removed meanwhile; a rolling update to a new image tag loses no
established pod-to-pod TCP connection; a node reboots (everything on it gone) and its
routes and pods come back untouched; a node is drained and deleted and its route
disappears everywhere.

Needs root and the binaries of scripts/build-kubernetes.sh; about four minutes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from kubelab_marks import KUBELET_LAB

pytestmark = KUBELET_LAB


@pytest.fixture(scope="module")
def lab() -> Iterator[object]:
    from pyflannel_lab import kubeviews, session

    label = f"test-{secrets.token_hex(3)}"
    kl = kubeviews.build(f"pfc{secrets.token_hex(2)}", {"nodes": 2, "backend": "host-gw"},
                         session.kube_state_path(label), lambda _: None)
    try:
        kl.probes.start()
        yield kl
    finally:
        kl.close()
        with __import__("contextlib").suppress(OSError):
            session.kube_state_path(label).parent.rmdir()


def _reach_all(kl: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(kl, KubeLab)
    seen = kl.probes.matrix()
    assert seen and all(src == kl.probes.pods[a].ip for (a, _), src in seen.items()), seen


def test_node_joins_and_every_node_routes_to_it(lab: object) -> None:
    from pyflannel_lab.kubelab import add_node
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    n3 = add_node(lab.cluster, lambda _: None)
    lab.flannel.wait_ready()
    sub3 = str(lab.cluster.subnet_of(n3))
    for n in lab.cluster.nodes.values():
        routes = lab.cluster.flannel_routes(n)
        assert len(routes) == 2
        if n is not n3:
            assert (sub3, str(n3.addr)) in routes


def test_flannel_pod_deleted_new_pod_takes_over_without_removing_routes(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab
    from pyflannel_lab.lifecycle import RouteWatch

    assert isinstance(lab, KubeLab)
    node1 = next(n for n in lab.cluster.nodes.values() if n.name == "node1")
    with RouteWatch(lab.cluster) as watch:
        old = lab.life.replace_flannel_pod(node1)
        lab.flannel.wait_ready()
    assert lab.flannel.pods()["node1"]["metadata"]["name"] != old
    assert watch.gaps == []
    _reach_all(lab)


def test_rolling_update_loses_no_tcp_connection(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab
    from pyflannel_lab.lifecycle import TcpWatch

    assert isinstance(lab, KubeLab)
    a, b = (lab.probes.pods[f"probe-node{i}"] for i in (1, 2))
    tcp = TcpWatch(a.net, b.net, b.ip, n=20)
    tcp.start()
    lab.life.rolling_update("v0.1.1")
    alive = tcp.finish()
    images = {c["image"] for p in lab.flannel.pods().values()
              for c in p["spec"]["containers"]}
    assert images == {"ghcr.io/pyflannel/pyflannel:v0.1.1"}
    assert alive == 20


def test_node_reboot_routes_and_pods_come_back(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab

    assert isinstance(lab, KubeLab)
    node2 = next(n for n in lab.cluster.nodes.values() if n.name == "node2")
    lab.life.reboot(node2)
    lab.flannel.wait_ready()
    assert len(lab.cluster.flannel_routes(node2)) == len(lab.cluster.nodes) - 1
    lab.probes.attach()
    _reach_all(lab)


def test_node_drained_and_deleted_its_route_disappears(lab: object) -> None:
    from pyflannel_lab.kubeviews import KubeLab
    from pyflannel_lab.lifecycle import wait_routes

    assert isinstance(lab, KubeLab)
    node3 = next(n for n in lab.cluster.nodes.values() if n.name == "node3")
    sub3 = str(lab.cluster.subnet_of(node3))
    lab.life.drain_and_delete(node3)
    wait_routes(lab.cluster)
    for n in lab.cluster.nodes.values():
        assert sub3 not in {d for d, _ in lab.cluster.flannel_routes(n)}
        assert len(lab.cluster.flannel_routes(n)) == 1
