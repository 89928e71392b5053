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

from dlqproc.broker import Broker, Inbound
from dlqproc.config import Config
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, FailureKind, Outcome, Reason
from dlqproc.policy import Action, Decision, RetryPolicy, decide
from dlqproc.pool import WorkerPool
from dlqproc.store import ExhaustedRow, ItemFailed, Store, StoreUnavailable, Write

# Operators filter on this logger name (operator guide, section 1.2).
log = logging.getLogger("dlq_worker")

_COMMIT_GROUP = 2048  # messages merged into one transaction at most


def retry_policy(cfg: Config) -> RetryPolicy:
    return RetryPolicy(
        base_delay=cfg.nats.dlq_base_delay_minutes * 60,
        max_delay=cfg.nats.dlq_max_delay_minutes * 60,
        jitter=cfg.nats.dlq_jitter,
        max_retries=cfg.nats.dlq_max_retries,
    )


class _Held:
    """A message from fetch until it is settled."""

    __slots__ = ("company", "dispatched", "msg")

    def __init__(self, msg: Inbound, company: str) -> None:
        self.msg = msg
        self.company = company  # metrics label until the envelope is read
        self.dispatched = 0.0


class _Verdict:
    """What will happen to one message, revised when its write fails."""

    __slots__ = ("db_error", "decision", "error", "inserted", "out", "reason", "save_failed")

    def __init__(self, out: Outcome, decision: Decision, error: str, reason: Reason | None):
        self.out = out
        self.decision = decision
        self.error = error  # the processing error, stored as last_error
        self.reason = reason
        self.db_error = ""  # why the write failed, when it did
        self.save_failed = False  # the exhausted row could not be written
        self.inserted = False  # an exhausted row was inserted by this attempt


class Supervisor:
    def __init__(
        self, cfg: Config, broker: Broker, store: Store, pool: WorkerPool, metrics: Metrics
    ) -> None:
        self.cfg = cfg
        self.broker = broker
        self.store = store
        self.pool = pool
        self.metrics = metrics
        self.policy = retry_policy(cfg)
        self.stop_requested = asyncio.Event()
        self.store_ok = True
        self._held: dict[int, _Held] = {}
        self._queue: collections.deque[int] = collections.deque()
        self._tokens = itertools.count(1)
        self._work = asyncio.Event()  # the queue gained messages
        self._room = asyncio.Event()  # held messages were settled
        self._slots = asyncio.Semaphore(cfg.nats.dlq_workers)
        self._batches: dict[asyncio.Task[None], list[int]] = {}
        self._done: asyncio.Queue[tuple[list[int], list[Outcome]] | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random()

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
        self._fetcher = asyncio.create_task(self._fetch_loop(), name="fetch")
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatch")
        self._committer = asyncio.create_task(self._commit_loop(), name="commit")
        self._heart = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
        self._tasks = [self._fetcher, self._dispatcher, self._committer, self._heart]
        assert self.pool.failed is not None
        stop = asyncio.create_task(self.stop_requested.wait())
        watched: list[asyncio.Future[object]] = [stop, self.pool.failed, *self._tasks]  # type: ignore[list-item]
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        for task in self._tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _fetch_loop(self) -> None:
        n = self.cfg.nats
        failures = 0
        while not self.stop_requested.is_set():
            if not self.store_ok:
                await self._wait_for_store()
                continue
            free = n.dlq_max_in_flight - len(self._held)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            self.metrics.fetch_requests.inc()
            try:
                msgs = await self.broker.fetch(min(free, n.dlq_fetch_batch), timeout=1.0)
            except Exception as exc:
                self.metrics.fetch_errors.inc()
                failures += 1
                log.warning("DLQ fetch failed", extra={"error": str(exc), "failures": failures})
                await self._pause(min(0.1 * 2**failures, 5.0))
                continue
            failures = 0
            for msg in msgs:
                token = next(self._tokens)
                company = msg.subject.rpartition(".")[2] if msg.subject else ""
                self._held[token] = _Held(msg, company)
                self._queue.append(token)
            if msgs:
                self._gauges()
                self._work.set()

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
        ack_wait = self.cfg.nats.dlq_ack_wait
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
                while self._queue and len(tokens) < size:
                    token = self._queue.popleft()
                    held = self._held[token]
                    if now - held.msg.touched > ack_wait:
                        # JetStream has already given it to someone else (or will):
                        # this attempt must not process it.
                        del self._held[token]
                        log.warning(
                            "DLQ message expired in the local queue, not processed",
                            extra=self._fields(held.msg),
                        )
                        continue
                    held.dispatched = now
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
            for t in tokens:
                msg = self._held[t].msg
                deliveries.append(Delivery(t, msg.subject, msg.data, msg.num_delivered))
                self.metrics.tasks_submitted.labels(self._held[t].company).inc()
            self.metrics.workers_active.inc()
            try:
                outcomes = await self.pool.run(deliveries)
            finally:
                self.metrics.workers_active.dec()
            self._done.put_nowait((tokens, outcomes))
        finally:
            self._slots.release()
            self._batches.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _heartbeat_loop(self) -> None:
        """Keep JetStream from redelivering what waits or runs longer than half the ack wait."""
        half = self.cfg.nats.dlq_ack_wait / 2
        while True:
            await asyncio.sleep(min(half / 2, 5.0))
            if not self.broker.connected:
                # nats-py would buffer the in-progress acks until it reconnects,
                # so they would not keep anything alive: leave `touched` stale.
                continue
            now = time.monotonic()
            for held in list(self._held.values()):
                if now - held.msg.touched > half:
                    try:
                        await held.msg.in_progress()
                    except Exception as exc:
                        log.warning(
                            "in-progress ack failed",
                            extra={**self._fields(held.msg), "error": str(exc)},
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
            await self._commit_and_settle(pairs)

    def _decide(
        self, held: _Held, ok: bool, kind: FailureKind | None, reason: Reason | None
    ) -> Decision:
        return decide(ok, kind, reason, held.msg.num_delivered, self.policy, self._rng.random())

    def _write_for(self, held: _Held, out: Outcome, decision: Decision, error: str) -> Write | None:
        if decision.action is Action.ACK:
            return Write(tenant=out.stored.company_id, rows=out.rows) if out.rows else None
        if decision.action is Action.EXHAUST:
            msg, stored = held.msg, out.stored
            reason = decision.reason.value if decision.reason else "unknown"
            return Write(
                exhausted=ExhaustedRow(
                    company_id=stored.company_id,
                    source_subject=stored.source_subject,
                    last_error=error,
                    retry_count=msg.num_delivered,
                    reason=reason,
                    event_timestamp=stored.event_timestamp,
                    envelope_json=stored.envelope_json,
                    original_json=stored.original_json,
                    raw=msg.data,
                    dlq_stream=msg.stream,
                    dlq_sequence=msg.stream_seq,
                    dlq_subject=msg.subject,
                )
            )
        return None

    async def _commit_and_settle(self, pairs: Sequence[tuple[int, Outcome]]) -> None:
        """Decide, write what the decisions need in one transaction, then settle.

        A write can fail per item (a row that breaks a constraint, an update
        whose row is missing): that item is decided again with the failure, which
        may lead to a second, exhausted write. At most two rounds.
        """
        verdicts: dict[int, _Verdict] = {}
        debug = log.isEnabledFor(logging.DEBUG)
        for token, out in pairs:
            held = self._held[token]
            held.company = out.stored.company_id
            if debug:
                # Logged once the worker has read the envelope, so it names the source.
                log.debug(
                    "Processing DLQ message",
                    extra=self._fields(held.msg, held.company, out.stored.source_subject),
                )
            verdicts[token] = _Verdict(
                out, self._decide(held, out.ok, out.kind, out.reason), out.error, out.reason
            )
        pending = list(verdicts)
        for _round in range(2):
            writes = {}
            for token in pending:
                v = verdicts[token]
                w = self._write_for(self._held[token], v.out, v.decision, v.error)
                if w is not None:
                    writes[token] = w
            if not writes:
                break
            pending = []
            try:
                results = await self.store.write(list(writes.values()))
            except StoreUnavailable as exc:
                self._store_failed(exc)
                for token in writes:
                    self._redecide(
                        token,
                        verdicts[token],
                        ItemFailed(
                            FailureKind.TRANSIENT, Reason.DATABASE, f"database unavailable: {exc}"
                        ),
                    )
                break
            for token, result in zip(writes, results, strict=True):
                v = verdicts[token]
                v.inserted = result.inserted
                if result.failure is not None:
                    self._redecide(token, v, result.failure)
                    pending.append(token)
        for token, v in verdicts.items():
            await self._settle(token, v)
        self._gauges()

    def _redecide(self, token: int, v: _Verdict, failure: ItemFailed) -> None:
        if v.decision.action is Action.EXHAUST:
            # The exhausted row itself was not written: keep the message in the stream.
            v.save_failed = True
            failure = ItemFailed(FailureKind.TRANSIENT, Reason.DATABASE, str(failure))
        elif failure.reason is not Reason.DATABASE:
            v.error = str(failure)
        v.reason = failure.reason
        v.decision = self._decide(self._held[token], False, failure.kind, failure.reason)
        v.db_error = str(failure)

    def _store_failed(self, exc: Exception) -> None:
        if self.store_ok:
            log.error("Postgres unavailable, pausing fetch", extra={"error": str(exc)})
        self.store_ok = False

    async def _settle(self, token: int, v: _Verdict) -> None:
        held = self._held.pop(token)
        self._room.set()
        msg, company, m = held.msg, held.company, self.metrics
        fields = self._fields(msg, company, v.out.stored.source_subject)
        reason = v.reason.value if v.reason else ""
        try:
            if v.decision.action is Action.ACK:
                await msg.ack()
                m.acks_success.labels(company).inc()
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("Successfully processed event from DLQ", extra=fields)
            elif v.decision.action is Action.NAK:
                if v.save_failed:
                    log.error(
                        "Failed to save exhausted event...", extra={**fields, "error": v.db_error}
                    )
                else:
                    log.warning(
                        "Failed to process event from DLQ",
                        extra={**fields, "error": v.db_error or v.error, "reason": reason},
                    )
                log.info(
                    "Retrying DLQ message with backoff",
                    extra={**fields, "delay_seconds": round(v.decision.delay, 3)},
                )
                await msg.nak(v.decision.delay)
                m.task_retries.labels(company).inc()
            else:
                log.warning(
                    "Max retries exceeded, attempting to persist to exhausted store",
                    extra={
                        **fields,
                        "error": v.error,
                        "reason": reason,
                        "exhausted_reason": v.decision.reason.value if v.decision.reason else "",
                    },
                )
                await msg.term()
                m.acks_failure.labels(company).inc()
                if v.inserted:
                    m.tasks_dropped.labels(company).inc()
        except Exception as exc:
            m.acks_failure.labels(company).inc()
            log.error(
                "settling DLQ message failed; JetStream will redeliver it",
                extra={**fields, "action": v.decision.action.value, "error": str(exc)},
            )
        if held.dispatched:
            m.processing_duration.labels(company).observe(time.monotonic() - held.dispatched)

    # ------------------------------------------------------------- shutdown

    async def shutdown(self) -> None:
        """Stop in an order that loses nothing; see the numbered steps."""
        nak_delay = self.cfg.nats.dlq_shutdown_nak_delay
        self.stop_requested.set()
        log.info(
            "shutting down",
            extra={"in_flight": len(self._held), "grace_seconds": self.cfg.nats.shutdown_grace},
        )
        # 1. Stop fetching, so no new message enters.
        if self._tasks:
            await asyncio.gather(self._fetcher, return_exceptions=True)
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
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # 6. Anything still held (a commit that failed mid-way) goes back to the stream.
        for token in list(self._held):
            await self._nak_quietly(token, nak_delay)
        self._gauges()

    async def _nak_quietly(self, token: int, delay: float) -> None:
        held = self._held.pop(token, None)
        if held is None:
            return
        try:
            await held.msg.nak(delay)
        except Exception as exc:  # JetStream redelivers after the ack wait anyway
            log.warning(
                "NAK at shutdown failed", extra={**self._fields(held.msg), "error": str(exc)}
            )

    # ------------------------------------------------------------- helpers

    def _gauges(self) -> None:
        self.metrics.queue_length.set(len(self._queue))
        self.metrics.in_flight.set(len(self._held))

    @staticmethod
    def _fields(msg: Inbound, company: str = "", source_subject: str = "") -> dict[str, object]:
        return {
            "source_subject": source_subject,
            "dlq_subject": msg.subject,
            "stream_seq": msg.stream_seq,
            "consumer_seq": msg.consumer_seq,
            "num_delivered": msg.num_delivered,
            "company_id": company or msg.subject.rpartition(".")[2],
        }
