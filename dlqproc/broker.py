"""NATS JetStream: the connection, the DLQ topology, fetching and settling messages.

The only module that imports nats. The rest of dlqproc sees Inbound messages
with plain attributes and four settle calls (ack, nak with a delay, term,
in_progress).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import ParseResult

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

log = logging.getLogger("dlqproc.broker")

DAY = 86400.0


class StreamSpec(msgspec.Struct, frozen=True):
    name: str
    subjects: tuple[str, ...]
    max_age_days: float
    retention: str = "limits"  # or "interest"


class ConsumerSpec(msgspec.Struct, frozen=True):
    """A durable pull consumer with explicit acks."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    max_deliver: int  # -1: JetStream redelivers without limit
    ack_wait: float
    max_ack_pending: int


def ack_fields(reply: str) -> tuple[str, str, int, int, int] | None:
    """(stream, consumer, delivered count, stream seq, consumer seq) of a JetStream reply subject.

    "$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>", or
    the form with "<domain>.<account hash>" after "$JS.ACK" and a trailing
    token. nats-py's Msg.metadata parses the same, plus a timestamp we do not
    need, at several times the cost per message.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        at = 2
    elif len(tokens) >= 11:
        at = 4
    else:
        return None
    if tokens[0] != "$JS" or tokens[1] != "ACK":
        return None
    try:
        return (
            tokens[at],
            tokens[at + 1],
            int(tokens[at + 2]),
            int(tokens[at + 3]),
            int(tokens[at + 4]),
        )
    except ValueError:
        return None


class Inbound:
    """One fetched DLQ message and the JetStream metadata dlqproc needs."""

    __slots__ = (
        "_msg",
        "consumer",
        "consumer_seq",
        "data",
        "msg_id",
        "num_delivered",
        "stream",
        "stream_seq",
        "subject",
        "touched",
    )

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        fields = ack_fields(msg.reply)
        if fields is None:  # a reply subject of a form we do not know: nats-py's parser
            meta = msg.metadata
            fields = (
                meta.stream,
                meta.consumer,
                meta.num_delivered,
                meta.sequence.stream,
                meta.sequence.consumer,
            )
        self.stream, self.consumer, self.num_delivered, self.stream_seq, self.consumer_seq = fields
        self.msg_id: str = (msg.headers or {}).get("Nats-Msg-Id", "")
        # When JetStream last heard from us about it (fetch or in-progress),
        # which restarts its ack-wait clock.
        self.touched = time.monotonic()

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()
        self.touched = time.monotonic()


class FetchFailed(Exception):
    """JetStream answered a pull request with an error (e.g. the consumer is gone)."""


class Puller:
    """Fetches from one durable pull consumer with JetStream pull requests.

    nats-py's fetch() waits for every message with a timer task of its own;
    at thousands of messages a second that was most of the supervisor's fetch
    cost. Here a subscription callback collects what requests deliver, and
    the end of the current one (its batch filled, its first message for a long
    poll, or a status message) wakes the fetch once. Each request has its own
    reply subject, so a late status of an earlier request cannot end the
    current one; a message that arrives while no fetch waits is kept for the
    next.
    """

    def __init__(self, nc: Client, spec: ConsumerSpec) -> None:
        self._nc = nc
        self.spec = spec
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{spec.stream}.{spec.durable}"
        self._inbox = nc.new_inbox()
        self._requests = 0
        self._current = ""  # reply subject of the request a fetch waits for
        self._want = 0
        self._first_wakes = False  # a long poll returns with its first message
        self._wake: asyncio.Future[None] | None = None
        self._error: FetchFailed | None = None
        self._got: list[Msg] = []
        # The last request ended at a message larger than its byte limit.
        self.size_limited = False

    async def subscribe(self) -> None:
        await self._nc.subscribe(self._inbox + ".*", cb=self._on_message)

    async def fetch(self, batch: int, timeout: float, max_bytes: int = 0) -> list[Inbound]:
        """Up to `batch` messages of at most `max_bytes` in all (0: no byte limit).

        An empty list when none arrived within `timeout`, or when the next
        message alone exceeds `max_bytes`: JetStream then ends the request and
        `size_limited` is set. Raises FetchFailed when JetStream refuses the
        request.
        """
        self.size_limited = False
        if not self._got:
            # What is there now, at once; then, if nothing, wait for the first.
            await self._request(batch, timeout, max_bytes, long_poll=False)
            if not self._got and not self.size_limited:
                await self._request(batch, timeout, max_bytes, long_poll=True)
        got, self._got = self._got[:batch], self._got[batch:]
        return [Inbound(m) for m in got]

    async def _request(self, batch: int, timeout: float, max_bytes: int, long_poll: bool) -> None:
        """One pull request, made when nothing is kept; returns once it has ended."""
        body: dict[str, object] = {"batch": batch}
        if max_bytes > 0:
            # JetStream stops before the message that would pass the limit.
            body["max_bytes"] = max_bytes
        if long_poll:
            body["expires"] = int(timeout * 1e9)
        else:
            body["no_wait"] = True
        self._requests += 1
        self._current = f"{self._inbox}.{self._requests}"
        self._want = batch
        self._first_wakes = long_poll
        self._error = None
        wake = self._wake = asyncio.get_running_loop().create_future()
        await self._nc.publish(self._next, msgspec.json.encode(body), reply=self._current)
        try:
            # JetStream ends an expiring request itself; the margin covers the trip.
            await asyncio.wait_for(wake, timeout + 1.0)
        except TimeoutError:
            pass
        finally:
            self._current = ""
        if self._error is not None:
            raise self._error

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status is None:
            # Whichever request delivered it: an earlier long poll stays open on
            # the server and takes new messages before the current one does.
            self._got.append(msg)
            if self._current and (self._first_wakes or len(self._got) >= self._want):
                self._end()
            return
        if msg.subject != self._current or status == "100":  # stale, or a heartbeat
            return
        # 404 no messages, 408 expired, 409 too many waiting requests or the
        # next message is over the byte limit: the request is simply over.
        # Anything else is an error: 503 when no consumer answers (it or its
        # stream was deleted), other 409s for a deleted consumer or limits the
        # request breaks.
        description = (msg.headers or {}).get("Description", "")
        if status == "409" and description.startswith("Message Size Exceeds MaxBytes"):
            self.size_limited = True
        over = (
            status in ("404", "408")
            or self.size_limited
            or (status == "409" and description.startswith("Exceeded MaxWaiting"))
        )
        if not over:
            self._error = FetchFailed(f"{status} {description}".strip())
        self._end()

    def _end(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class PublishFailed(Exception):
    """JetStream did not acknowledge a publish."""


class ConnectFailed(ConnectionError):
    """No NATS server accepted the connection within the time allowed."""


class ConnectRefused(ConnectFailed):
    """A NATS server refused the credentials (or their absence): retrying cannot help."""


def server_list(url: str) -> list[str]:
    """The servers of a comma-separated nats.url, as Broker.connect hands them to nats-py."""
    return [u.strip() for u in url.split(",")]


def parse_server(server: str) -> ParseResult | None:
    """One server as nats-py itself reads it (scheme and port defaults, userinfo), or
    None when nats-py refuses it. Redaction uses this, so that what it hides is
    exactly what the client would send as user, password or token."""
    try:
        return Client._parse_server_uri(server)
    except Exception:
        return None


def _refusal(exc: Exception) -> bool:
    """Whether a connect error is the server refusing the credentials.

    nats-py raises a plain Error("nats: 'Authorization Violation'") for it on the
    first connection (its AuthorizationError only once connected); the server
    also ends a connection with 'Authentication Timeout' or an expired or
    revoked user. None of them heals by reconnecting.
    """
    text = str(exc).lower()
    return type(exc).__name__ == "AuthorizationError" or any(
        word in text for word in ("authorization violation", "authentication")
    )


class Broker:
    """Owns the NATS connection, the streams and consumers dlqproc uses."""

    def __init__(self, nc: Client, state: dict[str, bool]) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._state = state  # shared with the connection callbacks

    @classmethod
    async def connect(cls, url: str, name: str = "dlqproc", timeout: float = 30.0) -> Broker:
        """Connect to the first server of `url` that accepts; keep reconnecting once connected.

        Raises ConnectRefused as soon as a server refuses the credentials (nats-py
        alone would retry them forever), and ConnectFailed naming the last error
        when nothing accepted within `timeout` seconds.
        """
        state = {"closing": False}
        nc = Client()
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        last_error = ""

        async def on_disconnect() -> None:
            if not state["closing"]:
                log.warning("NATS disconnected")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        async def on_error(exc: Exception) -> None:
            nonlocal last_error
            last_error = str(exc) or type(exc).__name__
            if not refused.done() and _refusal(exc):
                refused.set_result(last_error)
            log.warning("NATS error", extra={"error": last_error})

        connecting = asyncio.ensure_future(
            nc.connect(
                servers=server_list(url),
                name=name,
                max_reconnect_attempts=-1,
                # nats-py annotates it int; it takes seconds as a float.
                reconnect_time_wait=0.5,  # type: ignore[arg-type]
                connect_timeout=5,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
            )
        )
        try:
            either: set[asyncio.Future[Any]] = {connecting, refused}
            await asyncio.wait(either, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connecting.done():
                # Refused, timed out, or this task cancelled: stop nats-py's retry loop.
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                await nc.close()
        if not connecting.cancelled() and connecting.exception() is None:
            return cls(nc, state)
        if refused.done():
            raise ConnectRefused(f"NATS refused the credentials: {refused.result()}")
        if not connecting.cancelled() and (exc := connecting.exception()) is not None:
            raise ConnectFailed(f"NATS connect failed: {exc or type(exc).__name__}") from exc
        raise ConnectFailed(
            f"no NATS server accepted a connection within {timeout:g} s"
            + (f" (last error: {last_error})" if last_error else "")
        )

    @property
    def max_payload(self) -> int:
        """The largest message the server accepts (1 MiB unless configured)."""
        return int(self._nc.max_payload or 1024 * 1024)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def ensure_stream(self, want: StreamSpec, reconcile: bool) -> list[str]:
        """Create the stream if missing; with `reconcile`, align subjects and max age."""
        retention = (
            api.RetentionPolicy.INTEREST
            if want.retention == "interest"
            else api.RetentionPolicy.LIMITS
        )
        config = api.StreamConfig(
            name=want.name,
            subjects=list(want.subjects),
            retention=retention,
            storage=api.StorageType.FILE,
            max_age=want.max_age_days * DAY,
        )
        try:
            info = await self._js.stream_info(want.name)
        except NotFoundError:
            await self._js.add_stream(config)
            return [f"created stream {want.name}"]
        have = info.config
        diffs = []
        if sorted(have.subjects or []) != sorted(want.subjects):
            diffs.append(f"subjects {have.subjects} -> {list(want.subjects)}")
        if abs((have.max_age or 0) - want.max_age_days * DAY) > 1:
            diffs.append(f"max_age {have.max_age}s -> {want.max_age_days * DAY}s")
        if not diffs:
            return []
        if not reconcile:
            # Another service owns this stream: report, never change it.
            return [f"stream {want.name} differs (left as is): " + ", ".join(diffs)]
        await self._js.update_stream(config)
        return [f"updated stream {want.name}: " + ", ".join(diffs)]

    async def ensure_consumer(self, want: ConsumerSpec) -> list[str]:
        """Create or reconcile a durable pull consumer; return what changed."""
        filters = list(want.filter_subjects)
        config = api.ConsumerConfig(
            name=want.durable,
            durable_name=want.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            max_deliver=want.max_deliver,
            ack_wait=want.ack_wait,
            max_ack_pending=want.max_ack_pending,
        )
        try:
            info = await self._js.consumer_info(want.stream, want.durable)
        except NotFoundError:
            await self._js.add_consumer(want.stream, config)
            return [f"created consumer {want.durable}"]
        have = info.config
        have_filters = (
            [have.filter_subject] if have.filter_subject else (have.filter_subjects or [])
        )
        diffs = [
            f"{field} {old} -> {new}"
            for field, old, new in (
                ("filter_subjects", sorted(have_filters), sorted(filters)),
                ("max_deliver", have.max_deliver, want.max_deliver),
                ("ack_wait", have.ack_wait, want.ack_wait),
                ("max_ack_pending", have.max_ack_pending, want.max_ack_pending),
            )
            if old != new
        ]
        if not diffs:
            return []
        await self._js.add_consumer(want.stream, config)
        return [f"updated consumer {want.durable}: " + ", ".join(diffs)]

    async def pending(self, stream: str, durable: str) -> tuple[int, int]:
        """(messages not yet delivered, messages delivered but not settled) of a consumer."""
        info = await self._js.consumer_info(stream, durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def stream_messages(self, stream: str) -> int:
        """Messages a stream holds now."""
        return int((await self._js.stream_info(stream)).state.messages)

    async def puller(self, spec: ConsumerSpec) -> Puller:
        puller = Puller(self._nc, spec)
        await puller.subscribe()
        return puller

    async def publish(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Publish to JetStream and wait for its acknowledgement; returns the sequence."""
        try:
            ack = await self._js.publish(subject, data, headers=headers, timeout=timeout)
        except Exception as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        return int(ack.seq)

    async def close(self) -> None:
        """Flush settles already sent, then close. Safe to call twice."""
        if self._nc.is_closed:
            return
        self._state["closing"] = True
        try:
            if self._nc.is_connected:
                await self._nc.flush(timeout=5)
        except Exception as exc:
            log.warning("NATS flush on close failed", extra={"error": str(exc)})
        try:
            await self._nc.close()
        except Exception as exc:  # a transport already torn down: nothing left to flush
            log.warning("NATS close failed", extra={"error": str(exc)})
