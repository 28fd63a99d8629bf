"""A small asyncio HTTP/1.1 client, stdlib only, for etcd's JSON gateway.

Why not httpx: importing it costs the daemon ~5.6 MiB of RSS, for a handful of JSON POSTs
to known endpoints. This does only what the etcd client needs: a POST of a JSON body
answered by a Content-Length or chunked body, or a streamed one read line by line (the
watch); keep-alive reuse with a small idle pool per endpoint; per-operation timeouts with a
separate connect bound; no proxies, no environment, no redirects, no compression.

Errors, the distinctions the caller's failover rests on (all are HttpError):
  * ConnectError: nothing was sent (connect, TLS handshake or connect timeout failed), so
    even a write may go to another endpoint;
  * TransportError (ReadTimeout and TLSError among them): the request may have been sent
    and the answer did not arrive whole; only a request safe to repeat is sent again.
    TLSError is an alert after the handshake: TLS 1.3 reports a refused client
    certificate on the first read, so it is told apart only for its message;
  * ResponseTooLarge: the answer exceeds the bound: asking elsewhere would not help.
Whatever the network sends, no other exception comes out of here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

MAX_BODY = 256 * 1024 * 1024  # a range response of 50k leases is ~30 MiB
MAX_LINE = 64 * 1024  # status, header, chunk-size and trailer lines
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE = 4  # idle keep-alive connections kept per endpoint
KEEPALIVE_EXPIRY = 5.0  # an idle connection older than this is closed, not reused
_READ = 256 * 1024  # bytes asked for per read


class HttpError(Exception):
    """A failed HTTP exchange; the subclass says how far it got."""


class ConnectError(HttpError):
    """Nothing was sent: safe to send the request elsewhere, whatever it is."""


class TransportError(HttpError):
    """The request may have been sent; its answer did not arrive whole."""


class ReadTimeout(TransportError):
    pass


class TLSError(TransportError):
    """A TLS alert after the handshake (a refused client certificate, with TLS 1.3)."""


class ResponseTooLarge(HttpError):
    pass


class Response:
    """A response: its status, lower-cased headers and (once read) its body."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content: bytes | bytearray = b""

    def json(self) -> Any:
        """The body as JSON; ValueError if it is not."""
        return jsonlib.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class StreamResponse(Response):
    """A response whose body is read by the caller, without a read timeout."""

    def __init__(self, status_code: int, headers: dict[str, str], body: _Body) -> None:
        super().__init__(status_code, headers)
        self._body = body

    async def aread(self) -> bytes | bytearray:
        self.content = await self._body.read_all()
        return self.content

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines, without their line ends; each line at most MAX_BODY bytes."""
        buf = bytearray()
        scanned = 0
        while True:
            data = await self._body.read_some()
            if not data:
                break
            buf += data
            start = 0
            while (nl := buf.find(b"\n", scanned)) >= 0:
                yield _line(buf, start, nl)
                start = scanned = nl + 1
            if start:
                del buf[:start]
            scanned = len(buf)
            if scanned > MAX_BODY:
                raise ResponseTooLarge(f"a line of the response exceeds {MAX_BODY >> 20} MiB")
        if buf:
            yield _line(buf, 0, len(buf))


def _line(buf: bytearray, start: int, end: int) -> str:
    if end > start and buf[end - 1] == 0x0D:
        end -= 1
    return buf[start:end].decode("utf-8", errors="replace")


class _Endpoint:
    """Where a URL's requests go: (scheme, host, port), and its Host header."""

    __slots__ = ("host", "host_header", "key", "port", "tls")

    def __init__(self, url: str) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConnectError(f"invalid URL {url!r}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConnectError(f"invalid URL {url!r}: want http:// or https:// and a host")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2]
        self.key = (parts.scheme, self.host, self.port)


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


def _transport_error(e: BaseException, what: str) -> HttpError:
    """The client's error for an exception met after the request started going out."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, TimeoutError):
        return ReadTimeout(f"timed out {what}")
    if isinstance(e, asyncio.IncompleteReadError):
        return TransportError(f"connection closed {what}")
    if isinstance(e, asyncio.LimitOverrunError):
        return TransportError(f"a line over {MAX_LINE} bytes {what}")
    if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError):
        return TLSError(str(e) or type(e).__name__)
    if isinstance(e, OSError):
        return TransportError(f"{e or type(e).__name__} ({what})")
    return TransportError(f"malformed response: {e or type(e).__name__}")


class _Body:
    """The body of one response, read in pieces: by Content-Length, chunked, or up to the
    end of the connection."""

    def __init__(self, reader: asyncio.StreamReader, *, length: int | None, chunked: bool,
                 read_timeout: float | None, max_size: int) -> None:
        self._reader = reader
        self._chunked = chunked
        self._left = length if length is not None else -1  # -1: up to EOF; chunked: in chunk
        self._until_eof = length is None and not chunked
        self._timeout = read_timeout
        self._max = max_size
        self.done = length == 0 and not chunked

    async def read_all(self) -> bytearray:
        out = bytearray()
        while data := await self.read_some():
            out += data
            if len(out) > self._max:
                raise ResponseTooLarge(f"response body exceeds {self._max >> 20} MiB")
        return out

    async def read_some(self) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        if self.done:
            return b""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._next()
        except HttpError:
            raise
        except Exception as e:
            raise _transport_error(e, "while reading the response body") from None

    async def _next(self) -> bytes:
        r = self._reader
        if self._until_eof:
            data = await r.read(_READ)
            if not data:
                self.done = True
            return data
        if self._chunked and self._left <= 0:
            # (_left == 0: the CRLF after the previous chunk's data comes first)
            if self._left == 0 and await r.readexactly(2) != b"\r\n":
                raise TransportError("malformed chunked body: no CRLF after a chunk")
            size = _chunk_size(await r.readuntil(b"\n"))
            if size > self._max:
                raise ResponseTooLarge(f"a response chunk exceeds {self._max >> 20} MiB")
            if size == 0:
                await self._trailers()
                self.done = True
                return b""
            self._left = size
        data = await r.read(min(self._left, _READ))
        if not data:
            raise TransportError("connection closed while reading the response body")
        self._left -= len(data)
        if self._left == 0 and not self._chunked:
            self.done = True
        return data

    async def _trailers(self) -> None:
        total = 0
        for _ in range(MAX_HEADERS + 1):
            line = await self._reader.readuntil(b"\n")
            if line in (b"\r\n", b"\n"):
                return
            total += len(line)
            if total > MAX_HEADER_BYTES:
                break
        raise TransportError("malformed chunked body: too many trailer lines")


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip()
    if not digits or len(digits) > 16 or not all(c in b"0123456789abcdefABCDEF" for c in digits):
        raise TransportError(f"malformed chunk size line {bytes(line[:40])!r}")
    return int(digits, 16)


def _status_line(line: bytes) -> tuple[int, bool]:
    """(status, HTTP/1.1?) of a status line."""
    parts = line.rstrip(b"\r\n").split(b" ", 2)
    if (len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(parts[1]) != 3 or not parts[1].isdigit()):
        raise TransportError(f"malformed status line {bytes(line[:40])!r}")
    return int(parts[1]), parts[0] == b"HTTP/1.1"


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, bool, dict[str, str]]:
    """Status, HTTP/1.1?, and headers (lower-cased names) of a response; 1xx skipped."""
    for _ in range(8):
        try:
            first = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise TransportError("server disconnected without sending a response") from None
            raise
        status, v11 = _status_line(first)
        headers: dict[str, str] = {}
        total = count = 0
        while True:
            line = await reader.readuntil(b"\n")
            if line in (b"\r\n", b"\n"):
                break
            total += len(line)
            count += 1
            if total > MAX_HEADER_BYTES or count > MAX_HEADERS:
                raise TransportError(f"response headers exceed {MAX_HEADERS} lines or "
                                     f"{MAX_HEADER_BYTES} bytes")
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip() or name[0] in " \t":
                raise TransportError(f"malformed header line {line[:40]!r}")
            name = name.lower()
            value = value.strip()
            if name in headers:
                value = f"{headers[name]}, {value}"
            headers[name] = value
        if not 100 <= status < 200 or status == 101:
            return status, v11, headers
    raise TransportError("too many informational (1xx) responses")


def _framing(status: int, headers: Mapping[str, str]) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked?) of a response."""
    if status in (204, 304) or 100 <= status < 200:
        return 0, False
    enc = headers.get("content-encoding", "identity").strip().lower()
    if enc != "identity":
        raise TransportError(f"unexpected content-encoding {enc!r}")
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if te.strip().lower() != "chunked" or cl is not None:
            raise TransportError(f"unsupported transfer-encoding {te!r}")
        return None, True
    if cl is None:
        return None, False
    cl = cl.strip()
    if not (cl.isascii() and cl.isdigit()) or len(cl) > 18:
        raise TransportError(f"malformed content-length {cl[:40]!r}")
    return int(cl), False


class HttpClient:
    """POSTs JSON to http(s) URLs; connections are kept per endpoint and reused."""

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None,
                 socket_options: Sequence[tuple[int, int, int]] = (),
                 timeout: float = 5.0, connect_timeout: float = 5.0,
                 max_body: int = MAX_BODY) -> None:
        self._ssl = ssl_context
        self._socket_options = list(socket_options)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_body = max_body
        self._targets: dict[str, tuple[_Endpoint, str]] = {}
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._open: set[_Conn] = set()
        self._closed = False

    # -- connections ------------------------------------------------------------------
    def _target(self, url: str) -> tuple[_Endpoint, str]:
        """The endpoint and request target of `url` (a few distinct URLs: cached)."""
        hit = self._targets.get(url)
        if hit is None:
            ep = _Endpoint(url)
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            if any(c in target for c in " \r\n\0"):
                raise ConnectError(f"invalid URL {url!r}")
            hit = ep, target
            if len(self._targets) < 256:
                self._targets[url] = hit
        return hit

    async def _connect(self, ep: _Endpoint, timeout: float) -> _Conn:
        if self._closed:
            raise ConnectError("the HTTP client is closed")
        now = asyncio.get_running_loop().time()
        idle = self._idle.get(ep.key)
        while idle:
            conn = idle.pop()
            # A connection the server closed meanwhile has seen EOF: never reuse it, or
            # the request would fail after being sent.
            if (now - conn.idle_since < KEEPALIVE_EXPIRY and not conn.writer.is_closing()
                    and not conn.reader.at_eof()):
                return conn
            self._discard(conn)
        ctx: ssl.SSLContext | None = None
        if ep.tls:
            if self._ssl is None:
                raise ConnectError(f"https://{ep.host_header}: no TLS context configured")
            ctx = self._ssl
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    ep.host, ep.port, ssl=ctx, server_hostname=ep.host if ctx else None,
                    limit=MAX_LINE)
        except TimeoutError:
            raise ConnectError(f"connect timed out after {timeout:g}s") from None
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            raise ConnectError(str(e) or type(e).__name__) from None
        conn = _Conn(reader, writer)
        self._open.add(conn)
        sock = writer.get_extra_info("socket")
        try:
            if sock is not None:
                for level, opt, value in self._socket_options:
                    sock.setsockopt(level, opt, value)
        except OSError as e:
            self._discard(conn)
            raise ConnectError(f"setting socket options: {e}") from None
        return conn

    def _discard(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.close()

    def _release(self, ep: _Endpoint, conn: _Conn) -> None:
        idle = self._idle.setdefault(ep.key, [])
        if self._closed or len(idle) >= MAX_IDLE or conn.writer.is_closing():
            self._discard(conn)
            return
        conn.idle_since = asyncio.get_running_loop().time()
        idle.append(conn)

    # -- requests ---------------------------------------------------------------------
    async def _send(self, conn: _Conn, ep: _Endpoint, path: str, body: Any,
                    headers: Mapping[str, str], timeout: float) -> None:
        payload = jsonlib.dumps(body, separators=(",", ":")).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: {ep.host_header}",
                 "Content-Type: application/json", f"Content-Length: {len(payload)}",
                 "Accept: application/json"]
        for name, value in headers.items():
            if any(c in name or c in value for c in "\r\n\0") or ":" in name:
                raise HttpError(f"refusing to send a malformed header {name!r}")
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", errors="replace")
        conn.writer.write(head + payload)
        async with asyncio.timeout(timeout):
            await conn.writer.drain()

    async def _exchange(self, url: str, body: Any, headers: Mapping[str, str], *,
                        connect_timeout: float, write_timeout: float, timeout: float | None,
                        body_timeout: float | None) -> tuple[_Endpoint, _Conn, Response, _Body,
                                                             bool]:
        """Send the request and read the response's head; the body is left to the caller.
        The last item: may the connection be reused once the body is read?"""
        ep, path = self._target(url)
        conn = await self._connect(ep, connect_timeout)
        try:
            await self._send(conn, ep, path, body, headers, write_timeout)
            async with asyncio.timeout(timeout):
                status, v11, resp_headers = await _read_head(conn.reader)
            length, chunked = _framing(status, resp_headers)
            if length is not None and length > self._max_body:
                raise ResponseTooLarge(f"response body of {length} bytes exceeds "
                                       f"{self._max_body >> 20} MiB")
        except BaseException as e:
            self._discard(conn)
            if isinstance(e, Exception) and not isinstance(e, HttpError):
                raise _transport_error(e, "waiting for the response") from None
            raise
        reuse = (v11 and "close" not in resp_headers.get("connection", "").lower()
                 and (length is not None or chunked))
        resp = Response(status, resp_headers)
        rbody = _Body(conn.reader, length=length, chunked=chunked, read_timeout=body_timeout,
                      max_size=self._max_body)
        return ep, conn, resp, rbody, reuse

    async def post(self, url: str, *, json: Any, headers: Mapping[str, str] | None = None,
                   timeout: float | None = None) -> Response:
        """POST `json`; the whole response. `timeout` bounds the connect and each read or
        write (default: the client's bounds)."""
        connect = self._connect_timeout if timeout is None else timeout
        op = self._timeout if timeout is None else timeout
        ep, conn, resp, rbody, reuse = await self._exchange(
            url, json, headers or {}, connect_timeout=connect, write_timeout=op, timeout=op,
            body_timeout=op)
        try:
            resp.content = await rbody.read_all()
        except BaseException:
            self._discard(conn)
            raise
        if reuse:
            self._release(ep, conn)
        else:
            self._discard(conn)
        return resp

    @contextlib.asynccontextmanager
    async def stream(self, url: str, *, json: Any,
                     headers: Mapping[str, str] | None = None) -> AsyncIterator[StreamResponse]:
        """POST `json`; the response once its head arrived, its body read by the caller with
        no read timeout (a quiet stream is normal: bound it from outside). The connection
        is closed on leaving."""
        ep, conn, resp, rbody, _ = await self._exchange(
            url, json, headers or {}, connect_timeout=self._connect_timeout,
            write_timeout=self._timeout, timeout=None, body_timeout=None)
        try:
            yield StreamResponse(resp.status_code, resp.headers, rbody)
        finally:
            self._discard(conn)

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        self._idle.clear()
        for conn in list(self._open):
            self._discard(conn)
