"""An asyncio etcd v3 client over etcd's JSON gateway (`/v3/...`), built on httpx.

Why not gRPC: see the python-libs reference §2 (no grpcio/protobuf, explicit compaction
errors, stdlib TLS). Gateway quirks handled here: keys and values are base64, int64s
travel as JSON strings, and proto3 omits default values (`succeeded: false`, event type
PUT, empty `kvs`), so every field is read with a default.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from pyflannel.subnet.base import StoreError

log = logging.getLogger(__name__)

# gRPC status codes etcd puts in gateway errors.
_CODE_OUT_OF_RANGE = 11  # compacted revision
_CODE_UNAUTHENTICATED = 16
_AUTH_ERRORS = ("invalid auth token", "user name is empty", "auth token is expired")

# Detect a peer that vanished without closing the stream (power loss, partition):
# a long-lived watch would otherwise wait forever.
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
        verify: ssl.SSLContext | bool = False
        if certfile and keyfile:
            verify = _ssl_context(cafile, certfile, keyfile)
        else:
            log.warning("no certificate provided: connecting to etcd with http. This is insecure")
            if any(e.startswith("https://") for e in eps):
                # Server-only TLS still needs a trust root; never the environment's.
                verify = _ssl_context(cafile, "", "")
        transport = httpx.AsyncHTTPTransport(verify=verify, socket_options=_KEEPALIVE_OPTIONS)
        # trust_env=False: no proxy or CA bundle from the environment; etcd is reached directly.
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False)
        self._timeout = timeout

    # -- transport -------------------------------------------------------------------
    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._current + i) % n for i in range(n)]

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
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                # Nothing was sent: safe to try the next endpoint, even for writes.
                errors.append(f"{self.endpoints[idx]}: {e or type(e).__name__}")
                continue
            except (httpx.HTTPError, OSError) as e:
                # OSError covers ssl.SSLError: with TLS 1.3 a refused client certificate
                # only shows up on the first read, past httpx's error mapping.
                raise EtcdError(f"etcd request {path} to {self.endpoints[idx]} failed: "
                                f"{e or type(e).__name__}") from None
            self._current = idx
            return self._decode(path, self.endpoints[idx], resp)
        raise EtcdError(f"cannot reach etcd ({'; '.join(errors)}); is etcd running and are "
                        f"--etcd-endpoints right?")

    @staticmethod
    def _decode(path: str, endpoint: str, resp: httpx.Response) -> dict[str, Any]:
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
    async def range_prefix(self, prefix: str, *, page: int = 1000) -> tuple[list[KeyValue], int]:
        """All keys under `prefix`, read in pages at one revision; (kvs, that revision)."""
        end = _b64(prefix_range_end(prefix))
        for _ in range(5):
            kvs: list[KeyValue] = []
            start = prefix.encode()
            rev = 0
            try:
                while True:
                    body: dict[str, Any] = {"key": _b64(start), "range_end": end,
                                            "limit": str(page)}
                    if rev:
                        body["revision"] = str(rev)
                    resp = await self._call("kv/range", body)
                    rev = rev or _header_revision(resp)
                    batch = [_kv(o) for o in resp.get("kvs", [])]
                    kvs.extend(batch)
                    if not resp.get("more") or not batch:
                        return kvs, rev
                    start = base64.b64decode(resp["kvs"][-1]["key"]) + b"\0"
            except EtcdCompacted:
                # Compacted between two pages: start over at the newest revision.
                continue
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

    async def create(self, key: str, value: bytes, *, lease: int = 0) -> bool:
        """Write `key` only if it does not exist (one transaction); False if it exists."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        resp = await self._call("kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "CREATE",
                         "create_revision": "0"}],
            "success": [{"request_put": put}],
        })
        return bool(resp.get("succeeded", False))

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
        # No read timeout: a quiet watch is normal; dead peers are found by TCP keepalive.
        timeout = httpx.Timeout(self._timeout, read=None)
        for idx in self._order():
            endpoint = self.endpoints[idx]
            try:
                async with self._http.stream("POST", f"{endpoint}/v3/watch", json=body,
                                             headers=self._headers(), timeout=timeout) as resp:
                    self._current = idx
                    if resp.status_code != 200:
                        await resp.aread()
                        self._decode("watch", endpoint, resp)
                    async for line in resp.aiter_lines():
                        if not line.strip():
                            continue
                        item = self._watch_message(endpoint, line, start_revision)
                        if item is not None:
                            yield item
                return
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:
                errors.append(f"{endpoint}: {e or type(e).__name__}")
                continue
            except (httpx.HTTPError, OSError) as e:
                raise EtcdError(f"watch stream from {endpoint} broke: "
                                f"{e or type(e).__name__}") from None
        raise EtcdError(f"cannot reach etcd to watch ({'; '.join(errors)}); is etcd running?")

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
        await self._http.aclose()
