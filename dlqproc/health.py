"""The health port: /health, /ready and /metrics over a minimal HTTP/1.1 server.

/health answers whether the supervisor's loops are running (liveness);
/ready whether NATS is connected, Postgres reachable and the pool at strength,
with a JSON body naming what is wrong (readiness); /metrics the aggregated
Prometheus exposition of the supervisor and every worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import msgspec

log = logging.getLogger("dlqproc.health")

_MAX_REQUEST = 8192
_MAX_CONNECTIONS = 32  # a scraper and a few probes; more is a misbehaving client
_TIMEOUT = 5.0  # to read a request, and to write a response
_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        alive: Callable[[], bool],
        problems: Callable[[], list[str]],
        render: Callable[[], tuple[bytes, str]],
    ) -> None:
        self.host, self.port = host, port
        self._alive = alive
        self._problems = problems
        self._render = render
        self._server: asyncio.Server | None = None
        self._open = 0

    def set_checks(self, alive: Callable[[], bool], problems: Callable[[], list[str]]) -> None:
        self._alive, self._problems = alive, problems

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        log.info("health server listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= _MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            await self._respond(reader, writer)
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), _TIMEOUT)

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _TIMEOUT)
            method, path, *_ = head[:_MAX_REQUEST].decode("latin-1").split(" ", 2)
            status, body, ctype = await self._route(method, path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await asyncio.wait_for(writer.drain(), _TIMEOUT)
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            ValueError,
        ):
            pass

    async def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        if method not in ("GET", "HEAD"):
            return 405, b"", "text/plain"
        if path == "/metrics":
            # Reading every process's files is blocking work: off the event loop.
            try:
                body, ctype = await asyncio.to_thread(self._render)
            except Exception:
                log.exception("rendering /metrics failed")
                return 500, b"metrics unavailable\n", "text/plain"
            return 200, body, ctype
        if path == "/health":
            ok = self._alive()
            return _json(200 if ok else 503, {"status": "ok" if ok else "down"})
        if path == "/ready":
            problems = self._problems()
            if problems:
                return _json(503, {"status": "unavailable", "problems": problems})
            return _json(200, {"status": "ready"})
        return 404, b"not found\n", "text/plain"


def _json(status: int, data: object) -> tuple[int, bytes, str]:
    return status, msgspec.json.encode(data) + b"\n", "application/json"
