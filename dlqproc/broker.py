"""NATS JetStream: the connection, the DLQ topology, fetching and settling messages.

The only module that imports nats. The rest of dlqproc sees Inbound messages
with plain attributes and four settle calls (ack, nak with a delay, term,
in_progress).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import NotFoundError

log = logging.getLogger("dlqproc.broker")

DAY = 86400.0


class Topology(msgspec.Struct, frozen=True):
    """The DLQ stream and consumer as configured."""

    stream: str
    subjects: tuple[str, ...]
    max_age_days: float
    durable: str
    filter_subject: str
    max_deliver: int
    ack_wait: float
    max_ack_pending: int


class Inbound:
    """One fetched DLQ message and the JetStream metadata dlqproc needs."""

    __slots__ = (
        "_msg",
        "consumer_seq",
        "data",
        "num_delivered",
        "received",
        "stream",
        "stream_seq",
        "subject",
        "touched",
    )

    def __init__(self, msg: Msg) -> None:
        meta = msg.metadata
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.num_delivered: int = meta.num_delivered
        self.stream: str = meta.stream
        self.stream_seq: int = meta.sequence.stream
        self.consumer_seq: int = meta.sequence.consumer
        # Monotonic times: when fetched, and when JetStream last heard from us
        # about it (fetch or in-progress), which restarts its ack-wait clock.
        self.received = self.touched = time.monotonic()

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay=delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()
        self.touched = time.monotonic()


class Broker:
    """Owns the NATS connection and the DLQ pull subscription."""

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._sub: Any = None
        self._topology: Topology | None = None

    @classmethod
    async def connect(cls, url: str, name: str = "dlqproc") -> Broker:
        async def on_disconnect() -> None:
            if not nc.is_closed and not nc.is_draining:
                log.warning("NATS disconnected")

        async def on_reconnect() -> None:
            log.info("NATS reconnected")

        async def on_error(exc: Exception) -> None:
            log.warning("NATS error", extra={"error": str(exc)})

        nc: Client = await nats.connect(
            servers=[u.strip() for u in url.split(",")],
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=5,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            error_cb=on_error,
        )
        return cls(nc)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def ensure_topology(self, want: Topology) -> list[str]:
        """Create or reconcile the DLQ stream and consumer; return what changed."""
        changes: list[str] = []
        stream_cfg = api.StreamConfig(
            name=want.stream,
            subjects=list(want.subjects),
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=want.max_age_days * DAY,
        )
        try:
            info = await self._js.stream_info(want.stream)
        except NotFoundError:
            await self._js.add_stream(stream_cfg)
            changes.append(f"created stream {want.stream}")
        else:
            have = info.config
            diffs = []
            if sorted(have.subjects or []) != sorted(want.subjects):
                diffs.append(f"subjects {have.subjects} -> {list(want.subjects)}")
            if abs((have.max_age or 0) - want.max_age_days * DAY) > 1:
                diffs.append(f"max_age {have.max_age}s -> {want.max_age_days * DAY}s")
            if diffs:
                await self._js.update_stream(stream_cfg)
                changes.append(f"updated stream {want.stream}: " + ", ".join(diffs))

        consumer_cfg = api.ConsumerConfig(
            name=want.durable,
            durable_name=want.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            filter_subject=want.filter_subject,
            max_deliver=want.max_deliver,
            ack_wait=want.ack_wait,
            max_ack_pending=want.max_ack_pending,
        )
        try:
            cinfo = await self._js.consumer_info(want.stream, want.durable)
        except NotFoundError:
            await self._js.add_consumer(want.stream, consumer_cfg)
            changes.append(f"created consumer {want.durable}")
        else:
            have_c = cinfo.config
            diffs = [
                f"{field} {old} -> {new}"
                for field, old, new in (
                    ("filter_subject", have_c.filter_subject, want.filter_subject),
                    ("max_deliver", have_c.max_deliver, want.max_deliver),
                    ("ack_wait", have_c.ack_wait, want.ack_wait),
                    ("max_ack_pending", have_c.max_ack_pending, want.max_ack_pending),
                )
                if old != new
            ]
            if diffs:
                await self._js.add_consumer(want.stream, consumer_cfg)
                changes.append(f"updated consumer {want.durable}: " + ", ".join(diffs))
        self._topology = want
        return changes

    async def bind(self, topology: Topology) -> None:
        """Use an existing topology (for tools that inspect the consumer)."""
        self._topology = topology

    async def subscribe(self) -> None:
        assert self._topology is not None, "ensure_topology first"
        self._sub = await self._js.pull_subscribe_bind(
            durable=self._topology.durable, stream=self._topology.stream
        )

    async def fetch(self, batch: int, timeout: float) -> list[Inbound]:
        """Up to `batch` messages; an empty list when none arrived within `timeout`."""
        try:
            msgs: Sequence[Msg] = await self._sub.fetch(batch=batch, timeout=timeout)
        except (NatsTimeoutError, TimeoutError):
            return []
        return [Inbound(m) for m in msgs]

    async def pending(self) -> tuple[int, int]:
        """(messages not yet delivered, messages delivered but not settled)."""
        assert self._topology is not None
        info = await self._js.consumer_info(self._topology.stream, self._topology.durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> int:
        """Publish to JetStream and wait for its acknowledgement; returns the sequence."""
        ack = await self._js.publish(subject, data, headers=headers)
        return int(ack.seq)

    async def flush(self, timeout: float = 5.0) -> None:
        await self._nc.flush(timeout=int(timeout))

    async def close(self) -> None:
        """Flush settles already sent, then close. Safe to call twice."""
        if self._nc.is_closed:
            return
        try:
            if self._nc.is_connected:
                await self._nc.flush(timeout=5)
        except Exception as exc:
            log.warning("NATS flush on close failed", extra={"error": str(exc)})
        try:
            await self._nc.close()
        except Exception as exc:  # a transport already torn down: nothing left to flush
            log.warning("NATS close failed", extra={"error": str(exc)})
