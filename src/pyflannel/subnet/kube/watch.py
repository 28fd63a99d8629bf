"""Following every Node with list + watch, as leases (our own informer loop).

- The first list (and every relist) is read in pages (`limit`/`continue`), each page turned
  into leases at once, so memory holds leases, never thousands of Node objects; then
  one LeaseSnapshot.
- The watch resumes from the last resourceVersion seen (bookmarks included), so a
  reconnect after a dropped stream or an API server restart loses nothing; 410 Gone
  (history compacted) relists and yields a fresh snapshot, which removes the nodes
  deleted meanwhile.
- Events are turned into LeaseChanges one at a time while the consumer pulls them: the
  HTTP stream itself is the buffer, so nothing queues up without bound.
- Unlike upstream (§14.8) a podCIDR change (a node re-registered under the same name) replaces
  the node's lease, and a public-ip change reprograms peers.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.lease.model import Lease
from pyflannel.subnet.backoff import RECONNECT_MAX, ReconnectBackoff
from pyflannel.subnet.kube.api import KubeApi
from pyflannel.subnet.kube.errors import KubeApiError, KubePermissionError
from pyflannel.subnet.kube.nodes import NodeLeaseError, node_name

log = logging.getLogger(__name__)

# RBAC is fixed by a person, not in milliseconds: no need to ask every 5 s.
PERMISSION_RETRY_MAX = 30.0
# client-go's reflector picks a watch timeout between 5 and 10 minutes.
WATCH_TIMEOUT_MIN = 300

NodeToLease = Callable[[dict[str, Any]], Lease | None]
OwnNodeHook = Callable[[str, dict[str, Any] | None], None]


class NodeFollower:
    """Node name -> lease, kept current; `updates()` yields what changed."""

    def __init__(self, api: KubeApi, to_lease: NodeToLease, *, own_node: str = "",
                 on_own_node: OwnNodeHook | None = None, page_size: int = 500,
                 rng: random.Random | None = None) -> None:
        self.api = api
        self.to_lease = to_lease
        self.own_node = own_node
        self.on_own_node = on_own_node
        self.page_size = page_size
        self.leases: dict[str, Lease] = {}
        self.resource_version: str | None = None
        self.relists = 0
        self.reconnects = 0
        self._rng = rng or random.Random()
        self._bad: dict[str, str] = {}  # node -> last problem logged
        self.backoff = ReconnectBackoff("Node watch", log, level=logging.ERROR)

    # -- node -> lease -----------------------------------------------------------------
    def _lease(self, node: dict[str, Any]) -> Lease | None:
        name = node_name(node)
        try:
            lease = self.to_lease(node)
        except NodeLeaseError as e:
            if self._bad.get(name) != str(e):
                log.warning("Error turning node %r to lease: %s", name, e)
                self._bad[name] = str(e)
            return None
        self._bad.pop(name, None)
        return lease

    def _own(self, typ: str, node: dict[str, Any] | None) -> None:
        if self.on_own_node is not None:
            self.on_own_node(typ, node)

    # -- list --------------------------------------------------------------------------
    async def _list(self) -> LeaseSnapshot:
        """All nodes, page by page, as a snapshot; sets the resume resourceVersion."""
        leases: dict[str, Lease] = {}
        limit = self.page_size
        token = ""
        own_seen = False
        while True:
            try:
                page = await self.api.list_nodes(limit=limit, continue_token=token)
            except KubeApiError as e:
                if e.gone and token:
                    # The continue token outlived the server's history: start over with
                    # one unpaged list (client-go does the same).
                    log.warning("Node list continue token expired; listing in one piece")
                    leases.clear()
                    limit, token = 0, ""
                    continue
                raise
            for node in page.items:
                name = node_name(node)
                if name == self.own_node:
                    own_seen = True
                    self._own("LIST", node)
                lease = self._lease(node)
                if lease is not None:
                    leases[name] = lease
            token = page.continue_token
            if not token:
                self.resource_version = page.resource_version
                break
        if self.own_node and not own_seen:
            self._own("DELETED", None)
        self.leases = leases
        self.relists += 1
        return LeaseSnapshot(tuple(leases.values()))

    # -- watch -------------------------------------------------------------------------
    def _apply(self, typ: str, node: dict[str, Any]) -> LeaseChanges | None:
        name = node_name(node)
        if name == self.own_node:
            self._own(typ, None if typ == "DELETED" else node)
        old = self.leases.get(name)
        new = None if typ == "DELETED" else self._lease(node)
        if typ == "DELETED":
            self._bad.pop(name, None)
        if new is None:
            if old is None:
                return None
            del self.leases[name]
            return LeaseChanges(removed=(old.ident,))
        self.leases[name] = new
        if old == new:
            return None  # a heartbeat or any other change flannel does not care about
        # A new podCIDR is the same Node's lease: the table replaces it under its name.
        return LeaseChanges(upserted=(new,))

    async def updates(self) -> AsyncGenerator[LeaseUpdate, None]:
        """A snapshot, then changes; again a snapshot after a 410. Never ends, never
        gives up (errors are logged once and retried with backoff)."""
        backoff = self.backoff
        watched = False
        while True:
            try:
                if self.resource_version is None:
                    snapshot = await self._list()
                    backoff.succeeded()
                    log.info("Node list: %d nodes with flannel leases (resourceVersion %s)",
                             len(snapshot.leases), self.resource_version)
                    yield snapshot
                assert self.resource_version is not None
                if watched:
                    self.reconnects += 1
                watched = True
                timeout = WATCH_TIMEOUT_MIN + self._rng.randrange(WATCH_TIMEOUT_MIN)
                started, events = time.monotonic(), 0
                async with contextlib.aclosing(self.api.watch_nodes(
                        self.resource_version, timeout_seconds=timeout)) as stream:
                    async for typ, node in stream:
                        events += 1
                        backoff.succeeded()
                        rv = (node.get("metadata") or {}).get("resourceVersion")
                        if rv:
                            self.resource_version = str(rv)
                        if typ == "BOOKMARK":
                            continue
                        changes = self._apply(typ, node)
                        if changes is not None:
                            yield changes
                if events == 0 and time.monotonic() - started < 1.0:
                    # A server that ends watches at once would otherwise make this a
                    # busy loop.
                    raise KubeApiError("watch nodes: the server ended the watch at once")
            except KubeApiError as e:
                if e.gone:
                    log.warning("Node watch: resourceVersion %s is too old (%s); relisting",
                                self.resource_version, e)
                    self.resource_version = None
                    continue
                await backoff.fail(e, max_delay=PERMISSION_RETRY_MAX
                                   if isinstance(e, KubePermissionError) else RECONNECT_MAX)
