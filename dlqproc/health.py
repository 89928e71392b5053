"""The health port: /health, /ready and /metrics on aiohttp's low-level server.

/health answers whether the supervisor's loops are running (liveness);
/ready whether NATS is connected, Postgres reachable and the pool at strength,
with a JSON body naming what is wrong (readiness); /metrics the exposition of
the supervisor and every worker process (`dlqproc.metrics`).

The service's only module that imports aiohttp (the console is a process of
its own). Probes are never queued behind scrapes: /health and /ready are
answered on the event loop from state in memory and never wait for a scrape
slot or a render. /metrics is bounded three ways:

- at most `scrape_slots` scrapes are served at once, a slot held until the
  body is written; a scrape that waits longer than `render_timeout` for one
  gets 503, so slow or numerous scrapers cost memory for a few bodies at most;
- the render runs in a thread, and one render serves every scrape that
  arrives while it runs (and those within `reuse` seconds after it);
- a render that overruns `render_timeout` answers 503; its thread finishes
  in the background and no second render starts meanwhile.

Connections: a request must arrive in full within REQUEST_TIMEOUT of the
connection or of the previous response (aiohttp's keep-alive timer, armed
when a connection opens), so a client sending a byte every few seconds is
closed instead of holding anything; a request line over MAX_REQUEST_LINE
bytes gets 414, a header line over MAX_HEADER_LINE or more than MAX_HEADERS
headers 431; a body is never read (the response to a request carrying one
closes the connection); a /metrics body not taken within `write_timeout`
drops the connection and frees its slot.

At most MAX_CONNECTIONS connections are open at once (`dlqproc.listener`):
file descriptors this port holds are ones NATS and PostgreSQL cannot have.
The last PROBE_RESERVE of those places serve one /health or /ready request
each (anything else 503) and close within PROBE_LIFETIME, at most
PROBE_RESERVE_PER_ADDRESS per client address, so scrapers or slow clients
filling the port from a few addresses leave room for the kubelet's probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Final

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from dlqproc.listener import Limits, Listener

log = logging.getLogger("dlqproc.health")

REQUEST_TIMEOUT: Final = 5.0  # seconds to send a whole request head (and idle keep-alive)
WRITE_TIMEOUT: Final = 10.0  # seconds to take a /metrics body
RENDER_TIMEOUT: Final = 5.0  # Prometheus' default scrape timeout is 10 s
RENDER_REUSE: Final = 0.5  # seconds a finished render answers later scrapes
SCRAPE_SLOTS: Final = 4
# Different sizes, so a LineTooLong tells the request line (414) from a header (431).
MAX_REQUEST_LINE: Final = 4096
MAX_HEADER_LINE: Final = 8190
MAX_HEADERS: Final = 64
# A scrape and a probe or two at a time is the normal load; the rest is headroom
# a flood may take, bounded well below a default 1,024-descriptor limit.
MAX_CONNECTIONS: Final = 256
PROBE_RESERVE: Final = 32
PROBE_RESERVE_PER_ADDRESS: Final = 4  # a kubelet probes liveness and readiness at once
PROBE_LIFETIME: Final = 2.0
_PROBES: Final = ("/health", "/ready")
_ALLOW: Final = "GET, HEAD"
_SERVER: Final = {"Server": "dlqproc"}  # not aiohttp's name and version

Rendered = tuple[bytes, str]  # body, content type


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        alive: Callable[[], bool],
        problems: Callable[[], list[str]],
        render: Callable[[], Rendered],
        *,
        render_timeout: float = RENDER_TIMEOUT,
        reuse: float = RENDER_REUSE,
        scrape_slots: int = SCRAPE_SLOTS,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        probe_reserve: int = PROBE_RESERVE,
        probe_lifetime: float = PROBE_LIFETIME,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.host, self.port = host, port
        self._on_refused = on_refused
        self._alive = alive
        self._problems = problems
        self._render = render
        self._render_timeout = render_timeout
        self._reuse = reuse
        self._write_timeout = write_timeout
        self._slots = asyncio.Semaphore(scrape_slots)
        self._runner: web.ServerRunner | None = None
        self._limits = Limits(
            max_connections,
            reserve=probe_reserve,
            reserve_per_address=PROBE_RESERVE_PER_ADDRESS,
            reserve_lifetime=probe_lifetime,
        )
        self.listener: Listener | None = None
        self._rendering: asyncio.Future[Rendered] | None = None
        self._last: tuple[float, Rendered] | None = None  # when it finished, what it gave
        self.renders = 0  # renders started
        self.scrapes = 0  # /metrics requests being answered

    def set_checks(self, alive: Callable[[], bool], problems: Callable[[], list[str]]) -> None:
        self._alive, self._problems = alive, problems

    async def start(self) -> None:
        server = _Server(
            self._handle,
            access_log=None,  # a probe a second would drown the service's own lines
            keepalive_timeout=REQUEST_TIMEOUT,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_LINE,
            max_headers=MAX_HEADERS,
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await self._runner.setup()
        self.listener = Listener(server, self._limits, log, "health port", self._on_refused)
        try:
            await self.listener.start(self.host, self.port)
        except OSError:
            await self.close()
            raise
        self.port = self.listener.port  # the one bound when port 0 was asked
        log.info("health server listening", extra={"host": self.host, "port": self.port})

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.listener is not None and self.listener.reserved(request.transport):
            # A place kept for probes: one short answer, then the place is free again.
            if request.rel_url.path in _PROBES:
                response = await self._route(request)
            else:
                response = _text(503, "too many connections\n", **{"Retry-After": "1"})
            response.force_close()
            return response
        response = await self._route(request)
        if request.body_exists:
            # Never read: closing is cheaper than draining it.
            response.force_close()
        return response

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.rel_url.path
        if path not in ("/health", "/ready", "/metrics"):
            return _text(404, "not found\n")
        if request.method not in ("GET", "HEAD"):
            return _text(405, "method not allowed\n", Allow=_ALLOW)
        if path == "/health":
            ok = self._alive()
            return _json(200 if ok else 503, {"status": "ok" if ok else "down"})
        if path == "/ready":
            problems = self._problems()
            if problems:
                return _json(503, {"status": "unavailable", "problems": problems})
            return _json(200, {"status": "ready"})
        return await self._metrics(request)

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        self.scrapes += 1
        try:
            try:
                await asyncio.wait_for(self._slots.acquire(), self._render_timeout)
            except TimeoutError:
                return _text(503, "too many scrapes at once\n", **{"Retry-After": "1"})
            try:
                return await self._send_metrics(request)
            finally:
                self._slots.release()
        finally:
            self.scrapes -= 1

    async def _send_metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            body, ctype = await self._rendered()
        except TimeoutError:
            log.warning("rendering /metrics timed out", extra={"timeout": self._render_timeout})
            return _text(503, "metrics render timed out\n")
        except Exception:
            log.exception("rendering /metrics failed")
            return _text(500, "metrics unavailable\n")
        response = web.Response(body=body, headers={**_SERVER, "Content-Type": ctype})
        try:
            async with asyncio.timeout(self._write_timeout):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            # A client that does not read: drop it rather than hold a slot.
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:
            pass  # the client left; aiohttp closes the connection
        return response

    async def _rendered(self) -> Rendered:
        """The latest render if recent, else the one in flight (started if none), bounded."""
        if self._last is not None and time.monotonic() - self._last[0] < self._reuse:
            return self._last[1]
        if self._rendering is None:
            self._rendering = self._start_render()
        return await asyncio.wait_for(asyncio.shield(self._rendering), self._render_timeout)

    def _start_render(self) -> asyncio.Future[Rendered]:
        # A daemon thread of its own, not the loop's executor: a render that
        # never returns holds neither an executor thread nor the process exit.
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Rendered] = loop.create_future()
        future.add_done_callback(_retrieve)
        self.renders += 1

        def work() -> None:
            try:
                result: Rendered | None = self._render()
                error: BaseException | None = None
            except BaseException as exc:  # handed to the scrapes waiting for it
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._render_done, future, result, error)

        threading.Thread(target=work, name="dlqproc-metrics-render", daemon=True).start()
        return future

    def _render_done(
        self, future: asyncio.Future[Rendered], result: Rendered | None, error: BaseException | None
    ) -> None:
        self._rendering = None
        if error is not None or result is None:
            future.set_exception(error or RuntimeError("render returned nothing"))
            return
        self._last = (time.monotonic(), result)
        future.set_result(result)


def _retrieve(future: asyncio.Future[Rendered]) -> None:
    # Every waiter may have timed out: the outcome is consumed here regardless.
    if not future.cancelled():
        future.exception()


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={**_SERVER, **headers})


def _json(status: int, data: object) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(data) + b"\n",
        headers={**_SERVER, "Content-Type": "application/json"},
    )


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, answering malformed requests with their own status.

    aiohttp answers every parse error 400 and logs it with a traceback; a
    request line or header over its limit deserves 414 or 431, and a client's
    malformed request is no error of the service (logged at DEBUG only).
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        status = _client_error(exc)
        log.debug("malformed request", extra={"status": status, "error": str(exc)[:200]})
        response = _text(status, f"{HTTPStatus(status).phrase}\n")
        response.force_close()
        return response


def _client_error(exc: HttpProcessingError) -> int:
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        return 414 if limit == MAX_REQUEST_LINE else 431
    if isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message:
        return 431
    return 400


def quiet_protocol(server: web.Server) -> Callable[[], web.RequestHandler]:
    """Connections of `server` (the console's) answered and logged as this port's are."""
    kwargs: dict[str, Any] = server._kwargs
    loop = asyncio.get_running_loop()
    return lambda: _Protocol(server, loop=loop, **kwargs)


class _Server(web.Server):
    """aiohttp's low-level server, making its connections with _Protocol."""

    def __call__(self) -> web.RequestHandler:
        kwargs: dict[str, Any] = self._kwargs
        return _Protocol(self, loop=self._loop, **kwargs)
