"""The supervisor: serve, the fetch loop, dispatch to the pool, and the shutdown order.

It is the only code that touches NATS messages. Every message goes through
the same steps, whatever its lane (dlqproc.lanes):

    fetch -> ledger (local queue) -> worker batch -> outcome
          -> committer: policy.decide, one transaction, settle by the lane
          -> ACK (rows committed) / TERM (exhausted row committed) / NAK(delay)

The in-flight ledger (dlqproc.ledger) does the bookkeeping, the committer
(dlqproc.committer) the writing and settling; this module runs the loops that
feed them and stops them in an order that loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec

from dlqproc import lanes as lane_types
from dlqproc.broker import Broker, Inbound
from dlqproc.committer import Committer
from dlqproc.config import Config
from dlqproc.lanes import FlowLane, Held
from dlqproc.ledger import Ledger, Taken
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, Failed, FailureKind, Reason, failure
from dlqproc.observe import show_gauges
from dlqproc.policy import (
    Budget,
    dlq_policy,
    event_policy,
    expired_locally,
    needs_progress,
    unexpected_error_text,
)
from dlqproc.pool import Pool
from dlqproc.reprocess import Limits, bare_stored
from dlqproc.settle import LaneRuntime, fields
from dlqproc.store import Store

__all__ = ["Supervisor", "dlq_policy", "event_policy", "internal_failure"]

# Operators filter on this logger name (operator guide, section 1.2).
log = logging.getLogger("dlq_worker")

# Seconds a pull request waits for messages: short, so one sent to a JetStream
# leader that died is given up soon, and so an idle replica's request does not
# sit on the server taking messages it could not work on sooner than another.
_LONG_POLL = 0.5


def internal_failure(delivery: Delivery, exc: Exception, limits: Limits) -> Failed:
    """The outcome of a delivery whose batch failed outside any handler."""
    return failure(
        delivery.token,
        bare_stored(delivery, limits),
        FailureKind.TRANSIENT,
        Reason.HANDLER_ERROR,
        unexpected_error_text(exc),
    )


class _Loops(msgspec.Struct, frozen=True):
    """The supervisor's tasks while it serves."""

    fetchers: tuple[asyncio.Task[None], ...]
    dispatcher: asyncio.Task[None]
    committer: asyncio.Task[None]
    heart: asyncio.Task[None]

    @property
    def all(self) -> tuple[asyncio.Task[None], ...]:
        return (*self.fetchers, self.dispatcher, self.committer, self.heart)


class Supervisor:
    def __init__(
        self,
        cfg: Config,
        broker: Broker,
        store: Store,
        pool: Pool,
        metrics: Metrics,
        lanes: Sequence[LaneRuntime],
    ) -> None:
        self.cfg = cfg
        self.broker = broker
        self.store = store
        self.pool = pool
        self.metrics = metrics
        n = cfg.nats
        self.lanes = tuple(lane_types.build(spec, broker, metrics, n.dlq_subject) for spec in lanes)
        self.stop_requested = asyncio.Event()
        self.ledger: Ledger[Held] = Ledger(Budget(n.max_in_flight, n.max_in_flight_bytes))
        self._work = asyncio.Event()  # the queue gained messages
        self._room = asyncio.Event()  # held messages were released
        self.committer = Committer(store, self.ledger, metrics, self._room, random.Random())
        # Readiness: when each lane's fetch last returned; lanes whose last
        # fetch failed (since last_fetch). Written by the fetch loops alone.
        now = time.monotonic()
        self.last_fetch: dict[str, float] = {lane.name: now for lane in self.lanes}
        self.fetch_failing: set[str] = set()
        self._restoring: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(max(1, n.dlq_workers))
        # While a batch is out at a worker, the supervisor holds its request
        # frame and then its reply (rows plus what exhausting would need, ~3x
        # the input for a history batch) as a frame and decoded, all at once.
        # So the input bytes out at the workers are bounded by a share of the
        # in-flight budget, not by the worker count, and split between the
        # workers so that each still gets its own batch.
        self._pool_bytes = max(1, n.max_in_flight_bytes // 4)
        self._batch_bytes = max(
            1, min(n.worker_batch_bytes, self._pool_bytes // max(1, n.dlq_workers))
        )
        self._returned = asyncio.Event()  # a batch came back from the workers
        self._batches: dict[asyncio.Task[None], Taken[Held]] = {}
        self._limits = Limits(
            n.dlq_subject, n.max_payload_bytes, timestamp_horizon=cfg.handlers.timestamp_horizon
        )
        self._loops: _Loops | None = None  # once serving

    # ------------------------------------------------------------- readiness

    @property
    def alive(self) -> bool:
        """Every loop of the supervisor is still running."""
        return self._loops is not None and not any(t.done() for t in self._loops.all)

    @property
    def store_ok(self) -> bool:
        return self.committer.store_ok

    @property
    def commit_failures(self) -> int:
        return self.committer.commit_failures

    @property
    def commit_error(self) -> str:
        return self.committer.commit_error

    # ---------------------------------------------------------------- running

    async def serve(self) -> None:
        """Run until a stop is requested or the pool cannot keep its workers."""
        log.info(
            "Starting DLQ worker...",
            extra={
                "stream": self.cfg.nats.dlq_stream,
                "consumer": self.cfg.dlq_durable,
                "filter_subject": self.cfg.dlq_filter_subject,
                "workers": self.cfg.nats.dlq_workers,
                "company_id": self.cfg.company.id or "*",
            },
        )
        self._loops = loops = _Loops(
            tuple(
                asyncio.create_task(self._fetch_loop(lane), name=f"fetch-{lane.name}")
                for lane in self.lanes
            ),
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self.committer.run(), name="commit"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        )
        assert self.pool.failed is not None
        stop = asyncio.create_task(self.stop_requested.wait())
        watched: list[asyncio.Future[object]] = [stop, self.pool.failed, *loops.all]  # type: ignore[list-item]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in loops.all:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _fetch_loop(self, lane: FlowLane) -> None:
        failures = 0
        puller = lane.spec.puller
        while not self.stop_requested.is_set():
            if not self.committer.store_ok:
                await self._wait_for_store()
                continue
            plan = self.ledger.plan(lane.name, lane.spec.fetch_batch)
            if plan.batch == 0:
                self._room.clear()
                await self._room.wait()
                continue
            lane.observe.fetching()
            try:
                msgs = await puller.fetch(plan.batch, timeout=_LONG_POLL, max_bytes=plan.max_bytes)
            except Exception as exc:
                lane.observe.fetch_failed()
                failures += 1
                log.warning(
                    "fetch failed",
                    extra={"lane": lane.name, "error": str(exc), "failures": failures},
                )
                self.fetch_failing.add(lane.name)
                if failures == 3 or failures % 10 == 0:
                    # In the background: its API calls must not hold up the
                    # fetch that succeeds as soon as NATS has a new leader.
                    self._restore_in_background(lane)
                # From 50 ms up to 1 s, cut short when NATS elects a new leader.
                await puller.backoff(
                    min(0.05 * 2 ** min(failures - 1, 5), 1.0), self.stop_requested
                )
                continue
            failures = 0
            self.fetch_failing.discard(lane.name)
            self.last_fetch[lane.name] = time.monotonic()
            if puller.size_limited and not msgs:
                if self.ledger.oversized(lane.name):
                    log.info(
                        "next message exceeds the in-flight byte room; fetching it alone",
                        extra={"lane": lane.name, "room": plan.max_bytes},
                    )
                continue
            if self.ledger.fitted(lane.name):
                self._room.set()  # other lanes held back for this one
            self._admit(lane, msgs)

    def _admit(self, lane: FlowLane, msgs: Sequence[Inbound]) -> None:
        for msg in msgs:
            held = lane.hold(msg)
            self.ledger.admit(held, len(msg.data))
            lane.observe.admitted(held)
        if msgs:
            show_gauges(self.metrics, self.ledger.gauges())
            self._work.set()

    def _restore_in_background(self, lane: FlowLane) -> None:
        """Start a topology restore for the lane unless one is still running."""
        running = self._restoring.get(lane.name)
        if running is None or running.done():
            self._restoring[lane.name] = asyncio.create_task(
                self._restore_topology(lane), name=f"restore-{lane.name}"
            )

    async def _restore_topology(self, lane: FlowLane) -> None:
        """Fetches keep failing: the stream or consumer may have been deleted."""
        spec = lane.spec
        try:
            changes = await self.broker.ensure_stream(spec.stream, reconcile=spec.owns_stream)
            changes += await self.broker.ensure_consumer(spec.puller.spec)
        except Exception as exc:
            log.warning(
                "cannot restore NATS topology", extra={"lane": lane.name, "error": str(exc)}
            )
            return
        for change in changes:
            log.info("NATS topology reconciled", extra={"change": change})

    async def _pause(self, seconds: float) -> None:
        """Sleep that ends early when a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_requested.wait(), seconds)

    async def _wait_for_store(self) -> None:
        """Fetch nothing while Postgres is down: deliveries would only be burned."""
        # Every lane waits here; the first to see PostgreSQL answer ends the
        # outage for all of them, and only it logs: one line per outage.
        while not self.stop_requested.is_set() and not self.committer.store_ok:
            if await self.store.ping():
                self.committer.store_answered()
                return
            await self._pause(1.0)

    async def _dispatch_loop(self) -> None:
        size = self.cfg.nats.worker_batch

        def expired(held: Held) -> bool:
            return expired_locally(now - held.msg.touched, held.lane.spec.ack_wait)

        while True:
            await self._work.wait()
            self._work.clear()
            while self.ledger.queued and not self.stop_requested.is_set():
                await self._slots.acquire()
                while self.ledger.working >= self._pool_bytes:
                    self._returned.clear()
                    await self._returned.wait()
                if self.stop_requested.is_set():
                    self._slots.release()
                    break
                now = time.monotonic()
                room = min(self._batch_bytes, self._pool_bytes - self.ledger.working)
                taken = self.ledger.take(size, room, now, expired)
                for held in taken.expired:
                    held.lane.observe.expired(held)
                show_gauges(self.metrics, self.ledger.gauges())
                if not taken.tokens:
                    self._slots.release()
                    self._room.set()
                    continue
                task = asyncio.create_task(self._run_batch(taken))
                self._batches[task] = taken

    async def _run_batch(self, taken: Taken[Held]) -> None:
        tokens = taken.tokens
        try:
            received_at = datetime.now(UTC).isoformat()
            deliveries = []
            for token in tokens:
                held = self.ledger[token]
                deliveries.append(held.lane.delivery(token, held, received_at))
                held.lane.observe.submitted(held)
            self.metrics.workers_active.inc()
            try:
                outcomes = await self.pool.run(deliveries)
            except Exception as exc:
                # Never strand a batch: its messages fail transiently and are retried.
                log.exception("worker pool failed a batch")
                outcomes = [internal_failure(d, exc, self._limits) for d in deliveries]
            finally:
                self.metrics.workers_active.dec()
            self.committer.submit(tokens, outcomes)
        finally:
            # Whatever ended the batch (a bug, cancellation before it ran), its
            # bytes leave `working`, or the dispatcher would wait on them for ever.
            self.ledger.returned(taken)
            self._returned.set()
            self._slots.release()
            self._batches.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _heartbeat_loop(self) -> None:
        """Keep JetStream from redelivering what waits or runs longer than half the ack wait."""
        shortest = min(lane.spec.ack_wait for lane in self.lanes)
        while True:
            await asyncio.sleep(min(shortest / 4, 5.0))
            if not self.broker.connected:
                # nats-py would buffer the in-progress acks until it reconnects,
                # so they would not keep anything alive: leave `touched` stale.
                continue
            now = time.monotonic()
            for held in self.ledger.items():
                if needs_progress(now - held.msg.touched, held.lane.spec.ack_wait):
                    try:
                        await held.msg.in_progress()
                    except Exception as exc:
                        log.warning(
                            "in-progress ack failed", extra={**fields(held.msg), "error": str(exc)}
                        )

    # ------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop in an order that loses nothing; see the numbered steps."""
        nak_delay = self.cfg.nats.shutdown_nak_delay
        hand_back = self.committer.hand_back
        self.stop_requested.set()
        log.info(
            "shutting down",
            extra={"in_flight": len(self.ledger), "grace_seconds": self.cfg.nats.shutdown_grace},
        )
        loops = self._loops
        # 1. Stop fetching, so no new message enters (a fetcher may wait for room).
        self._room.set()
        if loops is not None:
            await asyncio.gather(*loops.fetchers, return_exceptions=True)
            loops.dispatcher.cancel()
        for restoring in self._restoring.values():
            restoring.cancel()
        # Delivered to a puller but never fetched: back to JetStream like the queue.
        for lane in self.lanes:
            self._admit(lane, lane.spec.puller.drain())
        # 2. Hand back what never reached a worker, with a short delay so another
        #    replica (or this one, restarted) takes it up soon.
        while (token := self.ledger.unqueue()) is not None:
            await hand_back(token, nak_delay)
        # 3. Let batches in the workers finish within the grace period; what
        #    finishes is committed and ACKed by the committer as usual.
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=self.cfg.nats.shutdown_grace)
        # 4. Past the grace period, NAK what is still running; a late result is dropped.
        for task, taken in list(self._batches.items()):
            task.cancel()
            for token in taken.tokens:
                await hand_back(token, nak_delay)
        # 5. Drain the committer, so every finished outcome is committed and settled.
        if loops is not None:
            self.committer.finish()
            await asyncio.gather(loops.committer, return_exceptions=True)
            loops.heart.cancel()
            await asyncio.gather(*loops.all, return_exceptions=True)
        # 6. Anything still held (a commit that failed) goes back to the stream.
        for token in self.ledger.tokens():
            await hand_back(token, nak_delay)
        show_gauges(self.metrics, self.ledger.gauges())
