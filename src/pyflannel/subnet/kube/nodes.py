"""Node object <-> lease: what a Node says about its lease, and the annotation patch that
makes it say what ours is. Pure functions over the Node's JSON (a dict), so the watch
never builds model objects for thousands of nodes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pyflannel.jsonlimits import JsonLimitError, loads_bounded
from pyflannel.lease.model import (
    MAX_LEASE_BYTES,
    MAX_LEASE_DEPTH,
    UNSET_IPV4,
    Lease,
    LeaseAttrs,
    compact_json,
    parse_ipv4,
)
from pyflannel.subnet.kube.annotations import Annotations

# Written into a Node's annotations for backend data that is absent: upstream's host-gw
# writes the JSON literal null (json.Marshal of a nil RawMessage).
NULL_BACKEND_DATA = "null"


class NodeLeaseError(ValueError):
    """A Node whose podCIDR or flannel annotations cannot be turned into a lease."""


@dataclass(frozen=True)
class PodCidrs:
    v4: IPv4Network | None
    v6: IPv6Network | None


def node_name(node: Mapping[str, Any]) -> str:
    return str(node.get("metadata", {}).get("name", ""))


def node_annotations(node: Mapping[str, Any]) -> dict[str, str]:
    return node.get("metadata", {}).get("annotations") or {}


def pod_cidrs(node: Mapping[str, Any]) -> PodCidrs:
    """spec.podCIDRs (one IPv4 and/or one IPv6 entry), else spec.podCIDR; both None when
    the node has none yet."""
    spec = node.get("spec") or {}
    cidrs: list[str] = list(spec.get("podCIDRs") or [])
    if not cidrs and spec.get("podCIDR"):
        cidrs = [spec["podCIDR"]]
    if len(cidrs) > 2:
        raise NodeLeaseError(f"node {node_name(node)!r} has {len(cidrs)} podCIDRs; at most one "
                             "IPv4 and one IPv6 are supported")
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for text in cidrs:
        try:
            net = ip_network(text)
        except ValueError as e:
            raise NodeLeaseError(f"node {node_name(node)!r}: podCIDR {text!r}: {e}") from None
        if isinstance(net, IPv4Network):
            if v4 is not None:
                raise NodeLeaseError(f"node {node_name(node)!r} has two IPv4 podCIDRs")
            v4 = net
        else:
            if v6 is not None:
                raise NodeLeaseError(f"node {node_name(node)!r} has two IPv6 podCIDRs")
            v6 = net
    return PodCidrs(v4, v6)


def _backend_data(text: str | None, what: str) -> str:
    if not text:
        return ""
    try:
        return compact_json(loads_bounded(text, what=f"annotation {what}",
                                          max_bytes=MAX_LEASE_BYTES, max_depth=MAX_LEASE_DEPTH))
    except JsonLimitError as e:
        raise NodeLeaseError(str(e)) from None


def node_lease(node: Mapping[str, Any], ann: Annotations, *, ipv4: bool = True,
               ipv6: bool = False) -> Lease | None:
    """The lease a Node holds (upstream nodeToLease), or None when flannel does not manage
    it (no `kube-subnet-manager: "true"` annotation yet). Raises NodeLeaseError for a
    managed node whose data is unusable."""
    a = node_annotations(node)
    if a.get(ann.kube_managed) != "true":
        return None
    name = node_name(node)
    cidrs = pod_cidrs(node)
    subnet = cidrs.v4 if ipv4 else None
    subnet6 = cidrs.v6 if ipv6 else None
    if ipv4 and subnet is None:
        raise NodeLeaseError(f"node {name!r} has no IPv4 podCIDR")
    if ipv6 and subnet6 is None:
        raise NodeLeaseError(f"node {name!r} has no IPv6 podCIDR")
    public_ip = UNSET_IPV4
    public_ip6: IPv6Address | None = None
    try:
        if ipv4:
            public_ip = parse_ipv4(a.get(ann.public_ip, ""))
        if ipv6:
            public_ip6 = IPv6Address(a.get(ann.public_ipv6, ""))
    except ValueError as e:
        raise NodeLeaseError(f"node {name!r}: public IP annotation: {e}") from None
    attrs = LeaseAttrs(
        public_ip=public_ip, public_ipv6=public_ip6,
        backend_type=a.get(ann.backend_type, ""),
        backend_data=_backend_data(a.get(ann.backend_data), ann.backend_data) if ipv4 else "",
        backend_v6_data=(_backend_data(a.get(ann.backend_v6_data), ann.backend_v6_data)
                         if ipv6 else ""))
    meta = node.get("metadata") or {}
    return Lease(subnet=subnet, attrs=attrs, ipv6_subnet=subnet6, expiration=None,
                 origin=name, node=name, created=_created(meta.get("creationTimestamp")),
                 revision=_revision(meta.get("resourceVersion")))


def _created(stamp: Any) -> int:
    """metadata.creationTimestamp (RFC 3339, second precision) as Unix seconds; a Node
    without one ranks last, so it can never out-rank a real one."""
    if isinstance(stamp, str) and len(stamp) <= 40:
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return 1 << 62


def _revision(rv: Any) -> int:
    return int(rv) if isinstance(rv, str) and rv.isdigit() and len(rv) <= 20 else 0


def _override(a: Mapping[str, str], key: str, family: int) -> str | None:
    text = a.get(key)
    if not text:
        return None
    try:
        addr = ip_address(text)
    except ValueError:
        return None
    return str(addr) if addr.version == family else None


def published_public_ips(node: Mapping[str, Any], ann: Annotations,
                         attrs: LeaseAttrs) -> tuple[str, str | None]:
    """The public addresses we publish: ours, or the public-ip(v6)-overwrite annotation
    when an operator set one (a node behind NAT)."""
    a = node_annotations(node)
    v4 = _override(a, ann.public_ip_overwrite, 4) or str(attrs.public_ip)
    v6 = _override(a, ann.public_ipv6_overwrite, 6) or (
        str(attrs.public_ipv6) if attrs.public_ipv6 is not None else None)
    return v4, v6


def wanted_annotations(node: Mapping[str, Any], ann: Annotations, attrs: LeaseAttrs, *,
                       ipv4: bool = True, ipv6: bool = False) -> dict[str, str]:
    """The annotations our node must carry for `attrs`."""
    v4, v6 = published_public_ips(node, ann, attrs)
    out = {ann.kube_managed: "true", ann.backend_type: attrs.backend_type}
    if ipv4:
        out[ann.backend_data] = attrs.backend_data or NULL_BACKEND_DATA
        out[ann.public_ip] = v4
    if ipv6 and v6 is not None:
        out[ann.backend_v6_data] = attrs.backend_v6_data or NULL_BACKEND_DATA
        out[ann.public_ipv6] = v6
    return out


def annotations_patch(node: Mapping[str, Any], ann: Annotations, attrs: LeaseAttrs, *,
                      ipv4: bool = True, ipv6: bool = False) -> dict[str, Any] | None:
    """A strategic-merge patch body for nodes/<name>/status with only the annotations that
    differ, or None when the node already says everything (no write at all)."""
    have = node_annotations(node)
    want = wanted_annotations(node, ann, attrs, ipv4=ipv4, ipv6=ipv6)
    diff = {k: v for k, v in want.items() if have.get(k) != v}
    if not diff:
        return None
    return {"metadata": {"annotations": diff}}


def node_public_ip_override(node: Mapping[str, Any], ann: Annotations
                            ) -> tuple[IPv4Address | None, IPv6Address | None]:
    """The node-public-ip(v6) annotations, which override --public-ip(v6) at start-up."""
    a = node_annotations(node)
    v4 = _override(a, ann.node_public_ip, 4)
    v6 = _override(a, ann.node_public_ipv6, 6)
    return (IPv4Address(v4) if v4 else None, IPv6Address(v6) if v6 else None)


def network_available_patch(now: datetime | None = None) -> dict[str, Any]:
    """Strategic-merge patch that sets NetworkUnavailable=False (conditions merge by type,
    so the kubelet's other conditions stay)."""
    ts = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": ts, "lastHeartbeatTime": ts}]}}


def network_condition(node: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "NetworkUnavailable":
            return dict(cond)
    return None
