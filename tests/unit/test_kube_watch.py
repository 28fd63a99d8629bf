"""NodeFollower: list + watch of Nodes as leases, against an in-memory API that behaves
as the apiserver's list (pages) and watch (resourceVersion, bookmarks, 410)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from pyflannel.lease.events import LeaseChanges, LeaseSnapshot, LeaseUpdate
from pyflannel.subnet import backoff as backoff_mod
from pyflannel.subnet.kube.annotations import Annotations
from pyflannel.subnet.kube.api import KubeApi, NodeListPage
from pyflannel.subnet.kube.errors import KubeApiError
from pyflannel.subnet.kube.nodes import node_lease
from pyflannel.subnet.kube.watch import NodeFollower

ANN = Annotations.for_prefix()
P = "flannel.alpha.coreos.com/"


def mk(name: str, cidr: str, ip: str, *, managed: bool = True) -> dict[str, Any]:
    ann = {P + "kube-subnet-manager": "true", P + "backend-type": "host-gw",
           P + "backend-data": "null", P + "public-ip": ip} if managed else {}
    return {"metadata": {"name": name, "annotations": ann}, "spec": {"podCIDR": cidr}}


class FakeApi:
    """Nodes with a resourceVersion history; watch() serves events after an RV until
    the history is cut (compact()), then answers 410 like the apiserver."""

    def __init__(self) -> None:
        self.rv = 100
        self.nodes: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.oldest = 100
        self.new_events = asyncio.Condition()
        self.list_calls: list[tuple[int, str]] = []
        self.watch_calls: list[str] = []
        self.fail_watches = 0
        self.end_watch = asyncio.Event()
        self.end_after_bookmark = False

    async def _record(self, typ: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append((self.rv, typ, obj))
        async with self.new_events:
            self.new_events.notify_all()

    async def put(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        typ = "MODIFIED" if name in self.nodes else "ADDED"
        self.nodes[name] = obj
        await self._record(typ, obj)

    async def delete(self, name: str) -> None:
        await self._record("DELETED", self.nodes.pop(name))

    async def bookmark(self) -> None:
        await self._record("BOOKMARK", {"metadata": {}})

    def compact(self) -> None:
        self.oldest = self.rv
        self.history = []

    async def list_nodes(self, *, limit: int = 500, continue_token: str = "",
                         resource_version: str | None = None) -> NodeListPage:
        self.list_calls.append((limit, continue_token))
        names = sorted(self.nodes)
        start = int(continue_token or 0)
        end = len(names) if limit == 0 else start + limit
        items = [copy.deepcopy(self.nodes[n]) for n in names[start:end]]
        return NodeListPage(items, str(self.rv), str(end) if end < len(names) else "")

    async def watch_nodes(self, resource_version: str, *, timeout_seconds: int = 300
                          ) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        self.watch_calls.append(resource_version)
        if self.fail_watches:
            self.fail_watches -= 1
            raise KubeApiError("watch nodes: cannot reach the API server")
        rv = int(resource_version)
        if rv < self.oldest:
            raise KubeApiError("watch nodes: 410 Expired: too old resource version",
                               status=410)
        while True:
            for ev_rv, typ, obj in list(self.history):
                if ev_rv > rv:
                    rv = ev_rv
                    yield typ, copy.deepcopy(obj)
                    if typ == "BOOKMARK" and self.end_after_bookmark:
                        return  # the server ends the watch (timeoutSeconds)
            if self.end_watch.is_set():
                self.end_watch.clear()
                return
            if rv < self.oldest:
                raise KubeApiError("watch nodes: 410 Gone", status=410)
            async with self.new_events:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.new_events.wait(), 0.05)


def follower(api: FakeApi, page_size: int = 2) -> NodeFollower:
    return NodeFollower(cast(KubeApi, api), lambda n: node_lease(n, ANN), page_size=page_size)


async def next_update(it: AsyncGenerator[LeaseUpdate, None]) -> LeaseUpdate:
    return await asyncio.wait_for(anext(it), 5)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backoff_mod, "RECONNECT_MIN", 0.001)


async def test_paged_list_then_snapshot() -> None:
    api = FakeApi()
    for i in range(5):
        await api.put(mk(f"n{i}", f"10.244.{i}.0/24", f"192.168.0.{i + 1}"))
    await api.put(mk("bare", "10.244.9.0/24", "", managed=False))
    f = follower(api)
    it = f.updates()
    snap = await next_update(it)
    assert isinstance(snap, LeaseSnapshot)
    assert sorted(lease.key for lease in snap.leases) == [f"10.244.{i}.0-24" for i in range(5)]
    assert [c[0] for c in api.list_calls] == [2, 2, 2]  # 6 nodes in pages of 2
    assert f.resource_version == str(api.rv)
    await it.aclose()


async def test_watch_add_change_delete_and_podcidr_change() -> None:
    api = FakeApi()
    await api.put(mk("n1", "10.244.1.0/24", "192.168.0.1"))
    it = follower(api).updates()
    assert isinstance(await next_update(it), LeaseSnapshot)

    await api.put(mk("n2", "10.244.2.0/24", "192.168.0.2"))
    up = await next_update(it)
    assert isinstance(up, LeaseChanges) and [x.key for x in up.upserted] == ["10.244.2.0-24"]

    # A heartbeat-like change (other fields) is no event; a public-ip change is.
    hb = mk("n2", "10.244.2.0/24", "192.168.0.2")
    hb["status"] = {"conditions": [{"type": "Ready"}]}
    await api.put(hb)
    await api.put(mk("n2", "10.244.2.0/24", "192.168.0.22"))
    up = await next_update(it)
    assert isinstance(up, LeaseChanges) and not up.removed
    assert str(up.upserted[0].attrs.public_ip) == "192.168.0.22"

    # Re-registered with another podCIDR: the old lease goes (by node name), the new one
    # comes.
    await api.delete("n2")
    up = await next_update(it)
    assert up == LeaseChanges(removed=("n2",))
    await api.put(mk("n2", "10.244.7.0/24", "192.168.0.22"))
    up = await next_update(it)
    assert isinstance(up, LeaseChanges) and up.upserted[0].key == "10.244.7.0-24"

    # podCIDR changed in place (upstream ignores this): the node's lease is replaced under
    # its name (the table reprograms it).
    await api.put(mk("n1", "10.244.8.0/24", "192.168.0.1"))
    up = await next_update(it)
    assert isinstance(up, LeaseChanges) and not up.removed
    assert up.upserted[0].key == "10.244.8.0-24" and up.upserted[0].ident == "n1"

    # Losing the flannel annotation removes the lease.
    await api.put(mk("n1", "10.244.8.0/24", "", managed=False))
    assert await next_update(it) == LeaseChanges(removed=("n1",))
    await it.aclose()


async def test_bookmarks_move_the_resume_point() -> None:
    api = FakeApi()
    f = follower(api)
    it = f.updates()
    assert isinstance(await next_update(it), LeaseSnapshot)
    await api.put(mk("n1", "10.244.1.0/24", "192.168.0.1"))
    await next_update(it)
    api.end_after_bookmark = True
    await api.bookmark()
    bookmark_rv = api.rv
    await api.put(mk("n2", "10.244.2.0/24", "192.168.0.2"))
    await next_update(it)
    assert str(bookmark_rv) in api.watch_calls
    assert len(api.list_calls) == 1  # resumed, not relisted
    await it.aclose()


async def test_gone_relists_and_snapshot_drops_nodes_deleted_meanwhile() -> None:
    api = FakeApi()
    for i in range(3):
        await api.put(mk(f"n{i}", f"10.244.{i}.0/24", f"192.168.0.{i + 1}"))
    f = follower(api)
    it = f.updates()
    assert len(cast(LeaseSnapshot, await next_update(it)).leases) == 3
    # While we are disconnected: n1 deleted, history compacted, resume point gone.
    api.fail_watches = 2
    await api.delete("n1")
    api.compact()
    snap = await next_update(it)
    assert isinstance(snap, LeaseSnapshot)
    assert sorted(x.key for x in snap.leases) == ["10.244.0.0-24", "10.244.2.0-24"]
    assert f.relists == 2
    await it.aclose()


async def test_reconnect_after_errors_resumes_without_loss() -> None:
    api = FakeApi()
    f = follower(api)
    it = f.updates()
    await next_update(it)
    api.fail_watches = 3
    api.end_watch.set()
    await api.put(mk("n5", "10.244.5.0/24", "192.168.0.5"))
    up = await next_update(it)
    assert isinstance(up, LeaseChanges) and up.upserted[0].key == "10.244.5.0-24"
    assert f.relists == 1
    await it.aclose()


async def test_many_nodes_stream_in_pages() -> None:
    api = FakeApi()
    for i in range(3000):
        await api.put(mk(f"n{i:05d}", f"10.{i // 256}.{i % 256}.0/24", "192.168.0.1"))
    f = follower(api, page_size=500)
    it = f.updates()
    snap = await next_update(it)
    assert isinstance(snap, LeaseSnapshot) and len(snap.leases) == 3000
    assert len(api.list_calls) == 6
    await it.aclose()


async def test_own_node_hook_sees_own_events() -> None:
    api = FakeApi()
    await api.put(mk("me", "10.244.1.0/24", "192.168.0.1"))
    seen: list[tuple[str, bool]] = []
    f = NodeFollower(cast(KubeApi, api), lambda n: node_lease(n, ANN), own_node="me",
                     on_own_node=lambda t, n: seen.append((t, n is not None)))
    it = f.updates()
    await next_update(it)
    await api.delete("me")
    await next_update(it)
    assert seen == [("LIST", True), ("DELETED", False)]
    await it.aclose()
