"""The seam between the daemon and a lease store (etcd or the Kubernetes API)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from pyflannel.backend.base import StoredNodeState
from pyflannel.config.netconf import NetConf
from pyflannel.lease.events import LeaseUpdate
from pyflannel.lease.model import Lease, LeaseAttrs


class SubnetManager(Protocol):
    name: str

    async def network_config(self) -> NetConf: ...

    async def public_ip_override(self) -> tuple[IPv4Address | None, IPv6Address | None]:
        """Public addresses the store sets for this node (kube: the node-public-ip
        annotations), which win over --public-ip / --public-ipv6."""
        ...

    async def stored_state(self, attrs: LeaseAttrs) -> StoredNodeState:
        """What the store remembers of this node (its previous backend data)."""
        ...

    async def acquire_lease(self, netconf: NetConf, attrs: LeaseAttrs) -> Lease: ...

    def updates(self) -> AsyncIterator[LeaseUpdate]:
        """A snapshot first (and after any gap in history), then changes."""
        ...

    @property
    def watch_down_since(self) -> float | None:
        """time.monotonic() since when the lease watch has been failing; None while up."""
        ...

    async def keep_lease(self, lease: Lease) -> None:
        """Runs while the lease is ours (etcd renews it); raises LeaseRevoked when it is
        taken away."""
        ...

    async def aclose(self) -> None: ...
