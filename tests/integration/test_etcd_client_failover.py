"""EtcdClient against a member that accepts connections but never answers (SIGSTOP: the
kernel still completes the TCP handshake): requests are bounded and move on, and a watch
streaming from it is abandoned by the watchdog. Two single-member etcds on loopback stand
for two members (their data differ, which shows which one answered)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator

import pytest

from pyflannel.subnet.etcd.client import (
    WATCH_PROBE_INTERVAL,
    WATCH_PROBE_TIMEOUT,
    EtcdClient,
    EtcdError,
)
from pyflannel_lab.etcd import EtcdServer

pytestmark = [
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (scripts/setup.sh)"),
    pytest.mark.etcd,
]


@pytest.fixture
def pair() -> Iterator[tuple[EtcdServer, EtcdServer]]:
    with EtcdServer(name="a") as a, EtcdServer(name="b") as b:
        try:
            yield a, b
        finally:
            if a.pid is not None:
                os.kill(a.pid, signal.SIGCONT)  # stop() needs it running


def pause(server: EtcdServer) -> None:
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)


async def test_a_read_moves_past_a_paused_member_and_a_write_is_not_repeated(
        pair: tuple[EtcdServer, EtcdServer]) -> None:
    a, b = pair
    a.etcdctl("put", "/k", "from-a")
    b.etcdctl("put", "/k", "from-b")
    c = EtcdClient([a.client_url, b.client_url], timeout=1.0)
    try:
        kv = await c.get("/k")
        assert kv is not None and kv.value == b"from-a"
        pause(a)
        kv = await c.get("/k")  # a's read timed out: asked again of b
        assert kv is not None and kv.value == b"from-b"
        assert await c.put("/w", b"1") > 0  # b is current now: straight there
    finally:
        await c.aclose()
    # A write whose fate on `a` is unknown is not sent to b as well: it fails, and the
    # next request starts at b.
    c = EtcdClient([a.client_url, b.client_url], timeout=1.0)
    try:
        with pytest.raises(EtcdError, match=f"kv/txn to {a.client_url} failed"):
            await c.create("/new", b"x")
        assert await c.create("/new", b"x") > 0  # the creating revision
        assert b.etcdctl("get", "/new", "--print-value-only").stdout.strip() == "x"
    finally:
        await c.aclose()


async def test_a_watch_on_a_member_that_stops_answering_is_abandoned(
        pair: tuple[EtcdServer, EtcdServer]) -> None:
    a, b = pair
    c = EtcdClient([a.client_url, b.client_url])
    try:
        stream = c.watch("/w/", start_revision=1)
        assert await anext(stream) == ([], 0)  # created, on a
        b.etcdctl("put", "/w/x", "on-b")
        pause(a)
        t0 = time.monotonic()
        # Bounded well below TCP keepalive's minute, which is all there was before.
        with pytest.raises(EtcdError, match=f"watch stream from {a.client_url} abandoned"):
            async with asyncio.timeout(20):
                await anext(stream)
        print(f"\nwatch on a paused member abandoned after {time.monotonic() - t0:.2f}s "
              f"(probe every {WATCH_PROBE_INTERVAL}s, {WATCH_PROBE_TIMEOUT}s to answer)")
        await stream.aclose()
        # Resumed from the same revision, it streams from b.
        stream = c.watch("/w/", start_revision=1)
        assert await anext(stream) == ([], 0)
        events, _ = await anext(stream)
        assert [(e.kv.key, e.kv.value) for e in events] == [("/w/x", b"on-b")]
        await stream.aclose()
    finally:
        await c.aclose()
