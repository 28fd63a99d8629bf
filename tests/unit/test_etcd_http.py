"""The etcd client's HTTP/1.1 client against a scripted asyncio server on 127.0.0.1: response
framing, keep-alive reuse, and what malformed or hostile answers turn into (only the
client's own errors)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyflannel.subnet.etcd import http

Action = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Request:
    head: bytes
    body: bytes
    connection: int

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.lower() == name.lower():
                return v.strip()
        return None


@dataclass
class Server:
    """Answers each request with the next scripted action: bytes to send (then the
    connection stays open), or a coroutine given the connection. CLOSE after an action
    closes the connection."""

    script: list[Action | None] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closes: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    _srv: asyncio.Server | None = None

    async def start(self) -> None:
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._srv.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v3/kv/range"

    async def stop(self) -> None:
        assert self._srv is not None
        self._srv.close()
        await self._srv.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                req = Request(head, b"", n)
                req.body = await reader.readexactly(int(req.header("content-length") or 0))
                self.requests.append(req)
                action = self.script.pop(0)
                if isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                elif action is not None:
                    await action(reader, writer)
                if self.script and self.script[0] is None:
                    self.script.pop(0)
                    return
        finally:
            writer.close()
            self.closes += 1
            self.closed.set()


CLOSE = None


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[http.HttpClient]:
    c = http.HttpClient(timeout=5.0, connect_timeout=2.0)
    yield c
    await c.aclose()


def ok(body: bytes, *extra: str) -> bytes:
    head = "\r\n".join(["HTTP/1.1 200 OK", "Content-Type: application/json",
                        f"Content-Length: {len(body)}", *extra])
    return head.encode() + b"\r\n\r\n" + body


def chunked(*chunks: bytes, status: str = "200 OK", trailer: bytes = b"") -> bytes:
    out = f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    for c in chunks:
        out += f"{len(c):x}\r\n".encode() + c + b"\r\n"
    return out + b"0\r\n" + trailer + b"\r\n"


async def test_a_content_length_response_and_the_request_sent(
        server: Server, client: http.HttpClient) -> None:
    server.script = [ok(b'{"kvs": [], "count": "0"}')]
    resp = await client.post(server.url, json={"key": "YQ=="},
                             headers={"Authorization": "tok"})
    assert resp.status_code == 200
    assert resp.json() == {"kvs": [], "count": "0"}
    assert resp.text == '{"kvs": [], "count": "0"}'
    (req,) = server.requests
    assert req.head.startswith(b"POST /v3/kv/range HTTP/1.1\r\n")
    assert req.header("host") == server.url.split("/")[2]
    assert req.header("authorization") == "tok"
    assert req.header("content-type") == "application/json"
    assert json.loads(req.body) == {"key": "YQ=="}


async def test_a_chunked_response_with_extensions_and_trailers(
        server: Server, client: http.HttpClient) -> None:
    body = chunked(b'{"a":', b' 1, "b": "', b"x" * 70000 + b'"}', trailer=b"X-T: 1\r\n")
    body = body.replace(b"\r\n5\r\n", b"\r\n5;ext=1\r\n", 1)
    server.script = [body, ok(b"{}")]
    resp = await client.post(server.url, json={})
    assert resp.json() == {"a": 1, "b": "x" * 70000}
    # The whole body, trailers included, was consumed: the connection serves the next one.
    assert (await client.post(server.url, json={})).json() == {}
    assert server.connections == 1


async def test_keep_alive_reuses_one_connection(server: Server, client: http.HttpClient) -> None:
    server.script = [ok(b'{"n": 1}'), ok(b'{"n": 2}'), ok(b'{"n": 3}')]
    for n in (1, 2, 3):
        assert (await client.post(server.url, json={})).json() == {"n": n}
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1, 1, 1]


async def test_concurrent_requests_use_their_own_connections(
        server: Server, client: http.HttpClient) -> None:
    gate = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        w.write(ok(b"{}"))

    server.script = [slow, ok(b"{}"), ok(b"{}")]
    first = asyncio.ensure_future(client.post(server.url, json={}))
    while not server.requests:
        await asyncio.sleep(0.01)
    assert (await client.post(server.url, json={})).status_code == 200
    gate.set()
    assert (await first).status_code == 200
    assert server.connections == 2
    # Both went back to the pool: the next request reuses one.
    assert (await client.post(server.url, json={})).status_code == 200
    assert server.connections == 2


async def test_connection_close_and_a_server_closed_idle_connection_are_not_reused(
        server: Server, client: http.HttpClient) -> None:
    server.script = [ok(b"{}", "Connection: close"), ok(b"{}"), CLOSE, ok(b"{}")]
    await client.post(server.url, json={})
    await client.post(server.url, json={})  # a new connection: the first one said close
    while server.closes < 2 or not all(  # until the client's loop has seen the FIN
            c.reader.at_eof() for idle in client._idle.values() for c in idle):
        await asyncio.sleep(0.01)
    await client.post(server.url, json={})  # would fail after sending if it were reused
    assert [r.connection for r in server.requests] == [1, 2, 3]


async def test_a_response_up_to_eof_is_read_whole(server: Server,
                                                  client: http.HttpClient) -> None:
    server.script = [b"HTTP/1.1 200 OK\r\n\r\n" + b'{"x": 1}', CLOSE]
    assert (await client.post(server.url, json={})).json() == {"x": 1}


@pytest.mark.parametrize("response", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"SSH-2.0-OpenSSH\r\n\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
], ids=lambda b: repr(b[:30]))
async def test_a_malformed_response_is_a_transport_error(
        server: Server, client: http.HttpClient, response: bytes) -> None:
    server.script = [response, CLOSE]
    with pytest.raises(http.TransportError) as err:
        await client.post(server.url, json={})
    assert not isinstance(err.value, http.ConnectError)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"b" * 60000 + b"\r\nX-L2: "
    + b"c" * 60000 + b"\r\n\r\n",
    b"HTTP/1.1 200 " + b"O" * 70000 + b"\r\n\r\n",
], ids=["long-line", "too-many", "too-many-bytes", "long-status"])
async def test_oversize_headers_are_refused(server: Server, client: http.HttpClient,
                                            head: bytes) -> None:
    server.script = [head, CLOSE]
    with pytest.raises(http.TransportError):
        await client.post(server.url, json={})


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 10,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"",
], ids=["length", "in-chunk", "between-chunks", "in-trailers", "in-head", "no-response"])
async def test_a_connection_closed_mid_response_is_a_transport_error(
        server: Server, client: http.HttpClient, response: bytes) -> None:
    server.script = [response, CLOSE]
    with pytest.raises(http.TransportError, match="closed|disconnected"):
        await client.post(server.url, json={})


async def test_bodies_over_the_bound_are_refused(server: Server) -> None:
    c = http.HttpClient(max_body=1000)
    try:
        server.script = [b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n", CLOSE,
                         chunked(b"x" * 600, b"y" * 600), CLOSE,
                         b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"ffffffff\r\n", CLOSE]
        for _ in range(3):
            with pytest.raises(http.ResponseTooLarge, match="exceeds"):
                await c.post(server.url, json={})
        server.script = [ok(b"z" * 1000)]
        assert (await c.post(server.url, json={})).content == b"z" * 1000
    finally:
        await c.aclose()


async def test_connect_failures_are_connect_errors(client: http.HttpClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v3/kv/range"
    for url in (dead, "localhost:2379/v3/kv/range", "ftp://127.0.0.1/v3/x",
                "http://127.0.0.1:99999/v3/x", "https://127.0.0.1:1/v3/x"):
        with pytest.raises(http.ConnectError):
            await client.post(url, json={})


async def test_a_silent_server_is_a_read_timeout(server: Server,
                                                 client: http.HttpClient) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    server.script = [silent]
    with pytest.raises(http.ReadTimeout):
        await client.post(server.url, json={}, timeout=0.2)
    await server.closed.wait()  # and the connection was closed


async def test_a_hostile_header_value_is_not_sent(server: Server,
                                                  client: http.HttpClient) -> None:
    with pytest.raises(http.HttpError, match="malformed header"):
        await client.post(server.url, json={}, headers={"Authorization": "x\r\nEvil: 1"})
    assert server.requests == []


async def test_a_stream_yields_lines_across_chunks(server: Server,
                                                   client: http.HttpClient) -> None:
    gate = asyncio.Event()

    async def watch(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        w.write(head + b"4\r\n{\"a\"\r\n")
        await w.drain()
        await gate.wait()  # the client waits here with no read timeout
        for part in (b":1}\n{\"b\":2}\r\n", b"\n", b"{\"c\"", b":3}\n{\"d\":4}"):
            w.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        w.write(b"0\r\n\r\n")

    server.script = [watch]
    lines: list[str] = []
    async with client.stream(server.url, json={"create_request": {}}) as resp:
        assert resp.status_code == 200
        it = aiter(resp.aiter_lines())
        first = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0.05)
        assert not first.done()
        gate.set()
        lines.append(await first)
        lines += [line async for line in it]
    assert lines == ['{"a":1}', '{"b":2}', "", '{"c":3}', '{"d":4}']
    assert json.loads(server.requests[0].body) == {"create_request": {}}


async def test_a_stream_error_body_is_read_whole(server: Server,
                                                 client: http.HttpClient) -> None:
    server.script = [b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 25\r\n\r\n"
                     b'{"error":"invalid token"}']
    async with client.stream(server.url, json={}) as resp:
        assert resp.status_code == 401
        await resp.aread()
        assert resp.json() == {"error": "invalid token"}


async def test_a_cancelled_stream_read_closes_its_connection(
        server: Server, client: http.HttpClient) -> None:
    async def quiet(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        await w.drain()
        await r.read()  # until the client closes

    server.script = [quiet]
    async with client.stream(server.url, json={}) as resp:
        task = asyncio.ensure_future(anext(aiter(resp.aiter_lines())))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await server.closed.wait()  # the server saw EOF: the connection was closed


async def test_aclose_closes_idle_connections(server: Server) -> None:
    c = http.HttpClient()
    server.script = [ok(b"{}")]
    await c.post(server.url, json={})
    await c.aclose()
    await server.closed.wait()
    with pytest.raises(http.ConnectError, match="closed"):
        await c.post(server.url, json={})


async def _answer_twice(response: bytes) -> list[BaseException]:
    """What a post, then a stream, make of `response`."""
    server = Server(script=[response, CLOSE, response, CLOSE])
    await server.start()
    c = http.HttpClient(timeout=2.0, max_body=1 << 16)
    errors: list[BaseException] = []
    try:
        try:
            await c.post(server.url, json={})
        except Exception as e:
            errors.append(e)
        try:
            async with c.stream(server.url, json={}) as resp:
                async for _ in resp.aiter_lines():
                    pass
        except Exception as e:
            errors.append(e)
    finally:
        await c.aclose()
        await server.stop()
    return errors


_HEADS = st.sampled_from([b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: "
                          b"chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                          b""])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(head=_HEADS, tail=st.binary(max_size=300))
def test_whatever_the_server_sends_only_client_errors_come_out(head: bytes,
                                                               tail: bytes) -> None:
    errors = asyncio.run(_answer_twice(head + tail))
    assert all(isinstance(e, http.HttpError) for e in errors), errors
