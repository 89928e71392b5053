"""The replay engine: runs a replay job to its end, resumably, at a rate, through outages.

A job claims its rows in chunks (db.claim), publishes each with a
deterministic Nats-Msg-Id (refusals.msg_id) and waits for JetStream's PubAck,
then settles the acknowledged rows in batches (db.settle). What is committed
is what happened: a row is marked published only after its PubAck, so a
crash can at worst leave rows claimed whose publish may or may not have been
stored. Resuming republishes those with the same Nats-Msg-Id, which JetStream
drops as duplicates while they are within the stream's duplicate window; past
it they are settled `uncertain` and never republished by the job (the
operator replays them by id after checking).

Outages pause rather than fail: a publish that gets no answer is retried (the
same message) until NATS answers, and results PostgreSQL cannot take are held
until it can; claiming waits meanwhile. A stop request (Ctrl-C) lets the
publishes in flight finish, commits them and gives back the claims never
attempted. The engine knows nothing of terminals: it reports through a
callback and its `counts`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec

from dlqproc.broker import Broker, PublishFailed, PublishRejected
from dlqproc.exhausted import refusals
from dlqproc.exhausted.refusals import ReplayRow
from dlqproc.publish import RateLimiter
from dlqproc.store.exhausted_ops import Claimed, DBUnavailable, ExhaustedDB, Job, JobState, Settled

log = logging.getLogger("dlqproc.exhausted")

MAX_CHUNK = 1000
SETTLE_EVERY = 0.2  # seconds between commits of acknowledged rows
SETTLE_BATCH = 1000
# Connections settling batches side by side: a batch's row updates touch a
# dozen indexes each, which one PostgreSQL backend could not keep up with.
SETTLERS = 2
# A claimed row republished on resume must still be inside the duplicate
# window when JetStream sees the second copy: keep this much margin.
WINDOW_MARGIN = 10.0
PAUSE_MIN, PAUSE_MAX = 0.25, 5.0

_T = TypeVar("_T")


class Counts(msgspec.Struct):
    published: int = 0
    duplicates: int = 0  # published, and JetStream had it already (a resumed publish)
    refused: int = 0
    failed: int = 0
    skipped: int = 0
    uncertain: int = 0
    paused: str = ""  # why the job waits, while it does

    @property
    def done(self) -> int:
        return self.published + self.refused + self.failed + self.uncertain


def chunk_for(rate: float | None) -> int:
    """Rows claimed at once: about half a second's worth, so that a job killed
    mid-chunk leaves few claimed rows behind."""
    if rate is None:
        return MAX_CHUNK
    return max(1, min(MAX_CHUNK, int(rate / 2)))


class Engine:
    def __init__(
        self,
        db: ExhaustedDB,
        broker: Broker,
        *,
        dlq_subject: str,
        concurrency: int = 256,
        publish_timeout: float = 5.0,
        on_progress: Callable[[Counts], None] | None = None,
    ) -> None:
        self.db = db
        self.broker = broker
        self.dlq_subject = dlq_subject
        self.concurrency = concurrency
        self.publish_timeout = publish_timeout
        self.on_progress = on_progress
        self.counts = Counts()
        self._pending: list[Settled] = []
        self._bindings: dict[str, tuple[str, float] | None] = {}
        self._stop = asyncio.Event()
        self._flushing = True
        self._publisher = broker.acked_publisher()
        # Settling commits on connections of its own, so that claiming the
        # next chunk never waits behind it.
        self._settle_dbs = [db.sibling() for _ in range(SETTLERS)]

    def stop(self) -> None:
        """Finish the publishes in flight, commit them, give back the rest (Ctrl-C)."""
        self._stop.set()

    # -- pauses

    async def _pause(self, why: str, attempt: int) -> None:
        if not self.counts.paused:
            log.warning("replay paused: %s; retrying until it answers", why)
        self.counts.paused = why
        self._progress()
        await asyncio.sleep(min(PAUSE_MAX, PAUSE_MIN * 2**attempt))

    def _resumed(self) -> None:
        if self.counts.paused:
            log.warning("replay resumed after: %s", self.counts.paused)
            self.counts.paused = ""

    def _progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.counts)

    async def _db(self, what: Callable[[], Awaitable[_T]]) -> _T:
        """Run a db call until PostgreSQL answers; after a stop request, raise instead."""
        attempt = 0
        while True:
            try:
                result = await what()
            except DBUnavailable as exc:
                if self._stop.is_set():
                    raise
                await self._pause(f"PostgreSQL unavailable ({str(exc)[:200]})", attempt)
                attempt += 1
                continue
            self._resumed()
            return result

    async def _wait_for_nats(self) -> None:
        """Publish nothing new while the connection is down (nats-py would buffer it)."""
        attempt = 0
        while not self.broker.connected and not self._stop.is_set():
            await self._pause("NATS unavailable (disconnected)", attempt)
            attempt += 1
        if attempt:
            self._resumed()

    async def _binding(self, subject: str) -> tuple[str, float] | None:
        if subject not in self._bindings:
            attempt = 0
            while True:
                try:
                    self._bindings[subject] = await self.broker.stream_binding(subject)
                    break
                except Exception as exc:
                    if self._stop.is_set():
                        raise
                    await self._pause(f"NATS unavailable ({str(exc)[:200]})", attempt)
                    attempt += 1
            self._resumed()
        return self._bindings[subject]

    # -- the job

    async def run(self, job: Job) -> Job:
        """Run (or resume) `job` until its rows are done or stop() is called."""
        limiter = RateLimiter(job.rate) if job.rate else None
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        settlers = [asyncio.create_task(self._settle_loop(job, db)) for db in self._settle_dbs]
        finished = False
        unattempted: list[int] = []
        try:
            await self._db(lambda: self.db.set_state(job.id, "running"))
            resumed = await self._db(lambda: self.db.claimed(job.id))
            again: list[ReplayRow] = []
            for row, age in resumed:
                target = self._subject(job, row)
                binding = await self._binding(target)
                window = binding[1] if binding else 0.0
                if age < window - WINDOW_MARGIN:
                    again.append(row)
                else:
                    self._settle(
                        Settled(
                            row.id,
                            row.company_id,
                            "uncertain",
                            msg_id=refusals.msg_id(job.id, row.id),
                            detail=f"in flight when the job stopped {age:.0f} s ago, past the"
                            f" stream's {window:.0f} s duplicate window: not republished",
                        )
                    )
            rows: collections.deque[ReplayRow] = collections.deque(again)
            more = True
            taken = job.done + len(again)
            claiming: asyncio.Task[Claimed] | None = None

            def next_claim() -> asyncio.Task[Claimed] | None:
                # The next chunk is claimed while this one is published.
                nonlocal taken
                room = MAX_CHUNK if job.max_rows is None else job.max_rows - taken
                if not more or room <= 0:
                    return None
                chunk = min(chunk_for(job.rate), room)
                taken += chunk  # at most; corrected when the claim returns
                return asyncio.create_task(self._claim(job, chunk), name=f"claim-{chunk}")

            while not self._stop.is_set():
                # A claim takes about as long as publishing a chunk: the next
                # one starts as soon as the previous one has landed.
                if claiming is None and len(rows) <= chunk_for(job.rate):
                    claiming = next_claim()
                if not rows:
                    if claiming is None:
                        finished = True
                        break
                    claimed = await claiming
                    claiming = None
                    job = msgspec.structs.replace(job, cursor=claimed.cursor)
                    self.counts.refused += claimed.refused
                    self.counts.skipped += claimed.skipped
                    taken += claimed.refused + len(claimed.rows) - claimed.asked
                    rows.extend(claimed.rows)
                    more = claimed.more
                    self._progress()
                    continue
                row = rows.popleft()
                pub = await self._prepare(job, row)
                if pub is None:
                    continue
                if not self.broker.connected:
                    await self._wait_for_nats()
                if limiter is not None:
                    await limiter.acquire()
                await slots.acquire()
                if self._stop.is_set():
                    slots.release()
                    rows.appendleft(row)
                    break
                task = asyncio.create_task(self._publish(job, row, pub, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if claiming is not None:
                # Claimed meanwhile: given back with the rest.
                rows.extend((await claiming).rows)
            unattempted = [r.id for r in rows]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            # Never cancelled mid-commit: they end between commits.
            self._flushing = False
            for got in await asyncio.gather(*settlers, return_exceptions=True):
                if isinstance(got, BaseException) and not isinstance(got, DBUnavailable):
                    raise got
        try:
            await self._flush_all(job)
        finally:
            for db in self._settle_dbs:
                await db.close()
        if unattempted:
            await self._db(lambda: self.db.release(job, unattempted))
        state: JobState = "done" if finished else "stopped"
        await self._db(lambda: self.db.set_state(job.id, state))
        final = await self._reload(job)
        self._progress()
        return final

    async def _reload(self, job: Job) -> Job:
        got = await self._db(lambda: self.db.job(job.id))
        assert got is not None
        return got

    async def _claim(self, job: Job, chunk: int) -> Claimed:
        refuse = self._refuse(job)
        return await self._db(lambda: self.db.claim(job, chunk, refuse))

    def _refuse(self, job: Job) -> Callable[[ReplayRow], str | None]:
        return lambda row: refusals.refusal(row, job.include_resolved)

    def _subject(self, job: Job, row: ReplayRow) -> str:
        if job.target == "source":
            return row.source_subject
        return f"{self.dlq_subject}.{row.company_id}"

    async def _prepare(self, job: Job, row: ReplayRow) -> refusals.Publish | None:
        """The message for a claimed row, or None after settling it refused."""
        pub = refusals.build(row, job.id, job.target, self.dlq_subject)
        why = ""
        # Looked up once per subject; no coroutine per row once it is known.
        if pub.subject in self._bindings:
            binding = self._bindings[pub.subject]
        else:
            binding = await self._binding(pub.subject)
        if binding is None:
            why = f"unknown subject: no JetStream stream stores {pub.subject[:200]!r}"
        elif len(pub.body) + 1024 > self.broker.max_payload:
            why = f"body of {len(pub.body)} bytes is over NATS max_payload"
        if not why:
            return pub
        self.counts.refused += 1
        self._settle(Settled(row.id, row.company_id, "refused", detail=why))
        return None

    async def _publish(
        self, job: Job, row: ReplayRow, pub: refusals.Publish, slots: asyncio.Semaphore
    ) -> None:
        attempt = 0
        try:
            while True:
                try:
                    ack = await self._publisher.publish(
                        pub.subject, pub.body, pub.headers, timeout=self.publish_timeout
                    )
                except PublishRejected as exc:
                    self.counts.failed += 1
                    self._settle(Settled(row.id, row.company_id, "failed", detail=str(exc)[:1000]))
                    return
                except PublishFailed as exc:
                    if self._stop.is_set():
                        # Left claimed: the resume republishes it with the same id.
                        return
                    await self._pause(f"NATS unavailable ({str(exc)[:200]})", attempt)
                    attempt += 1
                    continue
                self._resumed()
                self.counts.published += 1
                self.counts.duplicates += ack.duplicate
                self._settle(
                    Settled(
                        row.id,
                        row.company_id,
                        "published",
                        msg_id=pub.headers["Nats-Msg-Id"],
                        stream=ack.stream,
                        stream_seq=ack.seq,
                        duplicate=ack.duplicate,
                        subject=pub.subject,
                    )
                )
                return
        finally:
            slots.release()

    def _settle(self, result: Settled) -> None:
        self._pending.append(result)

    async def _settle_loop(self, job: Job, db: ExhaustedDB) -> None:
        """Commit a batch whenever one is full or SETTLE_EVERY passed, until run() ends."""
        last = time.monotonic()
        while self._flushing:
            if len(self._pending) < SETTLE_BATCH and time.monotonic() - last < SETTLE_EVERY:
                await asyncio.sleep(SETTLE_EVERY / 4)
                continue
            last = time.monotonic()
            if self._pending:
                await self._settle_batch(job, db)
                self._progress()

    async def _settle_batch(self, job: Job, db: ExhaustedDB) -> None:
        """Commit the oldest pending batch on `db`, waiting through outages (a few
        attempts once the job is stopping); a batch not committed goes back."""
        attempt = 0
        batch = self._pending[:SETTLE_BATCH]
        del self._pending[: len(batch)]
        try:
            while True:
                try:
                    await db.settle(job, batch)
                except DBUnavailable as exc:
                    if (self._stop.is_set() or not self._flushing) and attempt >= 3:
                        raise
                    await self._pause(f"PostgreSQL unavailable ({str(exc)[:200]})", attempt)
                    attempt += 1
                    continue
                self._resumed()
                return
        except BaseException:
            self._pending[:0] = batch
            raise

    async def _flush(self, job: Job) -> None:
        """Commit everything pending, on every settling connection at once."""

        async def drain(db: ExhaustedDB) -> None:
            while self._pending:
                await self._settle_batch(job, db)

        failed = [
            r
            for r in await asyncio.gather(
                *(drain(db) for db in self._settle_dbs), return_exceptions=True
            )
            if isinstance(r, BaseException)
        ]
        if failed:
            raise failed[0]

    async def _flush_all(self, job: Job) -> None:
        try:
            await self._flush(job)
        except DBUnavailable:
            log.error(
                "replay stopped with %d acknowledged rows not recorded (PostgreSQL unavailable);"
                " `--resume %d` within the duplicate window records them without a second copy",
                len(self._pending),
                job.id,
            )
            raise
