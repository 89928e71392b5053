"""Start-up against a NATS that misbehaves once: a JetStream API request that goes
unanswered, and servers of NATS_URL that are down when dlqproc starts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Self

from dlqproc.embedded import NatsServer, free_port
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


class SwallowingProxy:
    """A TCP proxy in front of a nats-server that drops the first message a client
    publishes to a subject starting with `prefix`: that one request is never
    answered, as when a JetStream leader misses it.

    The NATS client protocol is text: `PUB <subject> [reply] <size>\\r\\n<payload>\\r\\n`,
    `HPUB <subject> [reply] <header size> <total size>\\r\\n<headers+payload>\\r\\n`,
    and one-line operations (CONNECT, SUB, PING...). The server's side is passed
    through untouched.
    """

    def __init__(self, upstream_port: int, prefix: str) -> None:
        self.upstream_port = upstream_port
        self.prefix = prefix.encode()
        self.port = free_port()
        self.swallowed: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, coro: object) -> None:
        done: Future[None] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        done.result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [client_w, server_w]
        await asyncio.gather(self._pipe(server_r, client_w), self._from_client(client_r, server_w))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _from_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        buf = b""
        try:
            while chunk := await reader.read(1 << 16):
                buf += chunk
                out, buf = self._filter(buf)
                if out:
                    writer.write(out)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def _filter(self, buf: bytes) -> tuple[bytes, bytes]:
        """(complete operations to forward, what is left incomplete)."""
        out = bytearray()
        while (end := buf.find(b"\r\n")) >= 0:
            line = buf[:end]
            args = line.split()
            if args and args[0].upper() in (b"PUB", b"HPUB"):
                size = end + 2 + int(args[-1]) + 2  # the last argument: payload (+ headers) size
                if len(buf) < size:
                    break
                frame, buf = buf[:size], buf[size:]
                if not self.swallowed and args[1].startswith(self.prefix):
                    self.swallowed.append(args[1].decode())
                    continue
                out += frame
            else:
                out += buf[: end + 2]
                buf = buf[end + 2 :]
        return bytes(out), buf


def test_startup_survives_one_unanswered_consumer_info(
    service: Make, nats_server: NatsServer
) -> None:
    # Another replica has just created the stream and the consumer.
    first = service()
    with SwallowingProxy(nats_server.port, "$JS.API.CONSUMER.INFO.") as proxy:
        second = service(
            start=False,
            nats_url=proxy.url,
            NATS_DLQSTREAM=first.stream,
            NATS_DLQSUBJECT=first.subject,
            NATS_APITIMEOUT="1s",
        )
        second.start()  # fails if it exits instead
        assert proxy.swallowed == [f"$JS.API.CONSUMER.INFO.{first.stream}.{first.durable}"]
        [retry] = second.find("NATS topology not ready, retrying")
        assert "timeout" in retry["error"].lower(), retry
        assert not second.find("cannot start: NATS topology")
        second.wait_ready(30)
        first.stop()
        second.publish("acme", [envelope("t.ok", "acme", {"id": "after-retry"})])
        wait_until(lambda: second.rows("acme") == {"after-retry": 1}, timeout=30)
        assert second.proc is not None and second.proc.poll() is None


def test_every_server_of_nats_url_is_tried_until_one_answers(service: Make, tmp_path: Path) -> None:
    # Neither server runs when dlqproc starts; the one it will reach is listed
    # second, and comes up only once dlqproc has been refused by both.
    late = NatsServer(tmp_path / "late")
    never = free_port()
    svc = service(
        start=False, nats_url=f"nats://127.0.0.1:{never},{late.url}", NATS_STARTUPTIMEOUT="60s"
    )
    svc.start(wait=False)

    # nats-py takes the servers in turn (in a shuffled order): two refusals in
    # a row are one from each.
    wait_until(lambda: len(svc.find("NATS not reachable yet, retrying")) >= 2, timeout=30)
    with late:
        wait_until(lambda: svc.find("Starting DLQ worker..."), timeout=60)
        assert svc.proc is not None and svc.proc.poll() is None
        svc.publish("acme", [envelope("t.ok", "acme", {"id": "late"})])
        wait_until(lambda: svc.rows("acme") == {"late": 1}, timeout=30)
        svc.stop()


def test_a_user_denied_jetstream_advisories_still_runs(service: Make, tmp_path: Path) -> None:
    # The failover advisories are a shortcut, not a need: a NATS user who may
    # not subscribe to them gets one error line per subscription and the
    # fetch backoff alone.
    config = (
        "authorization { users = [ { user: dlq, password: s3cret,"
        ' permissions: { subscribe: { deny: ["$JS.EVENT.ADVISORY.>"] } } } ] }'
    )
    with NatsServer(tmp_path / "restricted", config=config) as server:
        svc = service(nats_url=f"nats://dlq:s3cret@127.0.0.1:{server.port}")
        svc.publish("acme", [envelope("t.ok", "acme", {"id": "restricted"})])
        wait_until(lambda: svc.rows("acme") == {"restricted": 1}, timeout=30)
        # nats-py lower-cases the server's error.
        denied = [e["error"] for e in svc.find("NATS error") if "permissions" in e["error"].lower()]
        assert len(denied) == 2 and all("advisory" in e.lower() for e in denied), denied
        svc.wait_ready(10)
        svc.stop()
