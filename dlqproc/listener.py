"""A listening TCP port that bounds its open connections and outlives running out of descriptors.

The health port lives in the supervisor, next to the sockets to NATS and
PostgreSQL: connections it holds are file descriptors those cannot have. So
connections are accepted here, not by the event loop's server, and each is
admitted or refused before any protocol (aiohttp's) is made for it:

- at most `Limits.connections` are open at once; one over that is sent a
  fixed 503 and closed without being read;
- the last `Limits.reserve` of those places are for short visits only: a
  connection admitted into them is told so (`Listener.reserved`), lives at
  most `Limits.reserve_lifetime`, and one client address holds at most
  `Limits.reserve_per_address` of them. A flood of idle or slow connections
  from a few addresses therefore fills the ordinary places but leaves room
  for a kubelet's probe from another address;
- when accept() fails for want of descriptors or memory (EMFILE, ENFILE,
  ENOBUFS, ENOMEM) the port stops accepting for a while (0.1 s doubling to
  1 s) instead of retrying at once: connections wait in the kernel's backlog,
  nothing spins, and the port keeps listening. (uvloop's own server closes
  its listening socket for good when libuv reports such an error.)

Refusals and accept failures are logged through `ratelog.Summary`: a line
per period with counts, never one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Final

import msgspec

from dlqproc.ratelog import Summary

BACKLOG: Final = 128
ACCEPT_BACKOFF: Final = (0.1, 1.0)  # seconds without accepting after a failure: first, most
# Errors of one connection that left before it was accepted: the next accept may succeed.
_GONE: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})
_BUSY: Final = (
    b"HTTP/1.1 503 Service Unavailable\r\nServer: dlqproc\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections\n"
)

ProtocolFactory = Callable[[], asyncio.Protocol]


class Limits(msgspec.Struct, frozen=True):
    connections: int
    reserve: int = 0  # of `connections`, kept for short visits
    reserve_per_address: int = 1
    reserve_lifetime: float = 2.0  # seconds a connection in the reserve may stay open

    def __post_init__(self) -> None:
        if not 0 <= self.reserve < self.connections:
            raise ValueError("reserve must be below connections")


class Listener:
    def __init__(
        self,
        factory: ProtocolFactory,
        limits: Limits,
        log: logging.Logger,
        name: str,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self._factory = factory
        self._on_refused = on_refused  # counts each refusal (a metric); the log summarises
        self.limits = limits
        self._sockets: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._reserved: set[asyncio.BaseTransport] = set()
        self._reserve_by_host: dict[str, int] = {}
        self.open = 0  # connections admitted and not yet closed
        self.refused = Summary(log, f"{name}: connections refused, over the limit")
        self.starved = Summary(log, f"{name}: cannot accept connections, out of resources")

    @property
    def port(self) -> int:
        return int(self._sockets[0].getsockname()[1])

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for s in self._sockets]

    def reserved(self, transport: asyncio.BaseTransport | None) -> bool:
        """Whether this connection was admitted into the reserve (one short visit)."""
        return transport is not None and transport in self._reserved

    async def start(self, host: str, port: int) -> None:
        """Binds every address `host` names (OSError if one cannot be) and accepts."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            self._close_sockets()
            raise
        self._tasks = [asyncio.create_task(self._accept(s)) for s in self._sockets]

    async def close(self) -> None:
        """Stops accepting; connections already open are their protocol's to close."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._close_sockets()
        self.refused.close()
        self.starved.close()

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        backoff = ACCEPT_BACKOFF[0]
        while True:
            try:
                conn, address = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue
                # EMFILE and its kind, or anything unforeseen: never give up the
                # port, never retry in a tight loop.
                self.starved.add(errno.errorcode.get(exc.errno or 0, str(exc)))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                continue
            backoff = ACCEPT_BACKOFF[0]
            host = str(address[0]) if isinstance(address, tuple) and address else ""
            await self._admit(conn, host)

    def _place(self, host: str) -> bool | None:
        """None: refuse; True: admit into the reserve; False: admit."""
        if self.open >= self.limits.connections:
            return None
        if self.open < self.limits.connections - self.limits.reserve:
            return False
        if self._reserve_by_host.get(host, 0) >= self.limits.reserve_per_address:
            return None
        return True

    async def _admit(self, conn: socket.socket, host: str) -> None:
        place = self._place(host)
        if place is None:
            self.refused.add(host)
            self._on_refused()
            with contextlib.suppress(OSError):
                conn.send(_BUSY)  # best effort: the socket is new, its buffer empty
            conn.close()
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Tracked(self, self._factory(), host, place), conn
            )
        except OSError:
            conn.close()

    def _opened(self, transport: asyncio.BaseTransport, host: str, reserve: bool) -> None:
        self.open += 1
        if reserve:
            self._reserved.add(transport)
            self._reserve_by_host[host] = self._reserve_by_host.get(host, 0) + 1

    def _closed(self, transport: asyncio.BaseTransport, host: str, reserve: bool) -> None:
        self.open -= 1
        if reserve:
            self._reserved.discard(transport)
            left = self._reserve_by_host.get(host, 1) - 1
            if left > 0:
                self._reserve_by_host[host] = left
            else:
                self._reserve_by_host.pop(host, None)


class _Tracked(asyncio.Protocol):
    """The real protocol behind a stand-in that counts the connection while it is open."""

    def __init__(self, listener: Listener, inner: asyncio.Protocol, host: str, reserve: bool):
        self._listener, self._inner, self._host, self._reserve = listener, inner, host, reserve
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._listener._opened(transport, self._host, self._reserve)
        if self._reserve:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._listener.limits.reserve_lifetime, _abort, transport)
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._listener._closed(self._transport, self._host, self._reserve)
            self._transport = None
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)  # every stream transport has one
    if callable(abort):
        abort()
    else:
        transport.close()
