"""The seam between the daemon and a lease store (etcd or the Kubernetes API): five
methods, and the seam's own errors, which each store maps its client's errors to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from pyflannel.config.netconf import NetConf
from pyflannel.lease.events import LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs, StoredNodeState


class StoreError(Exception):
    """A store problem; the message is one line that says what to do. `retryable`: the
    store may come back (an etcd outage), as opposed to a fix someone must make."""

    retryable = False


class LeaseRevoked(StoreError):
    """Our own lease was taken away (etcd: deleted or expired; kube: our podCIDR changed)."""


@dataclass(frozen=True)
class NodeConfig:
    """What the store says before we choose an interface: the network config and the
    public addresses it sets for this node (kube: the node-public-ip annotations), which
    win over --public-ip / --public-ipv6."""

    netconf: NetConf
    public_ip: IPv4Address | None = None
    public_ipv6: IPv6Address | None = None


# Called by acquire_lease with what the store remembers of this node; returns our lease
# attributes (the backend registers its devices with the remembered VTEP MACs meanwhile).
LeaseSetup = Callable[[StoredNodeState], Awaitable[LeaseAttrs]]


class SubnetManager(Protocol):
    name: str  # "etcd" | "kube"

    @property
    def description(self) -> str:
        """For upstream's "Created subnet manager: ..." line."""
        ...

    @property
    def watch_reconnects(self) -> int:
        """Times the lease watch was re-established (flannel_watch_reconnects_total)."""
        ...

    @property
    def watch_down_since(self) -> float | None:
        """time.monotonic() since when the lease watch has been failing; None while up."""
        ...

    async def node_config(self) -> NodeConfig: ...

    async def acquire_lease(self, netconf: NetConf, attrs: LeaseAttrs,
                            setup: LeaseSetup | None = None) -> Lease:
        """Our lease. `attrs` holds the public IPs it is found by; `setup`, called once with
        what the store remembers of this node, gives the attributes to publish (None: `attrs`
        as they are)."""
        ...

    def updates(self) -> AsyncIterator[LeaseUpdate]:
        """A snapshot first (and after any gap in history), then changes."""
        ...

    async def keep_lease(self, lease: Lease) -> None:
        """Runs while the lease is ours (etcd renews it); raises LeaseRevoked when it is
        taken away."""
        ...

    async def aclose(self) -> None: ...
