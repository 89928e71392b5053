"""The supervisor's memory is bounded by its byte budget, not by the worker count.

A batch out at a worker costs the supervisor its request frame and then its
reply (rows plus what exhausting would need, several times the input), so
the input bytes out at the workers at once are capped at a quarter of
`nats.maxInFlightBytes` and split between the workers. The supervisor runs
here in-process on real NATS, PostgreSQL and worker processes; the pool's
one-batch exchange is wrapped (and still runs) to see what is out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
import pytest
import uvloop

from dlqproc import app, pool
from dlqproc.broker import Broker
from dlqproc.config import Config
from dlqproc.embedded import NatsServer
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, Outcome
from dlqproc.reprocess import Limits
from dlqproc.settle import LaneRuntime
from dlqproc.store import Store
from dlqproc.supervisor import Supervisor
from support.handlers import TENANT_DDL
from support.inprocess import dlq_only_config
from support.service import envelope

BUDGET = 64 * 1024  # nats.maxInFlightBytes: a quarter of it may be out at the workers
WORKERS = 4
MESSAGES = 60
PAD = 3000  # bytes of filler per message, so the budget holds only a few dozen


@pytest.fixture
def cfg(nats_server: NatsServer, dsn: str) -> Config:
    return dlq_only_config(
        nats_server.url,
        dsn,
        "memory",
        NATS_DLQWORKERS=str(WORKERS),
        NATS_MAXINFLIGHTBYTES=str(BUDGET),
    )


class Watch:
    """Input bytes of the batches out at the workers: now, and the most at once."""

    def __init__(self) -> None:
        self.out = 0
        self.most = 0
        self.together = 0  # the most batches out at once
        self._batches = 0

    def wrap(
        self, run_once: Callable[[Any, Sequence[Delivery]], Awaitable[list[Outcome]]]
    ) -> Callable[[Any, Sequence[Delivery]], Awaitable[list[Outcome]]]:
        async def watched(self_: Any, batch: Sequence[Delivery]) -> list[Outcome]:
            size = sum(len(d.data) for d in batch)
            self.out += size
            self._batches += 1
            self.most = max(self.most, self.out)
            self.together = max(self.together, self._batches)
            try:
                return await run_once(self_, batch)
            finally:
                self.out -= size
                self._batches -= 1

        return watched


async def _settled(broker: Broker, cfg: Config, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while await broker.pending(cfg.nats.dlq_stream, cfg.dlq_durable) != (0, 0):
            await asyncio.sleep(0.1)


def test_input_out_at_the_workers_stays_within_a_quarter_of_the_byte_budget(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = Watch()
    monkeypatch.setattr(pool.WorkerPool, "_run_once", watch.wrap(pool.WorkerPool._run_once))
    sizes: list[int] = []

    async def main() -> None:
        store = Store(cfg.postgres.dsn, 10.0, TENANT_DDL)
        await store.start(migrate=True, timeout=30)
        broker = await Broker.connect(cfg.nats.url, name="test-memory")
        workers = pool.WorkerPool(
            WORKERS, "support.handlers", Limits(cfg.nats.dlq_subject, 1 << 20), 60.0
        )
        try:
            lanes: list[LaneRuntime] = await app.build_lanes(cfg, broker, 10)
            subject = f"{cfg.nats.dlq_subject}.acme"
            for i in range(MESSAGES):
                body = envelope("t.ok", "acme", {"id": str(i), "pad": "x" * PAD})
                sizes.append(len(body))
                await broker.publish(subject, body, {"Nats-Msg-Id": f"m{i}"})
            await workers.start()
            sup = Supervisor(cfg, broker, store, workers, Metrics(), lanes)
            serving = asyncio.create_task(sup.serve())
            try:
                await _settled(broker, cfg, 120)
            finally:
                await sup.shutdown()
                await asyncio.wait_for(serving, 30)
            assert sup.ledger.working == 0  # every batch's bytes were given back
        finally:
            await workers.close()
            await broker.close()
            await store.close()

    uvloop.run(main())
    with psycopg.connect(cfg.postgres.dsn, autocommit=True) as conn:
        [(rows,)] = conn.execute("SELECT count(*) FROM daisi_acme.test_rows").fetchall()
    assert rows == MESSAGES  # every message written, none dropped by the bound
    # A batch may cross its byte limit by its last message only.
    assert watch.most <= BUDGET // 4 + max(sizes), (watch.most, BUDGET // 4)
    # Bounded, not serialised: the workers still had batches of their own at once.
    assert watch.together > 1
