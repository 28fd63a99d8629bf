"""Node <-> lease and annotation rules of the kube subnet manager (reference §5.2-5.5)."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Any

import pytest

from pyflannel.lease.model import LeaseAttrs
from pyflannel.subnet.kube.annotations import Annotations, normalise_prefix
from pyflannel.subnet.kube.errors import KubeError, permission_message
from pyflannel.subnet.kube.manager import resolve_node_name
from pyflannel.subnet.kube.nodes import (
    NodeLeaseError,
    annotations_patch,
    network_available_patch,
    node_lease,
    node_public_ip_override,
    pod_cidrs,
)

ANN = Annotations.for_prefix()
P = "flannel.alpha.coreos.com/"


def node(name: str = "n1", *, cidr: str | None = "10.244.1.0/24",
         cidrs: list[str] | None = None, **ann: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if cidr:
        spec["podCIDR"] = cidr
    if cidrs is not None:
        spec["podCIDRs"] = cidrs
    return {"metadata": {"name": name, "annotations": {P + k.replace("_", "-"): v
                                                       for k, v in ann.items()}},
            "spec": spec}


MANAGED: dict[str, Any] = {"kube_subnet_manager": "true", "backend_type": "host-gw",
                           "backend_data": "null", "public_ip": "192.168.1.5"}


@pytest.mark.parametrize(("prefix", "expected"), [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/"),
    ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/"),
    ("example.com/foo", "example.com/foo-"),
    ("example.com/foo-", "example.com/foo-"),
])
def test_prefix_normalisation(prefix: str, expected: str) -> None:
    assert normalise_prefix(prefix) == expected


def test_prefixed_annotation_names() -> None:
    a = Annotations.for_prefix("example.com/foo")
    assert a.public_ip == "example.com/foo-public-ip"
    assert a.kube_managed == "example.com/foo-kube-subnet-manager"
    assert ANN.backend_data == "flannel.alpha.coreos.com/backend-data"


@pytest.mark.parametrize("bad", ["a/b/c", "nodots/", "UPPER.case/", "example.com/Foo"])
def test_bad_prefixes_refused(bad: str) -> None:
    with pytest.raises(KubeError):
        normalise_prefix(bad)


def test_unmanaged_node_has_no_lease() -> None:
    assert node_lease(node(), ANN) is None
    assert node_lease(node(kube_subnet_manager="false", public_ip="1.2.3.4"), ANN) is None


def test_managed_node_lease() -> None:
    lease = node_lease(node(**{**MANAGED, "backend_data": '{"VNI": 1, "VtepMAC": "aa"}'}), ANN)
    assert lease is not None
    assert lease.subnet == IPv4Network("10.244.1.0/24")
    assert lease.attrs.public_ip == IPv4Address("192.168.1.5")
    assert lease.attrs.backend_type == "host-gw"
    assert lease.attrs.backend_data == '{"VNI":1,"VtepMAC":"aa"}'  # compact, as Go
    assert lease.origin == "n1"


def test_null_backend_data_is_none() -> None:
    lease = node_lease(node(**MANAGED), ANN)
    assert lease is not None and lease.attrs.backend_data == ""


def test_pod_cidrs_preferred_over_pod_cidr() -> None:
    n = node(cidr="10.244.1.0/24", cidrs=["10.244.1.0/24", "fd00:1::/64"])
    c = pod_cidrs(n)
    assert c.v4 == IPv4Network("10.244.1.0/24") and c.v6 == IPv6Network("fd00:1::/64")
    lease = node_lease(node(cidrs=["10.244.1.0/24", "fd00:1::/64"], **MANAGED,
                            public_ipv6="fd77::5"), ANN, ipv4=True, ipv6=True)
    assert lease is not None and lease.ipv6_subnet == IPv6Network("fd00:1::/64")
    assert lease.key == "10.244.1.0-24&fd00:1::-64"


@pytest.mark.parametrize("cidrs", [["10.0.0.0/24", "10.0.1.0/24"],
                                   ["10.0.0.0/24", "fd00::/64", "fd01::/64"], ["nonsense"]])
def test_bad_pod_cidrs(cidrs: list[str]) -> None:
    with pytest.raises(NodeLeaseError):
        pod_cidrs(node(cidrs=cidrs))


def test_bad_public_ip_drops_node() -> None:
    with pytest.raises(NodeLeaseError):
        node_lease(node(**{**MANAGED, "public_ip": "not-an-ip"}), ANN)
    with pytest.raises(NodeLeaseError):
        node_lease(node(cidr=None, **MANAGED), ANN)


ATTRS = LeaseAttrs(public_ip=IPv4Address("192.168.1.5"), backend_type="host-gw")


def test_patch_has_every_annotation_for_a_new_node() -> None:
    body = annotations_patch(node(), ANN, ATTRS)
    assert body == {"metadata": {"annotations": {
        P + "kube-subnet-manager": "true", P + "backend-type": "host-gw",
        P + "backend-data": "null", P + "public-ip": "192.168.1.5"}}}


def test_no_patch_when_nothing_differs() -> None:
    assert annotations_patch(node(**MANAGED), ANN, ATTRS) is None


def test_patch_only_what_differs() -> None:
    body = annotations_patch(node(**{**MANAGED, "public_ip": "192.168.1.9"}), ANN, ATTRS)
    assert body == {"metadata": {"annotations": {P + "public-ip": "192.168.1.5"}}}


def test_public_ip_overwrite_is_published() -> None:
    n = node(**{**MANAGED, "public_ip_overwrite": "203.0.113.7"})
    body = annotations_patch(n, ANN, ATTRS)
    assert body == {"metadata": {"annotations": {P + "public-ip": "203.0.113.7"}}}
    # An unusable overwrite is ignored rather than published.
    assert annotations_patch(node(**{**MANAGED, "public_ip_overwrite": "x"}), ANN, ATTRS) is None


def test_node_public_ip_override() -> None:
    assert node_public_ip_override(node(node_public_ip="10.9.9.9"), ANN) == (
        IPv4Address("10.9.9.9"), None)
    assert node_public_ip_override(node(), ANN) == (None, None)


def test_network_available_patch_shape() -> None:
    body = network_available_patch()
    (cond,) = body["status"]["conditions"]
    assert cond["type"] == "NetworkUnavailable" and cond["status"] == "False"
    assert cond["reason"] == "FlannelIsUp"
    assert cond["message"] == "Flannel is running on this node"
    json.dumps(body)  # serialisable as is


def test_node_name_from_env() -> None:
    assert resolve_node_name({"NODE_NAME": "a", "POD_NAME": "p"}) == "a"
    assert resolve_node_name({"POD_NAME": "p", "POD_NAMESPACE": "ns"}) == ("ns", "p")
    with pytest.raises(KubeError, match="POD_NAME and POD_NAMESPACE must be set"):
        resolve_node_name({"POD_NAME": "p"})


def test_permission_message_names_rule() -> None:
    msg = permission_message("patch", "nodes/status", "n1", "forbidden")
    assert "cannot patch nodes/status 'n1'" in msg
    assert 'resources: ["nodes/status"], verbs: ["patch"]' in msg
    assert "ClusterRole" in msg and "\n" not in msg
