"""/healthz, /readyz and /metrics on --healthz-ip:--healthz-port (asyncio, stdlib only).

Upstream answers any method; so do we.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from pyflannel.daemon.metrics import CONTENT_TYPE, Registry

log = logging.getLogger(__name__)


class HealthServer:
    def __init__(self, host: str, port: int, *, ready: Callable[[], str],
                 registry: Registry) -> None:
        self.host, self.port = host, port
        self.ready = ready
        self.registry = registry
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        log.info("Serving /healthz, /readyz and /metrics on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 3)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            ctype = "text/plain; charset=utf-8"
            if path == "/healthz":
                status, body = 200, b"flanneld is running"
            elif path == "/readyz":
                why = self.ready()  # "" when ready, else the reason
                status, body = ((503, f"flanneld is not ready: {why}".encode()) if why
                                else (200, b"flanneld is ready"))
            elif path == "/metrics":
                status, body, ctype = 200, self.registry.exposition(), CONTENT_TYPE
            else:
                status, body = 404, b"404 page not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                         .encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
