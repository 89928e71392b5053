"""The committer: outcomes in, one transaction, then every message settled.

Finished batches are merged into commit groups. For each message the retry
policy decides; its lane says what the decision needs written; everything is
written in one transaction; a write the store refuses is decided again
(through `policy.after_failed_write`) into a new verdict, which may need a
second, exhausted write. Only then is each message settled by its lane and
reported by its observer. Nothing is ACKed or TERMed before its commit; a
message whose commit failed is NAKed with a delay, so it is processed, stored,
or still in the stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence

import msgspec

from dlqproc.lanes import Held
from dlqproc.ledger import Entry, Ledger
from dlqproc.metrics import Metrics
from dlqproc.model import FailureKind, Ok, Outcome, Reason, failure
from dlqproc.observe import show_gauges
from dlqproc.policy import (
    UNEXPECTED_COMMIT_ERROR,
    Decision,
    Fault,
    after_failed_settle,
    after_failed_write,
    decide,
    unexpected_error_text,
)
from dlqproc.settle import Verdict, fields
from dlqproc.store import Failure, NotWritten, Store, StoreUnavailable, Write

# Operators filter on this logger name (operator guide, section 1.2).
log = logging.getLogger("dlq_worker")

_COMMIT_GROUP = 2048  # messages merged into one transaction at most
_ERROR_CHARS = 2000  # of an error text kept in a readiness problem

Batch = tuple[Sequence[int], Sequence[Outcome]]


class Committer:
    def __init__(
        self,
        store: Store,
        ledger: Ledger[Held],
        metrics: Metrics,
        room: asyncio.Event,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.metrics = metrics
        self.room = room  # set whenever messages were released
        self._rng = rng or random.Random()
        self._done: asyncio.Queue[Batch | None] = asyncio.Queue()
        # PostgreSQL answered the last write (fetching pauses while it does not).
        self.store_ok = True
        # Readiness: the commit failure that keeps repeating, if any.
        self.commit_failures = 0
        self.commit_error = ""

    def submit(self, tokens: Sequence[int], outcomes: Sequence[Outcome]) -> None:
        self._done.put_nowait((tokens, outcomes))

    def finish(self) -> None:
        """Let `run` return once everything submitted so far is committed."""
        self._done.put_nowait(None)

    async def run(self) -> None:
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
                await self.commit(pairs)
            except Exception:
                # A bug, not an outage (the store classifies those): find the
                # messages it belongs to, so their neighbours are not retried
                # with them, over and over.
                log.exception("commit failed unexpectedly; retrying its messages one by one")
                await self._isolate(pairs)
            self.room.set()

    async def _isolate(self, pairs: Sequence[tuple[int, Outcome]]) -> None:
        """Commit and settle each message alone; one that still fails is an item failure.

        Its failure spends its own retry budget (NAK with backoff, exhausted in
        the end), so it can neither loop nor hold its neighbours back.
        """
        for token, out in pairs:
            if token not in self.ledger:
                continue  # settled before the failure
            try:
                await self.commit([(token, out)])
                continue
            except Exception as exc:
                why, text = UNEXPECTED_COMMIT_ERROR, unexpected_error_text(exc)
                failed = failure(out.token, out.stored, why.kind, why.reason, text, out.base)
            try:
                await self.commit([(token, failed)])
            except Exception:
                log.exception("settling a failed message failed; NAKing it")
                if token in self.ledger:
                    held = self.ledger[token]
                    nak = after_failed_settle(held.msg.num_delivered, held.lane.spec.policy)
                    await self.hand_back(token, nak.delay)

    def _decide(self, held: Held, outcome: Ok | Fault) -> Decision:
        policy = held.lane.spec.policy
        return decide(outcome, held.msg.num_delivered, policy, self._rng.random())

    async def commit(self, pairs: Sequence[tuple[int, Outcome]]) -> None:
        """Decide, write what the decisions need in one transaction, then settle."""
        verdicts: dict[int, Verdict] = {}
        for token, out in pairs:
            held = self.ledger[token]
            held.lane.observe.received(held, out)
            verdicts[token] = Verdict.of(out, self._decide(held, out))
        pending = list(verdicts)
        # A write can fail per item (a row that breaks a constraint, an update
        # whose row is missing): that item is decided again with the failure,
        # which may lead to a second, exhausted write. At most two rounds.
        for _round in range(2):
            pending = await self._write(pending, verdicts)
            if not pending:
                break
        await self._settle_all(verdicts)

    async def _write(self, tokens: Sequence[int], verdicts: dict[int, Verdict]) -> list[int]:
        """Write what `tokens` need; update their verdicts; the tokens to write again."""
        writes: dict[int, Write] = {}
        for token in tokens:
            held = self.ledger[token]
            verdicts[token], write = held.lane.write(held, verdicts[token])
            if write is not None:
                writes[token] = write
        if not writes:
            return []
        try:
            results = await self.store.write(list(writes.values()))
        except StoreUnavailable as exc:
            self._commit_failed(str(exc))
            self._store_failed(exc)
            unavailable = Failure(
                FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE, f"database unavailable: {exc}"
            )
            for token in writes:
                verdicts[token] = self._redecide(token, verdicts[token], unavailable)
            return []
        self.commit_failures, self.commit_error = 0, ""
        again = []
        for token, result in zip(writes, results, strict=True):
            if isinstance(result, NotWritten):
                verdicts[token] = self._redecide(token, verdicts[token], result.failure)
                again.append(token)
            else:
                verdicts[token] = msgspec.structs.replace(verdicts[token], inserted=result.inserted)
        return again

    async def _settle_all(self, verdicts: dict[int, Verdict]) -> None:
        publishing = []
        for token, v in verdicts.items():
            entry = self.ledger.release(token)
            assert entry is not None
            if entry.item.lane.publishes(v):
                # Concurrently: a dead-letter publish waits for JetStream's acknowledgement.
                publishing.append(asyncio.ensure_future(self._settle(entry, v)))
            else:
                # ACK, NAK and TERM only queue a few bytes on the connection: a
                # task each would cost more than the settle itself.
                await self._settle(entry, v)
        await asyncio.gather(*publishing)
        self.room.set()
        show_gauges(self.metrics, self.ledger.gauges())

    @staticmethod
    async def _settle(entry: Entry[Held], v: Verdict) -> None:
        lane = entry.item.lane
        lane.observe.settled(await lane.settle(entry.item, v), entry.dispatched)

    def _redecide(self, token: int, v: Verdict, failure: Failure) -> Verdict:
        held = self.ledger[token]
        policy = held.lane.spec.policy
        again = after_failed_write(
            v.decision, failure, held.msg.num_delivered, policy, self._rng.random()
        )
        return v.redecided(again, str(failure))

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

    def store_answered(self) -> None:
        """PostgreSQL answered a probe: the outage, if any, is over."""
        if not self.store_ok:
            log.info("Postgres reachable again, resuming fetch")
            self.store_ok = True

    async def hand_back(self, token: int, delay: float) -> None:
        """NAK a held message and forget it; JetStream redelivers it after `delay`."""
        entry = self.ledger.release(token)
        if entry is None:
            return
        msg = entry.item.msg
        try:
            await msg.nak(delay)
        except Exception as exc:  # JetStream redelivers after the ack wait anyway
            log.warning("NAK at shutdown failed", extra={**fields(msg), "error": str(exc)})
