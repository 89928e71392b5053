"""The committer against real NATS and PostgreSQL: a commit group that fails unexpectedly.

A failure the store classifies (an outage, a refused row) never reaches the
committer as an exception; anything else is a bug somewhere in the flow. The
committer then retries the group's messages one by one, so the bug costs only
the message it belongs to. The bug is injected into the DLQ lane's observer
(the one part of a commit that is neither store nor JetStream): it raises on
the successful outcome of one chosen message, as a bug tied to its data would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import uvloop

from dlqproc import app, lanes
from dlqproc.broker import Broker, Inbound
from dlqproc.committer import Committer
from dlqproc.config import Config
from dlqproc.embedded import NatsServer
from dlqproc.handlers import load as load_handlers
from dlqproc.lanes import FlowLane, Held
from dlqproc.ledger import Ledger
from dlqproc.metrics import Metrics
from dlqproc.model import Ok, Outcome
from dlqproc.policy import Budget
from dlqproc.reprocess import Limits, handle
from dlqproc.settle import Did, Settled
from dlqproc.store import Store
from support.handlers import TENANT_DDL
from support.inprocess import dlq_only_config
from support.service import envelope

IDS = ["a", "b", "bad", "c", "d"]


class BuggyObserver:
    """The lane's own observer with a bug that raises for one message (by its sequence).

    where="success": observing its successful outcome raises (before the write);
    "any": observing any outcome of it raises, its failure's too;
    "ack": reporting its ACK raises (after the commit, while the group settles).
    """

    def __init__(self, inner: Any, bad: int, where: str) -> None:
        self.inner, self.bad, self.where = inner, bad, where
        self.raised = 0

    def received(self, held: Held, out: Outcome) -> None:
        if held.msg.stream_seq == self.bad and (
            self.where == "any" or (self.where == "success" and isinstance(out, Ok))
        ):
            self.raised += 1
            raise ValueError("observer bug")
        self.inner.received(held, out)

    def settled(self, s: Settled, dispatched: float) -> None:
        if s.held.msg.stream_seq == self.bad and self.where == "ack" and s.did is Did.ACKED:
            self.raised += 1
            raise ValueError("observer bug")
        self.inner.settled(s, dispatched)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Rig:
    """A DLQ lane, its ledger and a committer, fed by hand as the supervisor would."""

    def __init__(self, cfg: Config, broker: Broker, store: Store, lane: FlowLane) -> None:
        self.cfg, self.broker, self.store, self.lane = cfg, broker, store, lane
        self.metrics = lane.observe.metrics
        self.ledger: Ledger[Held] = Ledger(Budget(100, 1 << 20))
        self.room = asyncio.Event()
        self.committer = Committer(store, self.ledger, self.metrics, self.room, random.Random(1))
        self.registry = load_handlers("support.handlers")
        self.limits = Limits(cfg.nats.dlq_subject, cfg.nats.max_payload_bytes)

    async def publish(self, ids: list[str]) -> dict[str, int]:
        """One t.ok envelope per id; their stream sequences."""
        subject = f"{self.cfg.nats.dlq_subject}.acme"
        seqs = {}
        for i in ids:
            body = envelope("t.ok", "acme", {"id": i})
            seqs[i] = await self.broker.publish(subject, body, {"Nats-Msg-Id": i})
        return seqs

    def break_observer(self, bad: int, where: str) -> BuggyObserver:
        buggy = BuggyObserver(self.lane.observe, bad, where)
        self.lane.observe = buggy  # type: ignore[assignment]
        return buggy

    async def fetch(self, n: int, timeout: float = 10.0) -> list[Inbound]:
        got: list[Inbound] = []
        async with asyncio.timeout(timeout):
            while len(got) < n:
                got += await self.lane.spec.puller.fetch(n - len(got), timeout=1.0)
        return got

    async def commit_as_one_group(self, msgs: list[Inbound]) -> None:
        """Hand every message's outcome to the committer in one batch, and wait for it."""
        tokens, outcomes = [], []
        now = datetime.now(UTC).isoformat()
        for msg in msgs:
            held = self.lane.hold(msg)
            token = self.ledger.admit(held, len(msg.data))
            tokens.append(token)
            outcomes.append(
                handle(self.lane.delivery(token, held, now), self.registry, self.limits)
            )
        self.committer.submit(tokens, outcomes)
        self.committer.finish()
        await asyncio.wait_for(self.committer.run(), 30)
        assert len(self.ledger) == 0  # every message settled, none left held


@pytest.fixture
def cfg(nats_server: NatsServer, dsn: str) -> Config:
    return dlq_only_config(
        nats_server.url,
        dsn,
        "committer",
        NATS_DLQMAXRETRIES="2",
        NATS_DLQBASEDELAYMINUTES="0.002",  # 0.12 s
        NATS_DLQJITTER="0",
    )


@contextlib.asynccontextmanager
async def _rig(cfg: Config) -> AsyncIterator[Rig]:
    store = Store(cfg.postgres.dsn, 10.0, TENANT_DDL)
    await store.start(migrate=True, timeout=10)
    broker = await Broker.connect(cfg.nats.url, name="test-committer")
    try:
        [spec] = await app.build_lanes(cfg, broker, 10)
        yield Rig(cfg, broker, store, lanes.build(spec, broker, Metrics(), cfg.nats.dlq_subject))
    finally:
        await broker.close()
        await store.close()


def _query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql).fetchall()


def _sample(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels).value)


def test_an_unexpected_commit_failure_costs_only_its_message(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with _rig(cfg) as rig:
            seqs = await rig.publish(IDS)
            buggy = rig.break_observer(seqs["bad"], "success")

            # First delivery, one commit group of five: it fails as a whole.
            first = await rig.fetch(len(IDS))
            assert [m.num_delivered for m in first] == [1] * len(IDS)
            await rig.commit_as_one_group(first)
            # The group once, then `bad` alone: twice; its failure outcome is observed.
            assert buggy.raised == 2
            rows = _query(cfg.postgres.dsn, "SELECT id, attempt FROM daisi_acme.test_rows")
            assert dict(rows) == {i: 1 for i in IDS if i != "bad"}
            # Its neighbours were ACKed one by one; `bad` was NAKed with a delay
            # (its first attempt of two), not left to the ack wait.
            assert _sample(rig.metrics.acks_success, "acme") == len(IDS) - 1
            assert _sample(rig.metrics.task_retries, "acme") == 1
            assert _query(cfg.postgres.dsn, "SELECT * FROM exhausted_events") == []

            # Only `bad` comes back, as its second delivery: the last of its budget.
            [again] = await rig.fetch(1)
            assert (again.stream_seq, again.num_delivered) == (seqs["bad"], 2)
            await rig.commit_as_one_group([again])
            assert buggy.raised == 4
            [row] = _query(
                cfg.postgres.dsn,
                "SELECT dlq_sequence, reason, retry_count, last_error FROM exhausted_events",
            )
            assert row[:3] == (seqs["bad"], "retries_exhausted", 2), row
            assert "internal error: ValueError: observer bug" in row[3], row
            assert _sample(rig.metrics.tasks_dropped, "acme") == 1
            # Nothing else is delivered: every message is settled in JetStream too.
            assert await rig.lane.spec.puller.fetch(1, timeout=1.0) == []
            pending, ack_pending = await rig.broker.pending(cfg.nats.dlq_stream, cfg.dlq_durable)
            assert (pending, ack_pending) == (0, 0)

    uvloop.run(main())
    unexpected = [
        r for r in caplog.records if r.getMessage().startswith("commit failed unexpectedly")
    ]
    assert len(unexpected) == 2  # each group that held `bad`, never one per neighbour


def test_a_bug_after_the_commit_retries_only_the_messages_not_yet_settled(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with _rig(cfg) as rig:
            seqs = await rig.publish(IDS)
            buggy = rig.break_observer(seqs["bad"], "ack")
            await rig.commit_as_one_group(await rig.fetch(len(IDS)))
            assert buggy.raised == 1
            # The group committed; a, b and bad were settled before the bug,
            # c and d after it, alone: each ACKed once, none written twice.
            rows = _query(cfg.postgres.dsn, "SELECT id, attempt FROM daisi_acme.test_rows")
            assert dict(rows) == {i: 1 for i in IDS}
            assert _sample(rig.metrics.acks_success, "acme") == len(IDS) - 1  # bad's raised
            assert _sample(rig.metrics.task_retries, "acme") == 0
            assert await rig.lane.spec.puller.fetch(1, timeout=1.0) == []
            assert await rig.broker.pending(cfg.nats.dlq_stream, cfg.dlq_durable) == (0, 0)

    uvloop.run(main())
    assert [r for r in caplog.records if r.getMessage().startswith("commit failed unexpectedly")]


def test_a_message_whose_failure_cannot_be_committed_either_is_naked(
    cfg: Config, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with _rig(cfg) as rig:
            seqs = await rig.publish(IDS)
            buggy = rig.break_observer(seqs["bad"], "any")
            await rig.commit_as_one_group(await rig.fetch(len(IDS)))
            # The group, bad alone, and bad's failure: three times.
            assert buggy.raised == 3
            rows = _query(cfg.postgres.dsn, "SELECT id, attempt FROM daisi_acme.test_rows")
            assert dict(rows) == {i: 1 for i in IDS if i != "bad"}
            assert _query(cfg.postgres.dsn, "SELECT * FROM exhausted_events") == []
            # Handed back to JetStream with a delay, which counts the delivery.
            [again] = await rig.fetch(1)
            assert (again.stream_seq, again.num_delivered) == (seqs["bad"], 2)

    uvloop.run(main())
    assert [
        r for r in caplog.records if r.getMessage() == "settling a failed message failed; NAKing it"
    ]
