"""An asyncio etcd v3 client over etcd's JSON gateway (`/v3/...`), on http.py's client.

Why not gRPC: see the python-libs reference §2 (no grpcio/protobuf, explicit compaction
errors, stdlib TLS). Gateway quirks handled here: keys and values are base64, int64s
travel as JSON strings, and proto3 omits default values (`succeeded: false`, event type
PUT, empty `kvs`), so every field is read with a default.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from pyflannel.subnet.base import StoreError
from pyflannel.subnet.etcd import http

log = logging.getLogger(__name__)
T = TypeVar("T")

# gRPC status codes etcd puts in gateway errors.
_CODE_OUT_OF_RANGE = 11  # compacted revision
_CODE_UNAUTHENTICATED = 16
_AUTH_ERRORS = ("invalid auth token", "user name is empty", "auth token is expired")

# Failover bounds. A dead member refuses the connection at once, but a partitioned one
# never answers the SYN and a paused (SIGSTOPped) one completes the handshake in the
# kernel and then never answers: each attempt must end quickly so the next endpoint is
# tried. etcd answers a healthy connect in microseconds, hence the short connect bound.
CONNECT_TIMEOUT = 2.0
# A watch stream is checked by a probe to its member every WATCH_PROBE_INTERVAL seconds,
# given WATCH_PROBE_TIMEOUT to answer (see _Watchdog): a silent member is left within
# interval + timeout (3 s), so the watch resumes elsewhere within flannel's 5 s.
WATCH_PROBE_INTERVAL = 1.0
WATCH_PROBE_TIMEOUT = 2.0
# Requests that can be sent again to another member when the first one's fate is
# unknown (a timeout after sending): reads, and writes whose repetition changes nothing.
_RETRYABLE = frozenset({"kv/range", "lease/timetolive", "lease/revoke", "auth/authenticate"})
# gRPC UNAVAILABLE and the messages of a member that cannot serve right now (no leader,
# lost quorum): another member may be able to.
_CODE_UNAVAILABLE = 14
_UNAVAILABLE_ERRORS = ("no leader", "request timed out", "leader changed",
                       "too many requests", "not capable")

# A backstop for a peer that vanished without closing a connection (power loss): the
# watchdog usually finds it first.
_KEEPALIVE_OPTIONS: list[tuple[int, int, int]] = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
for _name, _value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
    if hasattr(socket, _name):
        _KEEPALIVE_OPTIONS.append((socket.IPPROTO_TCP, getattr(socket, _name), _value))


class EtcdError(StoreError):
    """A failed etcd request; the message says what to check."""

    retryable = True


class EtcdCompacted(EtcdError):
    """The requested revision was compacted away: re-list, then watch from the new revision."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class _AuthRejected(EtcdError):
    pass


class _Unavailable(EtcdError):
    """The member answered that it cannot serve now (no leader, timed out in raft)."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    lease: int  # 0: no etcd lease (a reservation in flannel's terms)
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue


# Each item: the events, and the revision up to which everything has been delivered.
WatchStream = AsyncGenerator[tuple[list[WatchEvent], int], None]


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def prefix_range_end(prefix: str) -> bytes:
    """The smallest key greater than every key starting with `prefix` (etcd's range_end)."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"  # all keys


def _kv(obj: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(obj.get("key", "")).decode("utf-8", errors="replace"),
        value=base64.b64decode(obj.get("value", "")),
        lease=int(obj.get("lease", 0)),
        create_revision=int(obj.get("create_revision", 0)),
        mod_revision=int(obj.get("mod_revision", 0)),
    )


def _header_revision(obj: dict[str, Any]) -> int:
    return int(obj.get("header", {}).get("revision", 0))


def _ssl_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    # An explicit context: this machine (and many others) set SSL_CERT_FILE and friends,
    # which must not decide whom we trust.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        ctx.load_verify_locations(cafile=cafile)
    else:
        ctx.load_default_certs()
    if certfile and keyfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


class EtcdClient:
    """Talks to the first reachable endpoint, failing over in order on connection errors."""

    def __init__(self, endpoints: Sequence[str], *, cafile: str = "", certfile: str = "",
                 keyfile: str = "", username: str = "", password: str = "",
                 timeout: float = 5.0) -> None:
        eps = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        if not eps:
            raise EtcdError("no etcd endpoints given (set --etcd-endpoints)")
        self.endpoints = eps
        self._current = 0
        self._username = username
        self._password = password
        self._token = ""
        verify: ssl.SSLContext | None = None
        if certfile and keyfile:
            verify = _ssl_context(cafile, certfile, keyfile)
        else:
            log.warning("no certificate provided: connecting to etcd with http. This is insecure")
            if any(e.startswith("https://") for e in eps):
                # Server-only TLS still needs a trust root; never the environment's.
                verify = _ssl_context(cafile, "", "")
        # No proxy or CA bundle from the environment (the client reads none): etcd is
        # reached directly.
        self._http = http.HttpClient(
            ssl_context=verify, socket_options=_KEEPALIVE_OPTIONS, timeout=timeout,
            connect_timeout=min(timeout, CONNECT_TIMEOUT))
        self._timeout = timeout
        self._watchdogs: dict[str, _Watchdog] = {}

    # -- transport -------------------------------------------------------------------
    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

    def _leave(self, idx: int) -> None:
        """`idx` failed: the next request (or watch) starts at the endpoint after it."""
        if self._current == idx:
            self._current = (idx + 1) % len(self.endpoints)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": self._token} if self._token else {}

    async def _authenticate(self) -> None:
        self._token = ""
        body = {"name": self._username, "password": self._password}
        resp = await self._post_raw("auth/authenticate", body)
        self._token = str(resp.get("token", ""))
        if not self._token:
            raise EtcdError("etcd authentication returned no token; is auth enabled on the server?")

    async def _post_raw(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors: list[str] = []
        for idx in self._order():
            url = f"{self.endpoints[idx]}/v3/{path}"
            try:
                resp = await self._http.post(url, json=body, headers=self._headers())
            except http.ConnectError as e:
                # Nothing was sent: safe to try the next endpoint, even for writes.
                self._leave(idx)
                errors.append(f"{self.endpoints[idx]}: {str(e) or type(e).__name__}")
                continue
            except (http.HttpError, OSError) as e:
                # With TLS 1.3 a refused client certificate only shows up on the first read
                # (http.TLSError, a TransportError: a read goes on to the next member, as
                # with httpx's ReadError; now with the alert's text).
                self._leave(idx)
                why = f"{str(e) or type(e).__name__}"
                if path in _RETRYABLE and isinstance(e, http.TransportError):
                    errors.append(f"{self.endpoints[idx]}: {why}")
                    continue
                raise EtcdError(f"etcd request {path} to {self.endpoints[idx]} failed: "
                                f"{why}") from None
            try:
                obj = self._decode(path, self.endpoints[idx], resp)
            except _Unavailable as e:
                self._leave(idx)
                if path in _RETRYABLE:
                    errors.append(str(e))
                    continue
                raise
            self._current = idx
            return obj
        raise EtcdError(f"cannot reach etcd ({'; '.join(errors)}); is etcd running and are "
                        f"--etcd-endpoints right?")

    @staticmethod
    def _decode(path: str, endpoint: str, resp: http.Response) -> dict[str, Any]:
        try:
            obj = resp.json()
        except ValueError:
            obj = None
        if resp.status_code == 200 and isinstance(obj, dict):
            return obj
        msg = obj.get("error") or obj.get("message") if isinstance(obj, dict) else None
        code = int(obj.get("code", 0)) if isinstance(obj, dict) else 0
        text = str(msg or resp.text[:200] or f"HTTP {resp.status_code}")
        if code == _CODE_UNAUTHENTICATED or any(a in text for a in _AUTH_ERRORS):
            raise _AuthRejected(f"etcd at {endpoint} refused {path}: {text} "
                                f"(check --etcd-username/--etcd-password)")
        if code == _CODE_OUT_OF_RANGE and "compacted" in text:
            raise EtcdCompacted(f"etcd at {endpoint}: {text}", 0)
        if code == _CODE_UNAVAILABLE or any(u in text for u in _UNAVAILABLE_ERRORS):
            raise _Unavailable(f"etcd at {endpoint} cannot serve {path} now: {text}")
        raise EtcdError(f"etcd at {endpoint} refused {path}: {text}")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._username and not self._token:
            await self._authenticate()
        try:
            return await self._post_raw(path, body)
        except _AuthRejected:
            if not self._username:
                raise
            # Tokens expire (simple tokens after 5 min idle, JWTs at their TTL): retry once.
            await self._authenticate()
            return await self._post_raw(path, body)

    # -- KV --------------------------------------------------------------------------
    @overload
    async def range_prefix(self, prefix: str, *, page: int = 1000
                           ) -> tuple[list[KeyValue], int]: ...

    @overload
    async def range_prefix(self, prefix: str, *, page: int = 1000,
                           parse: Callable[[KeyValue], T | None]) -> tuple[list[T], int]: ...

    async def range_prefix(self, prefix: str, *, page: int = 1000,
                           parse: Callable[[KeyValue], Any] | None = None
                           ) -> tuple[list[Any], int]:
        """All keys under `prefix`, read in pages at one revision; (kvs, that revision).
        With `parse`, each page is turned into parse(kv) as it arrives (None: left out), so
        only the results are kept, never every raw value at once. The next page is asked
        for before this one is parsed: etcd encodes it (on its own CPU) meanwhile."""
        end = _b64(prefix_range_end(prefix))

        def body(start: bytes, rev: int) -> dict[str, Any]:
            b: dict[str, Any] = {"key": _b64(start), "range_end": end, "limit": str(page)}
            if rev:
                b["revision"] = str(rev)
            return b

        for _ in range(5):
            out: list[Any] = []
            nxt: asyncio.Future[dict[str, Any]] | None = None
            try:
                resp = await self._call("kv/range", body(prefix.encode(), 0))
                rev = _header_revision(resp)
                while True:
                    raw = resp.get("kvs", [])
                    more = bool(resp.get("more")) and bool(raw)
                    if more:
                        start = base64.b64decode(raw[-1]["key"]) + b"\0"
                        nxt = asyncio.ensure_future(self._call("kv/range", body(start, rev)))
                    for i, o in enumerate(raw):
                        if i % 128 == 0:
                            # lets the next page's request go out, and other tasks run
                            await asyncio.sleep(0)
                        kv = _kv(o)
                        item = kv if parse is None else parse(kv)
                        if item is not None:
                            out.append(item)
                    if nxt is None:
                        return out, rev
                    del resp, raw  # this page's JSON goes before the next one is read
                    resp, nxt = await nxt, None
            except EtcdCompacted:
                # Compacted between two pages: start over at the newest revision.
                continue
            finally:
                if nxt is not None:  # abandoned (an error, or we were cancelled)
                    nxt.cancel()
                    await asyncio.wait((nxt,))
                    if not nxt.cancelled():
                        nxt.exception()  # retrieved: the error that matters is ours
        raise EtcdError(f"could not list {prefix}: etcd kept compacting while paging")

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call("kv/range", {"key": _b64(key)})
        kvs = resp.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `key`; returns the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _header_revision(await self._call("kv/put", body))

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Write `key` only if it does not exist (one transaction): the revision that created
        it, or 0 if it exists."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        resp = await self._call("kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"}],
            "success": [{"request_put": put}],
        })
        return _header_revision(resp) if resp.get("succeeded", False) else 0

    async def created_since(self, prefix: str, revision: int) -> list[tuple[str, int]]:
        """(key, create revision) of the keys under `prefix` created after `revision`: keys
        only, so a check for what appeared meanwhile costs little at 50k keys."""
        resp = await self._call("kv/range", {
            "key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix)),
            "keys_only": True, "min_create_revision": str(revision + 1)})
        return [(base64.b64decode(o["key"]).decode("utf-8", "replace"),
                 int(o.get("create_revision", 0))) for o in resp.get("kvs", [])]

    async def update(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Write `key` only if it exists (one transaction); False if it does not."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        resp = await self._call("kv/txn", {
            "compare": [{"key": _b64(key), "result": "GREATER", "target": "VERSION",
                         "version": "0"}],
            "success": [{"request_put": put}],
        })
        return bool(resp.get("succeeded", False))

    async def delete(self, key: str) -> bool:
        resp = await self._call("kv/deleterange", {"key": _b64(key)})
        return int(resp.get("deleted", 0)) > 0

    async def compact(self, revision: int) -> None:
        await self._call("kv/compaction", {"revision": str(revision)})

    # -- leases ----------------------------------------------------------------------
    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease: (lease id, granted TTL in seconds)."""
        resp = await self._call("lease/grant", {"TTL": str(ttl)})
        if resp.get("error"):
            raise EtcdError(f"etcd refused a lease grant: {resp['error']}")
        return int(resp["ID"]), int(resp.get("TTL", ttl))

    async def revoke(self, lease: int) -> None:
        """Revoke an etcd lease (deleting its keys); a lease already gone is fine."""
        try:
            await self._call("lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "lease not found" not in str(e):
                raise

    async def time_to_live(self, lease: int) -> int:
        """Remaining seconds of an etcd lease; -1 when it does not exist (or expired)."""
        resp = await self._call("lease/timetolive", {"ID": str(lease)})
        return int(resp.get("TTL", -1))

    # -- watch -----------------------------------------------------------------------
    async def watch(self, prefix: str, *,
                    start_revision: int) -> WatchStream:
        """Watch every key under `prefix` from `start_revision` on.

        Yields (events, revision) where everything up to `revision` has been delivered,
        so a watch resumed at revision+1 misses nothing: first ([], start_revision-1) once
        the watch is established, then each event batch with its highest mod_revision
        (not the header revision: while catching up etcd sends batches whose header is
        ahead of their events), and progress notifications with their header revision.
        Raises EtcdCompacted if `start_revision` was compacted; ends or raises EtcdError
        when the connection is lost.
        """
        body = {"create_request": {
            "key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix)),
            "start_revision": str(start_revision), "progress_notify": True,
        }}
        if self._username and not self._token:
            await self._authenticate()
        for attempt in range(2):
            try:
                async for item in self._watch_once(body, start_revision):
                    yield item
                return
            except _AuthRejected:
                if not self._username or attempt:
                    raise
                await self._authenticate()

    async def _watch_once(self, body: dict[str, Any],
                          start_revision: int) -> WatchStream:
        errors: list[str] = []
        # No read timeout on the stream (http's stream() has none): a quiet watch is
        # normal. A silent member is found by the watchdog instead; the response headers
        # get the ordinary bound.
        key = str(body["create_request"]["key"])
        for idx in self._order():
            endpoint = self.endpoints[idx]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    async with asyncio.timeout(self._timeout):
                        resp = await stack.enter_async_context(self._http.stream(
                            f"{endpoint}/v3/watch", json=body, headers=self._headers()))
                    if resp.status_code != 200:
                        await resp.aread()
                        self._decode("watch", endpoint, resp)
                    self._current = idx
                    dog = stack.enter_context(self._watchdog(endpoint, key))
                    lines = await stack.enter_async_context(
                        contextlib.aclosing(_lines_until(resp.aiter_lines(), dog)))
                    async for line in lines:
                        if not line.strip():
                            continue
                        item = self._watch_message(endpoint, line, start_revision)
                        if item is not None:
                            yield item
                return
            except http.ConnectError as e:
                self._leave(idx)
                errors.append(f"{endpoint}: {str(e) or type(e).__name__}")
                continue
            except TimeoutError:
                self._leave(idx)
                errors.append(f"{endpoint}: no answer to the watch request in "
                              f"{self._timeout:.0f}s")
                continue
            except _Unavailable:
                # Raised, not tried on the next member at once: a member shutting down
                # says so too, and the caller's retry starts at the next one anyway.
                self._leave(idx)
                raise
            except _MemberSilent as e:
                self._leave(idx)
                raise EtcdError(f"watch stream from {endpoint} abandoned: {e}") from None
            except (http.HttpError, OSError) as e:
                self._leave(idx)
                raise EtcdError(f"watch stream from {endpoint} broke: "
                                f"{str(e) or type(e).__name__}") from None
        raise EtcdError(f"cannot reach etcd to watch ({'; '.join(errors)}); is etcd running?")

    @contextlib.contextmanager
    def _watchdog(self, endpoint: str, key: str) -> Iterator[_Watchdog]:
        """The watchdog of `endpoint`, shared by every stream of this client to it, for the
        duration of one stream."""
        dog = self._watchdogs.get(endpoint)
        if dog is None or dog.failed.is_set():
            dog = _Watchdog(lambda: self._probe(endpoint, key))
            self._watchdogs[endpoint] = dog
        dog.users += 1
        try:
            yield dog
        finally:
            dog.users -= 1
            if dog.users == 0:
                dog.stop()
                if self._watchdogs.get(endpoint) is dog:
                    del self._watchdogs[endpoint]

    async def _probe(self, endpoint: str, key: str) -> None:
        """One linearizable read of `key` on `endpoint` (count only: no data moves)."""
        try:
            resp = await self._http.post(
                f"{endpoint}/v3/kv/range", json={"key": key, "count_only": True},
                headers=self._headers(), timeout=WATCH_PROBE_TIMEOUT)
        except (http.HttpError, OSError) as e:
            raise _MemberSilent(f"no answer to a probe in {WATCH_PROBE_TIMEOUT:.0f}s "
                                f"({str(e) or type(e).__name__})") from None
        try:
            self._decode("kv/range", endpoint, resp)
        except _AuthRejected:
            pass  # it answered; the watch's own token handling deals with expiry
        except EtcdError as e:
            raise _MemberSilent(f"a probe failed: {e}") from None

    @staticmethod
    def _watch_message(endpoint: str, line: str,
                       start_revision: int) -> tuple[list[WatchEvent], int] | None:
        try:
            msg = json.loads(line)
        except ValueError:
            raise EtcdError(f"etcd at {endpoint} sent a malformed watch message") from None
        if "error" in msg:
            err = msg["error"]
            text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            if any(a in text for a in _AUTH_ERRORS):
                raise _AuthRejected(f"etcd at {endpoint} refused the watch: {text}")
            raise EtcdError(f"etcd at {endpoint} ended the watch: {text}")
        res = msg.get("result", {})
        if res.get("canceled"):
            compact = int(res.get("compact_revision", 0))
            if compact:
                raise EtcdCompacted(
                    f"watch from revision {start_revision} refused: etcd compacted up to "
                    f"{compact}", compact)
            reason = str(res.get("cancel_reason", "no reason given"))
            if any(a in reason for a in _AUTH_ERRORS):
                raise _AuthRejected(f"etcd at {endpoint} refused the watch: {reason}")
            raise EtcdError(f"etcd at {endpoint} cancelled the watch: {reason}")
        if res.get("created"):
            return [], start_revision - 1
        events = [WatchEvent(type="DELETE" if ev.get("type") == "DELETE" else "PUT",
                             kv=_kv(ev.get("kv", {}))) for ev in res.get("events", [])]
        if events:
            return events, max(ev.kv.mod_revision for ev in events)
        return [], _header_revision(res)

    async def aclose(self) -> None:
        for dog in list(self._watchdogs.values()):
            dog.stop()
        self._watchdogs.clear()
        await self._http.aclose()


class _MemberSilent(EtcdError):
    """A watched member stopped answering probes."""


class _Watchdog:
    """Probes one member while watches stream from it, and says when it stops answering.

    etcd sends nothing on an idle watch, so silence proves nothing: a killed member closes
    the stream, but a paused one (SIGSTOP, a hung disk) or one behind a partition leaves it
    open and mute, and TCP keepalive takes a minute to notice. Progress notifications come
    every 10 minutes and a minority member would still send them. So every
    WATCH_PROBE_INTERVAL a linearizable read (a ReadIndex round through the leader, which
    etcd batches across clients) goes to the same member on its own connection: it fails or
    times out exactly when that member cannot serve current data, whatever the cause. One
    probe per member and client, however many streams share it: one small read a second per
    daemon (1,000 nodes: 1,000 reads/s, far below what etcd serves). During an election a
    healthy member's probe may time out too; the watch then moves once more and resumes
    from its revision, which costs a reconnect, never an event.
    """

    def __init__(self, probe: Callable[[], Awaitable[None]]) -> None:
        self.users = 0
        self.failed = asyncio.Event()
        self.reason = ""
        self.reads: set[asyncio.Timeout] = set()  # the streams' pending reads
        self._task = asyncio.create_task(self._run(probe), name="etcd-watchdog")

    async def _run(self, probe: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(WATCH_PROBE_INTERVAL)
            try:
                await probe()
            except _MemberSilent as e:
                self.reason = str(e)
                self.failed.set()
                now = asyncio.get_running_loop().time()
                for read in self.reads:
                    read.reschedule(now)
                return

    def stop(self) -> None:
        self._task.cancel()


async def _lines_until(lines: AsyncIterator[str],
                       dog: _Watchdog) -> AsyncGenerator[str, None]:
    """The stream's lines until it ends, or _MemberSilent as soon as the watchdog says its
    member stopped answering: it expires the pending read's timeout, which cancels the
    read (the connection under it is then closed).

    Each read is awaited in the consumer's own task: racing it, as a task of its own,
    against the watchdog cost three more turns of the event loop per watch event."""
    while True:
        if dog.failed.is_set():
            raise _MemberSilent(dog.reason)
        try:
            async with asyncio.timeout(None) as read:
                dog.reads.add(read)
                try:
                    line = await anext(lines)
                finally:
                    dog.reads.discard(read)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if read.expired():
                raise _MemberSilent(dog.reason) from None
            raise
        yield line
