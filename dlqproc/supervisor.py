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

import msgspec

from dlqproc.broker import Broker, Inbound
from dlqproc.config import Config, MainConsumerConfig
from dlqproc.envelope import tenant_or_invalid
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, FailureKind, Lane, Meta, Outcome, Reason
from dlqproc.policy import Action, Budget, Decision, RetryPolicy, backoff, decide, plan_fetch
from dlqproc.pool import Pool
from dlqproc.reprocess import Limits, bare_stored
from dlqproc.settle import Held, LaneRuntime, Settler, Verdict, fields
from dlqproc.store import ItemFailed, Store, StoreUnavailable

# Operators filter on this logger name (operator guide, section 1.2).
log = logging.getLogger("dlq_worker")

_COMMIT_GROUP = 2048  # messages merged into one transaction at most
_ERROR_CHARS = 2000  # of an error text kept in a log line or a readiness problem
# Seconds a pull request waits for messages: short, so one sent to a JetStream
# leader that died is given up soon, and so an idle replica's request does not
# sit on the server taking messages it could not work on sooner than another.
_LONG_POLL = 0.5


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
        jitter=cfg.nats.retry_jitter,
        max_retries=cfg.nats.dlq_max_retries,
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
        self._held: dict[int, Held] = {}  # every message from fetch to settle
        self._held_bytes = 0
        self._budget = Budget(cfg.nats.max_in_flight, cfg.nats.max_in_flight_bytes)
        # Lanes whose next message did not fit the room they asked for.
        self._oversized: set[Lane] = set()
        # Readiness: when each lane's fetch last returned, and the commit
        # failure that keeps repeating, if any.
        now = time.monotonic()
        self.last_fetch: dict[str, float] = {lane.lane.value: now for lane in lanes}
        self.commit_failures = 0
        self.commit_error = ""
        # Lanes whose last fetch failed (since last_fetch), and their restores.
        self.fetch_failing: set[str] = set()
        self._restoring: dict[Lane, asyncio.Task[None]] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._tokens = itertools.count(1)
        self._work = asyncio.Event()  # the queue gained messages
        self._room = asyncio.Event()  # held messages were settled
        self._slots = asyncio.Semaphore(max(1, cfg.nats.dlq_workers))
        self._batches: dict[asyncio.Task[None], list[int]] = {}
        self._done: asyncio.Queue[tuple[list[int], list[Outcome]] | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
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
        self._tasks = [
            *self._fetchers,
            self._dispatcher,
            self._committer,
            self._heart,
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
        dlq = lane.lane is Lane.DLQ
        failures = 0
        while not self.stop_requested.is_set():
            if not self.store_ok:
                await self._wait_for_store()
                continue
            plan = plan_fetch(
                self._budget,
                len(self._held),
                self._held_bytes,
                lane.fetch_batch,
                oversized=lane.lane in self._oversized,
                lane_waiting=bool(self._oversized - {lane.lane}),
            )
            if plan.batch == 0:
                self._room.clear()
                await self._room.wait()
                continue
            if dlq:
                self.metrics.fetch_requests.inc()
            try:
                msgs = await lane.puller.fetch(
                    plan.batch, timeout=_LONG_POLL, max_bytes=plan.max_bytes
                )
            except Exception as exc:
                if dlq:
                    self.metrics.fetch_errors.inc()
                failures += 1
                log.warning(
                    "fetch failed",
                    extra={"lane": lane.lane.value, "error": str(exc), "failures": failures},
                )
                self.fetch_failing.add(lane.lane.value)
                if failures == 3 or failures % 10 == 0:
                    # In the background: its API calls must not hold up the
                    # fetch that succeeds as soon as NATS has a new leader.
                    self._restore_in_background(lane)
                # From 50 ms up to 1 s: a failover is over within a second of the election.
                await self._pause(min(0.05 * 2 ** min(failures - 1, 5), 1.0))
                continue
            failures = 0
            self.fetch_failing.discard(lane.lane.value)
            self.last_fetch[lane.lane.value] = time.monotonic()
            if lane.puller.size_limited and not msgs:
                if lane.lane not in self._oversized:
                    log.info(
                        "next message exceeds the in-flight byte room; fetching it alone",
                        extra={"lane": lane.lane.value, "room": plan.max_bytes},
                    )
                self._oversized.add(lane.lane)
                continue
            if lane.lane in self._oversized:
                self._oversized.discard(lane.lane)
                self._room.set()  # other lanes held back for this one
            self._admit(lane, msgs)

    def _admit(self, lane: LaneRuntime, msgs: Sequence[Inbound]) -> None:
        for msg in msgs:
            token = next(self._tokens)
            self._held_bytes += len(msg.data)
            event_type, _, tenant = msg.subject.rpartition(".")
            # Label values come from untrusted subjects: bound their cardinality.
            company = tenant_or_invalid(tenant)
            self._held[token] = Held(msg, lane, company, event_type)
            self._queue.append(token)
            if lane.lane is not Lane.DLQ:
                self.metrics.events_received.labels(event_type, company, lane.lane.value).inc()
        if msgs:
            self._gauges()
            self._work.set()

    def _restore_in_background(self, lane: LaneRuntime) -> None:
        """Start a topology restore for the lane unless one is still running."""
        running = self._restoring.get(lane.lane)
        if running is None or running.done():
            self._restoring[lane.lane] = asyncio.create_task(
                self._restore_topology(lane), name=f"restore-{lane.lane.value}"
            )

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
        # Every lane waits here; the first to see PostgreSQL answer ends the
        # outage for all of them, and only it logs: one line per outage.
        while not self.stop_requested.is_set() and not self.store_ok:
            if await self.store.ping():
                if not self.store_ok:
                    log.info("Postgres reachable again, resuming fetch")
                    self.store_ok = True
                return
            await self._pause(1.0)

    async def _dispatch_loop(self) -> None:
        size = self.cfg.nats.worker_batch
        max_bytes = self.cfg.nats.worker_batch_bytes
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
                limits = Limits(
                    self.cfg.nats.dlq_subject,
                    self.cfg.nats.max_payload_bytes,
                    timestamp_horizon=self.cfg.handlers.timestamp_horizon,
                )
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
                # A bug, not an outage (the store classifies those): find the
                # messages it belongs to, so their neighbours are not retried
                # with them, over and over.
                log.exception("commit failed unexpectedly; retrying its messages one by one")
                await self._isolate(pairs)
            self._room.set()

    async def _isolate(self, pairs: Sequence[tuple[int, Outcome]]) -> None:
        """Commit and settle each message alone; one that still fails is an item failure.

        Its failure spends its own retry budget (NAK with backoff, exhausted in
        the end), so it can neither loop nor hold its neighbours back.
        """
        for token, out in pairs:
            if token not in self._held:
                continue  # settled before the failure
            try:
                await self._commit_and_settle([(token, out)])
                continue
            except Exception as exc:
                failed = msgspec.structs.replace(
                    out,
                    ok=False,
                    rows=(),
                    kind=FailureKind.TRANSIENT,
                    reason=Reason.HANDLER_ERROR,
                    error=f"internal error: {type(exc).__name__}: {exc}"[:_ERROR_CHARS],
                )
            try:
                await self._commit_and_settle([(token, failed)])
            except Exception:
                # The fallback that cannot fail: back to JetStream, which counts
                # the delivery.
                log.exception("settling a failed message failed; NAKing it")
                held = self._held.get(token)
                if held is not None:
                    delay = backoff(held.msg.num_delivered, held.lane.policy, 0.0)
                    await self._nak_quietly(token, delay)

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
                self._commit_failed(str(exc))
                self._store_failed(exc)
                unavailable = ItemFailed(
                    FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE, f"database unavailable: {exc}"
                )
                for token in writes:
                    self._redecide(token, verdicts[token], unavailable)
                break
            self.commit_failures, self.commit_error = 0, ""
            for token, result in zip(writes, results, strict=True):
                v = verdicts[token]
                v.inserted = result.inserted
                if result.failure is not None:
                    self._redecide(token, v, result.failure)
                    pending.append(token)
        publishing = []
        for token, v in verdicts.items():
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

    def _commit_failed(self, error: str) -> None:
        """Count a failure that repeats word for word: /ready reports it."""
        error = error[:_ERROR_CHARS]
        if error == self.commit_error:
            self.commit_failures += 1
        else:
            self.commit_failures, self.commit_error = 1, error

    def _store_failed(self, exc: Exception) -> None:
        if self.store_ok:
            log.error("Postgres unavailable, pausing fetch", extra={"error": str(exc)})
        self.store_ok = False

    # ------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop in an order that loses nothing; see the numbered steps."""
        nak_delay = self.cfg.nats.shutdown_nak_delay
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
        for restoring in self._restoring.values():
            restoring.cancel()
        # Delivered to a puller but never fetched: back to JetStream like the queue.
        for lane in self.lanes:
            self._admit(lane, lane.puller.drain())
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
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # 6. Anything still held (a commit that failed) goes back to the stream.
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
