"""The supervisor: fetch, dispatch to the pool, commit, settle; and the shutdown order.

It is the only code that touches NATS messages and PostgreSQL. Every message
goes through the same steps:

    fetch -> local queue -> worker batch -> outcome -> policy.decide
          -> one transaction for everything the outcomes need written
          -> ACK (rows committed) / TERM (exhausted row committed) / NAK(delay)

Nothing is ACKed or TERMed before its commit. A message whose commit failed is
NAKed with a delay, so it is processed, stored, or still in the stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from dlqproc.broker import Broker
from dlqproc.config import Config, MainConsumerConfig
from dlqproc.envelope import valid_tenant
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, FailureKind, Lane, Meta, Outcome, Reason
from dlqproc.policy import Action, Decision, RetryPolicy, decide
from dlqproc.pool import Pool
from dlqproc.reprocess import Limits, bare_stored
from dlqproc.settle import Held, LaneRuntime, Settler, Verdict, fields
from dlqproc.store import ItemFailed, Store, StoreUnavailable

# Operators filter on this logger name (operator guide, section 1.2).
log = logging.getLogger("dlq_worker")

_COMMIT_GROUP = 2048  # messages merged into one transaction at most


def internal_failure(delivery: Delivery, exc: Exception, limits: Limits) -> Outcome:
    """The outcome of a delivery whose batch failed outside any handler."""
    return Outcome(
        token=delivery.token,
        ok=False,
        stored=bare_stored(delivery, limits),
        kind=FailureKind.TRANSIENT,
        reason=Reason.HANDLER_ERROR,
        error=f"internal error: {type(exc).__name__}: {exc}"[:2000],
    )


def dlq_policy(cfg: Config) -> RetryPolicy:
    return RetryPolicy(
        base_delay=cfg.nats.dlq_base_delay_minutes * 60,
        max_delay=cfg.nats.dlq_max_delay_minutes * 60,
        jitter=cfg.nats.dlq_jitter,
        max_retries=cfg.nats.dlq_max_retries,
        max_deliver=cfg.nats.dlq_max_deliver,
    )


def event_policy(main: MainConsumerConfig, jitter: float) -> RetryPolicy:
    # Dead-letter after max_deliver deliveries: the last one is the budget.
    return RetryPolicy(
        base_delay=main.nak_base_delay,
        max_delay=main.nak_max_delay,
        jitter=jitter,
        max_retries=main.max_deliver,
    )


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
        self.lanes = tuple(lanes)
        self.settler = Settler(broker, metrics, cfg.nats.dlq_subject)
        self.stop_requested = asyncio.Event()
        self.store_ok = True
        self._held: dict[int, Held] = {}
        self._held_bytes = 0
        # Expected message size, to keep a fetch within the byte budget. Until a
        # fetch shows the sizes, assume a quarter of the largest allowed body:
        # a first fetch of heavy events must not take the whole budget many
        # times over.
        self._size_estimate = max(cfg.nats.dlq_max_payload_bytes / 4, 1024.0)
        self._queue: collections.deque[int] = collections.deque()
        self._tokens = itertools.count(1)
        self._work = asyncio.Event()  # the queue gained messages
        self._room = asyncio.Event()  # held messages were settled
        self._slots = asyncio.Semaphore(max(1, cfg.nats.dlq_workers))
        self._batches: dict[asyncio.Task[None], list[int]] = {}
        self._done: asyncio.Queue[tuple[list[int], list[Outcome]] | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._parked: list[tuple[int, Outcome]] = []
        self._rng = random.Random()

    # ---------------------------------------------------------------- running

    @property
    def alive(self) -> bool:
        """Every loop of the supervisor is still running."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

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
        self._fetchers = [
            asyncio.create_task(self._fetch_loop(lane), name=f"fetch-{lane.lane.value}")
            for lane in self.lanes
        ]
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatch")
        self._committer = asyncio.create_task(self._commit_loop(), name="commit")
        self._heart = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        self._unpark = asyncio.create_task(self._unpark_loop(), name="unpark")
        self._tasks = [
            *self._fetchers,
            self._dispatcher,
            self._committer,
            self._heart,
            self._unpark,
        ]
        assert self.pool.failed is not None
        stop = asyncio.create_task(self.stop_requested.wait())
        watched: list[asyncio.Future[object]] = [stop, self.pool.failed, *self._tasks]  # type: ignore[list-item]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in self._tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _fetch_loop(self, lane: LaneRuntime) -> None:
        n = self.cfg.nats
        dlq = lane.lane is Lane.DLQ
        failures = 0
        while not self.stop_requested.is_set():
            if not self.store_ok:
                await self._wait_for_store()
                continue
            free = n.dlq_max_in_flight - len(self._held)
            room = n.dlq_max_in_flight_bytes - self._held_bytes
            free = min(free, int(room // self._size_estimate))
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            if dlq:
                self.metrics.fetch_requests.inc()
            try:
                msgs = await lane.puller.fetch(min(free, lane.fetch_batch), timeout=1.0)
            except Exception as exc:
                if dlq:
                    self.metrics.fetch_errors.inc()
                failures += 1
                log.warning(
                    "fetch failed",
                    extra={"lane": lane.lane.value, "error": str(exc), "failures": failures},
                )
                if failures == 3 or failures % 10 == 0:
                    await self._restore_topology(lane)
                await self._pause(min(0.1 * 2 ** min(failures, 6), 5.0))
                continue
            failures = 0
            for msg in msgs:
                token = next(self._tokens)
                self._held_bytes += len(msg.data)
                event_type, _, tenant = msg.subject.rpartition(".")
                # Label values come from untrusted subjects: bound their cardinality.
                company = tenant if valid_tenant(tenant) else "invalid"
                self._held[token] = Held(msg, lane, company, event_type)
                self._queue.append(token)
                if not dlq:
                    self.metrics.events_received.labels(event_type, company, lane.lane.value).inc()
            if msgs:
                # Up at once when messages grow, down gradually when they shrink.
                mean = sum(len(m.data) for m in msgs) / len(msgs)
                self._size_estimate = max(mean, (self._size_estimate + mean) / 2)
                self._gauges()
                self._work.set()

    async def _restore_topology(self, lane: LaneRuntime) -> None:
        """Fetches keep failing: the stream or consumer may have been deleted."""
        try:
            changes = await self.broker.ensure_stream(lane.stream, reconcile=lane.owns_stream)
            changes += await self.broker.ensure_consumer(lane.puller.spec)
        except Exception as exc:
            log.warning(
                "cannot restore NATS topology", extra={"lane": lane.lane.value, "error": str(exc)}
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
        while not self.stop_requested.is_set():
            if await self.store.ping():
                log.info("Postgres reachable again, resuming fetch")
                self.store_ok = True
                return
            await self._pause(1.0)

    async def _dispatch_loop(self) -> None:
        size = self.cfg.nats.dlq_worker_batch
        max_bytes = self.cfg.nats.dlq_worker_batch_bytes
        while True:
            await self._work.wait()
            self._work.clear()
            while self._queue and not self.stop_requested.is_set():
                await self._slots.acquire()
                if self.stop_requested.is_set():
                    self._slots.release()
                    break
                now = time.monotonic()
                tokens: list[int] = []
                batch_bytes = 0
                while self._queue and len(tokens) < size and batch_bytes < max_bytes:
                    token = self._queue.popleft()
                    held = self._held[token]
                    if now - held.msg.touched > held.lane.ack_wait:
                        # JetStream has already given it to someone else (or will):
                        # this attempt must not process it.
                        self._release(token)
                        log.warning(
                            "DLQ message expired in the local queue, not processed"
                            if held.lane.lane is Lane.DLQ
                            else "event expired in the local queue, not processed",
                            extra=fields(held.msg),
                        )
                        continue
                    held.dispatched = now
                    batch_bytes += len(held.msg.data)
                    tokens.append(token)
                self._gauges()
                if not tokens:
                    self._slots.release()
                    self._room.set()
                    continue
                task = asyncio.create_task(self._run_batch(tokens))
                self._batches[task] = tokens

    async def _run_batch(self, tokens: list[int]) -> None:
        try:
            deliveries = []
            received_at = datetime.now(UTC).isoformat()
            for t in tokens:
                held = self._held[t]
                msg = held.msg
                meta = Meta(
                    msg.stream,
                    msg.consumer,
                    msg.stream_seq,
                    msg.consumer_seq,
                    msg.msg_id,
                    received_at,
                )
                deliveries.append(
                    Delivery(t, msg.subject, msg.data, msg.num_delivered, held.lane.lane, meta)
                )
                if held.lane.lane is Lane.DLQ:
                    self.metrics.tasks_submitted.labels(held.company).inc()
            self.metrics.workers_active.inc()
            try:
                outcomes = await self.pool.run(deliveries)
            except Exception as exc:
                # Never strand a batch: its messages fail transiently and are retried.
                log.exception("worker pool failed a batch")
                limits = Limits(self.cfg.nats.dlq_subject, self.cfg.nats.dlq_max_payload_bytes)
                outcomes = [internal_failure(d, exc, limits) for d in deliveries]
            finally:
                self.metrics.workers_active.dec()
            self._done.put_nowait((tokens, outcomes))
        finally:
            self._slots.release()
            self._batches.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _heartbeat_loop(self) -> None:
        """Keep JetStream from redelivering what waits or runs longer than half the ack wait."""
        shortest = min(lane.ack_wait for lane in self.lanes)
        while True:
            await asyncio.sleep(min(shortest / 4, 5.0))
            if not self.broker.connected:
                # nats-py would buffer the in-progress acks until it reconnects,
                # so they would not keep anything alive: leave `touched` stale.
                continue
            now = time.monotonic()
            for held in list(self._held.values()):
                if now - held.msg.touched > held.lane.ack_wait / 2:
                    try:
                        await held.msg.in_progress()
                    except Exception as exc:
                        log.warning(
                            "in-progress ack failed", extra={**fields(held.msg), "error": str(exc)}
                        )

    async def _unpark_loop(self) -> None:
        """Retry the writes of held messages once Postgres answers again."""
        while True:
            await asyncio.sleep(1.0)
            if self._parked and await self.store.ping():
                parked, self._parked = self._parked, []
                self._done.put_nowait(([t for t, _ in parked], [o for _, o in parked]))

    # ------------------------------------------------------------- committing

    async def _commit_loop(self) -> None:
        while True:
            item = await self._done.get()
            if item is None:
                return
            group = [item]
            size = len(item[0])
            while size < _COMMIT_GROUP and not self._done.empty():
                nxt = self._done.get_nowait()
                if nxt is None:
                    self._done.put_nowait(None)  # keep the stop marker for the next round
                    break
                group.append(nxt)
                size += len(nxt[0])
            pairs = [(t, o) for tokens, outs in group for t, o in zip(tokens, outs, strict=True)]
            try:
                await self._commit_and_settle(pairs)
            except Exception:
                # A bug must not stop the service nor strand messages: hand
                # whatever is still held back to JetStream.
                log.exception("commit failed unexpectedly; NAKing its messages")
                for token, _ in pairs:
                    await self._nak_quietly(token, self.cfg.nats.dlq_shutdown_nak_delay)
                self._room.set()

    def _decide(
        self, held: Held, ok: bool, kind: FailureKind | None, reason: Reason | None
    ) -> Decision:
        policy = held.lane.policy
        return decide(ok, kind, reason, held.msg.num_delivered, policy, self._rng.random())

    async def _commit_and_settle(self, pairs: Sequence[tuple[int, Outcome]]) -> None:
        """Decide, write what the decisions need in one transaction, then settle.

        A write can fail per item (a row that breaks a constraint, an update
        whose row is missing): that item is decided again with the failure, which
        may lead to a second, exhausted write. At most two rounds.
        """
        verdicts: dict[int, Verdict] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        for token, out in pairs:
            held = self._held[token]
            held.company = out.stored.company_id
            if debug and held.lane.lane is Lane.DLQ:
                # Logged once the worker has read the envelope, so it names the source.
                log.debug(
                    "Processing DLQ message",
                    extra=fields(held.msg, held.company, out.stored.source_subject),
                )
            verdicts[token] = Verdict(out, self._decide(held, out.ok, out.kind, out.reason))
        pending = list(verdicts)
        for _round in range(2):
            writes = {}
            for token in pending:
                w = self.settler.write_for(self._held[token], verdicts[token])
                if w is not None:
                    writes[token] = w
            if not writes:
                break
            pending = []
            try:
                results = await self.store.write(list(writes.values()))
            except StoreUnavailable as exc:
                self._store_failed(exc)
                unavailable = ItemFailed(
                    FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE, f"database unavailable: {exc}"
                )
                for token in writes:
                    self._redecide(token, verdicts[token], unavailable)
                break
            for token, result in zip(writes, results, strict=True):
                v = verdicts[token]
                v.inserted = result.inserted
                if result.failure is not None:
                    self._redecide(token, v, result.failure)
                    pending.append(token)
        publishing = []
        for token, v in verdicts.items():
            if v.decision.action is Action.HOLD:
                # JetStream's last delivery: keep it alive and write it once the
                # store answers again, rather than NAK it into oblivion.
                self._parked.append((token, v.out))
                log.error(
                    "store unavailable on the last delivery, holding the message",
                    extra={**fields(self._held[token].msg), "error": v.db_error},
                )
                continue
            released = self._release(token)
            assert released is not None
            if self.settler.publishes(released, v):
                # Concurrently: a dead-letter publish waits for JetStream's acknowledgement.
                publishing.append(asyncio.ensure_future(self.settler.settle(released, v)))
            else:
                # ACK, NAK and TERM only queue a few bytes on the connection: a
                # task each would cost more than the settle itself.
                await self.settler.settle(released, v)
        await asyncio.gather(*publishing)
        self._room.set()
        self._gauges()

    def _redecide(self, token: int, v: Verdict, failure: ItemFailed) -> None:
        if v.decision.action is Action.EXHAUST and (
            self._held[token].lane.lane is Lane.DLQ or v.stored_directly
        ):
            # The exhausted row itself was not written: keep the message in the stream.
            v.save_failed = True
            failure = ItemFailed(FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE, str(failure))
        elif failure.reason is not Reason.STORE_UNAVAILABLE:
            v.error = str(failure)
        v.reason = failure.reason
        v.decision = self._decide(self._held[token], False, failure.kind, failure.reason)
        v.db_error = str(failure)

    def _store_failed(self, exc: Exception) -> None:
        if self.store_ok:
            log.error("Postgres unavailable, pausing fetch", extra={"error": str(exc)})
        self.store_ok = False

    # ------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop in an order that loses nothing; see the numbered steps."""
        nak_delay = self.cfg.nats.dlq_shutdown_nak_delay
        self.stop_requested.set()
        log.info(
            "shutting down",
            extra={"in_flight": len(self._held), "grace_seconds": self.cfg.nats.shutdown_grace},
        )
        # 1. Stop fetching, so no new message enters (a fetcher may wait for room).
        self._room.set()
        if self._tasks:
            await asyncio.gather(*self._fetchers, return_exceptions=True)
            self._dispatcher.cancel()
        # 2. Hand back what never reached a worker, with a short delay so another
        #    replica (or this one, restarted) takes it up soon.
        while self._queue:
            await self._nak_quietly(self._queue.popleft(), nak_delay)
        # 3. Let batches in the workers finish within the grace period; what
        #    finishes is committed and ACKed by the committer as usual.
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=self.cfg.nats.shutdown_grace)
        # 4. Past the grace period, NAK what is still running; a late result is dropped.
        for task, tokens in list(self._batches.items()):
            task.cancel()
            for token in tokens:
                await self._nak_quietly(token, nak_delay)
        # 5. Drain the committer, so every finished outcome is committed and settled.
        if self._tasks:
            self._done.put_nowait(None)
            await asyncio.gather(self._committer, return_exceptions=True)
            self._heart.cancel()
            self._unpark.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # 6. Anything still held (a commit that failed, a held message) goes back
        #    to the stream.
        for token in list(self._held):
            await self._nak_quietly(token, nak_delay)
        self._gauges()

    async def _nak_quietly(self, token: int, delay: float) -> None:
        held = self._release(token)
        if held is None:
            return
        try:
            await held.msg.nak(delay)
        except Exception as exc:  # JetStream redelivers after the ack wait anyway
            log.warning("NAK at shutdown failed", extra={**fields(held.msg), "error": str(exc)})

    # ------------------------------------------------------------- helpers

    def _release(self, token: int) -> Held | None:
        """Forget a message (settled, handed back, or expired) and its bytes."""
        held = self._held.pop(token, None)
        if held is not None:
            self._held_bytes -= len(held.msg.data)
        return held

    def _gauges(self) -> None:
        self.metrics.queue_length.set(len(self._queue))
        self.metrics.in_flight.set(len(self._held))
