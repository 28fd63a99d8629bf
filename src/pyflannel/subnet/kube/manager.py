"""The Kubernetes subnet manager: upstream's kube subnet manager (reference §5) on our
own list/watch loop.

The lease is the node's podCIDR(s); what flannel publishes goes into the node's
annotations through the nodes/status subresource (upstream's ClusterRole grants only
that), written only when something differs. Beyond upstream:
- a podCIDR change of a peer is reprogrammed (§14.8), and a change of our own podCIDR
  (the Node re-registered) ends keep_lease with NodeLeaseLost so the daemon restarts
  onto it;
- our annotations are restored when someone removes them or the Node is re-created;
- routes to nodes deleted while we were down go with the first snapshot (the daemon's
  reconciler removes what no lease asks for).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pyflannel.config.flags import ConfigError
from pyflannel.config.netconf import NetConf, parse_netconf
from pyflannel.lease.events import LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState
from pyflannel.subnet.base import LeaseRevoked, LeaseSetup, NodeConfig
from pyflannel.subnet.kube.annotations import Annotations
from pyflannel.subnet.kube.api import KubeApi, load_config
from pyflannel.subnet.kube.errors import KubeApiError, KubeError
from pyflannel.subnet.kube.nodes import (
    NodeLeaseError,
    annotations_patch,
    network_available_patch,
    network_condition,
    node_annotations,
    node_lease,
    node_public_ip_override,
    pod_cidrs,
)
from pyflannel.subnet.kube.watch import NodeFollower

log = logging.getLogger(__name__)

LEASE_TTL = 24 * 3600  # upstream: Expiration = now + 24 h, never renewed
PODCIDR_WAIT = 30.0  # upstream polls the node for 30 s ...
PODCIDR_POLL = 3.0  # ... every 3 s
# How long start-up calls retry an API server that is unreachable or overloaded
# (upstream waits up to 10 minutes for its informer to sync).
STARTUP_RETRY_FOR = 600.0

T = TypeVar("T")

NO_PODCIDR_HELP = (
    "give the node a podCIDR: run kube-controller-manager with --allocate-node-cidrs=true "
    "--cluster-cidr=<Network of net-conf.json> (kubeadm: kubeadm init "
    "--pod-network-cidr=<Network>), or set it by hand: kubectl patch node {node} -p "
    "'{{\"spec\":{{\"podCIDR\":\"<a subnet of Network>\"}}}}'")


class NodeLeaseLost(LeaseRevoked):
    """Our node's podCIDR is no longer the one we hold (the Node was re-registered)."""


def _transient(e: KubeApiError) -> bool:
    # 0: no answer at all; 429/5xx: the server is overloaded or starting.
    return e.status == 0 or e.status == 429 or e.status >= 500


def read_netconf(path: str) -> NetConf:
    """net-conf.json, read once at start-up as upstream does (the ConfigMap mount)."""
    try:
        text = Path(path).read_bytes()  # decoded as Go does: invalid UTF-8 is not an error
    except OSError as e:
        raise KubeError(f"failed to read net conf {path}: {e.strerror or e}") from None
    try:
        return parse_netconf(text)
    except (ConfigError, ValueError) as e:
        raise KubeError(f"error parsing subnet config {path}: {e}") from None


def resolve_node_name(env: Mapping[str, str]) -> str | tuple[str, str]:
    """NODE_NAME, else (POD_NAMESPACE, POD_NAME) whose spec.nodeName is looked up."""
    if env.get("NODE_NAME"):
        return env["NODE_NAME"]
    pod, ns = env.get("POD_NAME", ""), env.get("POD_NAMESPACE", "")
    if not pod or not ns:
        raise KubeError("env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)")
    return ns, pod


class KubeSubnetManager:
    """Implements SubnetManager on the Kubernetes API. Owns `api`: aclose() closes it."""

    name = "kube"

    def __init__(self, api: KubeApi, netconf: NetConf, node: str | tuple[str, str], *,
                 annotations: Annotations | None = None,
                 set_node_network_unavailable: bool = True, page_size: int = 500) -> None:
        self.api = api
        self.netconf = netconf
        self.annotations = annotations or Annotations.for_prefix()
        self.set_node_network_unavailable = set_node_network_unavailable
        self._node = node
        self._node_name: str | None = node if isinstance(node, str) else None
        self._node_cache: dict[str, Any] | None = None
        self._attrs: LeaseAttrs | None = None
        self._lease: Lease | None = None
        self._own_event = asyncio.Event()
        self._own_latest: dict[str, Any] | None = None
        self._own_seen = False
        self.follower = NodeFollower(api, self._to_lease, on_own_node=self._on_own_node,
                                     page_size=page_size)

    @classmethod
    def from_flags(cls, *, kubeconfig_file: str, kube_api_url: str, net_config_path: str,
                   annotation_prefix: str, set_node_network_unavailable: bool,
                   env: Mapping[str, str] | None = None) -> KubeSubnetManager:
        """Everything upstream's NewSubnetManager checks before any request."""
        annotations = Annotations.for_prefix(annotation_prefix)
        node = resolve_node_name(os.environ if env is None else env)
        netconf = read_netconf(net_config_path)
        api = KubeApi(load_config(kubeconfig_file, kube_api_url))
        return cls(api, netconf, node, annotations=annotations,
                   set_node_network_unavailable=set_node_network_unavailable)

    # -- helpers -----------------------------------------------------------------------
    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call`, retried while the API server is unreachable or overloaded."""
        deadline = time.monotonic() + STARTUP_RETRY_FOR
        delay, last = 0.2, ""
        while True:
            try:
                return await call()
            except KubeApiError as e:
                if not _transient(e) or time.monotonic() > deadline:
                    raise
                if str(e) != last:
                    log.warning("%s: %s (retrying)", what, e)
                    last = str(e)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def node_name(self) -> str:
        if self._node_name is None:
            assert not isinstance(self._node, str)
            ns, pod = self._node  # resolve_node_name returned the pod to look up
            try:
                obj = await self._retry("get pod", lambda: self.api.get_pod(ns, pod))
            except KubeApiError as e:
                raise KubeError(f"error retrieving pod spec for '{ns}/{pod}': {e}") from None
            name = (obj.get("spec") or {}).get("nodeName")
            if not name:
                raise KubeError(f"pod '{ns}/{pod}' has no spec.nodeName (not scheduled?)")
            self._node_name = str(name)
            self.follower.own_node = self._node_name
        return self._node_name

    async def _get_node(self, *, fresh: bool = False) -> dict[str, Any]:
        name = await self.node_name()
        self.follower.own_node = name
        if self._node_cache is None or fresh:
            try:
                self._node_cache = await self._retry("get node",
                                                     lambda: self.api.get_node(name))
            except KubeApiError as e:
                if e.status == 404:
                    raise KubeError(f"node {name!r} not found: flanneld runs on a registered "
                                    "node (is NODE_NAME right?)") from None
                raise
        return self._node_cache

    def _to_lease(self, node: dict[str, Any]) -> Lease | None:
        return node_lease(node, self.annotations, ipv4=self.netconf.enable_ipv4,
                          ipv6=self.netconf.enable_ipv6)

    # -- SubnetManager -----------------------------------------------------------------
    @property
    def description(self) -> str:
        node = self._node_name or "/".join(self._node)
        return f"Kubernetes Subnet Manager - {node}"

    async def node_config(self) -> NodeConfig:
        """net-conf.json (read at start-up, as upstream) and the node-public-ip annotations."""
        v4, v6 = node_public_ip_override(await self._get_node(), self.annotations)
        if v4 or v6:
            log.info("Node annotations %s / %s override the public IP: %s %s",
                     self.annotations.node_public_ip, self.annotations.node_public_ipv6,
                     v4 or "-", v6 or "-")
        return NodeConfig(self.netconf, v4, v6)

    def _remembered(self, node: dict[str, Any], backend_type: str) -> StoredNodeState:
        """Our previous backend data, from our node's annotations (keeps a VTEP MAC)."""
        a = node_annotations(node)
        ann = self.annotations
        if a.get(ann.backend_type) != backend_type:
            return StoredNodeState()
        data = {k: v for k, v in ((ann.backend_data, a.get(ann.backend_data)),
                                  (ann.backend_v6_data, a.get(ann.backend_v6_data)))
                if v and v != "null"}
        return StoredNodeState(backend_data=data.get(ann.backend_data, ""),
                               backend_v6_data=data.get(ann.backend_v6_data, ""))

    async def _node_with_podcidr(self) -> dict[str, Any]:
        node = await self._get_node(fresh=True)
        deadline = time.monotonic() + PODCIDR_WAIT
        while True:
            cidrs = pod_cidrs(node)
            if cidrs.v4 is not None or cidrs.v6 is not None:
                return node
            if time.monotonic() >= deadline:
                name = await self.node_name()
                raise KubeError(f'node "{name}" pod cidr not assigned: '
                                + NO_PODCIDR_HELP.format(node=name))
            log.info("Waiting for node %r to get a podCIDR", await self.node_name())
            await asyncio.sleep(PODCIDR_POLL)
            node = await self._get_node(fresh=True)

    async def acquire_lease(self, netconf: NetConf, attrs: LeaseAttrs,
                            setup: LeaseSetup | None = None) -> Lease:
        name = await self.node_name()
        if setup is not None:
            attrs = await setup(self._remembered(await self._get_node(), attrs.backend_type))
        try:
            node = await self._node_with_podcidr()
            cidrs = pod_cidrs(node)
        except NodeLeaseError as e:
            raise KubeError(str(e)) from None
        subnet = cidrs.v4 if netconf.enable_ipv4 else None
        subnet6 = cidrs.v6 if netconf.enable_ipv6 else None
        if netconf.enable_ipv4:
            if subnet is None:
                raise KubeError(f"node {name!r} has no IPv4 podCIDR (EnableIPv4 is on)")
            if netconf.network is None or not subnet.subnet_of(netconf.network):
                raise KubeError(f"subnet {str(netconf.network)!r} specified in the flannel net "
                                f"config doesn't contain {str(subnet)!r} PodCIDR of the "
                                f"{name!r} node")
        if netconf.enable_ipv6:
            if subnet6 is None:
                raise KubeError(f"node {name!r} has no IPv6 podCIDR (EnableIPv6 is on)")
            if netconf.ipv6_network is None or not subnet6.subnet_of(netconf.ipv6_network):
                raise KubeError(f"subnet {str(netconf.ipv6_network)!r} specified in the flannel "
                                f"net config doesn't contain {str(subnet6)!r} IPv6 PodCIDR "
                                f"of the {name!r} node")
        self._attrs = attrs
        await self._ensure_annotations(node)
        self._lease = Lease(subnet=subnet, attrs=attrs, ipv6_subnet=subnet6,
                            expiration=time.time() + LEASE_TTL, origin=name, node=name)
        return self._lease

    async def _ensure_annotations(self, node: dict[str, Any]) -> bool:
        """Patch what differs; True when a patch was sent."""
        assert self._attrs is not None
        body = annotations_patch(node, self.annotations, self._attrs,
                                 ipv4=self.netconf.enable_ipv4, ipv6=self.netconf.enable_ipv6)
        if body is None:
            return False
        name = await self.node_name()
        self._node_cache = await self._retry(
            "patch node annotations", lambda: self.api.patch_node_status(name, body))
        log.info("Node %r annotations updated: %s", name,
                 ", ".join(sorted(body["metadata"]["annotations"])))
        return True

    async def _ensure_condition(self, node: dict[str, Any] | None) -> None:
        cond = network_condition(node) if node is not None else None
        if cond is not None and cond.get("status") == "False":
            return
        name = await self.node_name()
        await self._retry("patch node condition",
                          lambda: self.api.patch_node_status(name, network_available_patch()))
        log.info("Node %r: NetworkUnavailable=False (FlannelIsUp)", name)

    def updates(self) -> AsyncIterator[LeaseUpdate]:
        return self.follower.updates()

    @property
    def watch_down_since(self) -> float | None:
        return self.follower.backoff.failing_since

    @property
    def watch_reconnects(self) -> int:
        return self.follower.reconnects

    def _on_own_node(self, typ: str, node: dict[str, Any] | None) -> None:
        self._own_latest = node
        self._own_seen = True
        self._own_event.set()

    async def keep_lease(self, lease: Lease) -> None:
        """Upstream's CompleteLease (the NetworkUnavailable condition), then: keep our
        annotations in place, and end with NodeLeaseLost if our podCIDR changes."""
        if self.set_node_network_unavailable:
            try:
                # Written only when not already False: a restart writes nothing.
                await self._ensure_condition(self._node_cache)
            except KubeApiError as e:
                log.error("Failed to set the NetworkUnavailable condition: %s", e)
        name = await self.node_name()
        while True:
            await self._own_event.wait()
            self._own_event.clear()
            node = self._own_latest
            if node is None:
                log.warning("Node %r was deleted; keeping routes and waiting for it to be "
                            "registered again", name)
                continue
            try:
                cidrs = pod_cidrs(node)
            except NodeLeaseError as e:
                log.warning("%s", e)
                continue
            if cidrs.v4 is None and cidrs.v6 is None:
                continue  # re-registered, podCIDR not assigned yet
            have = (cidrs.v4 if self.netconf.enable_ipv4 else None,
                    cidrs.v6 if self.netconf.enable_ipv6 else None)
            if have != (lease.subnet, lease.ipv6_subnet):
                log.error("Node %r podCIDR changed from %s to %s; exiting to take the new one",
                          name, lease.subnet or lease.ipv6_subnet, have[0] or have[1])
                raise NodeLeaseLost(f"node {name!r} podCIDR changed")
            try:
                await self._ensure_annotations(node)
                if self.set_node_network_unavailable:
                    await self._ensure_condition(node)
            except KubeApiError as e:
                log.error("Failed to restore node %r annotations: %s", name, e)

    async def aclose(self) -> None:
        await self.api.aclose()
