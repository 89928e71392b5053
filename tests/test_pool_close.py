"""Stopping the worker pool: the event loop keeps running, and every worker is reaped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from dlqproc.model import Delivery, Lane, Reason
from dlqproc.pool import WorkerPool
from dlqproc.reprocess import Limits
from support.barrier import Barrier

LIMITS = Limits("v1.dlq", 8 << 20)
BUSY = Delivery(
    1,
    "v1.dlq.acme",
    json.dumps(
        {"source_subject": "t.barrier.acme", "company": "acme", "original_payload": {"id": "b"}}
    ).encode(),
    1,
    Lane.DLQ,
)


@pytest.fixture
def barrier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Barrier:
    """Workers spawned from here on run t.barrier against this folder."""
    b = Barrier(tmp_path / "barrier")
    monkeypatch.setenv("TEST_BARRIER_DIR", str(b.folder))
    return b


def reaped(pid: int) -> bool:
    """Gone from the process table: exited and waited for (a zombie is not reaped)."""
    return not Path(f"/proc/{pid}").exists()


async def wait_for(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_closing_waits_for_a_busy_worker_without_blocking_the_loop(barrier: Barrier) -> None:
    async def main() -> None:
        pool = WorkerPool(2, "support.handlers", LIMITS, 3600.0)
        await pool.start()
        pids = pool.pids()
        running = asyncio.create_task(pool.run([BUSY]))
        # One worker is in its handler (never released): it will not see the socket close.
        await wait_for(lambda: barrier.started() == {"b"})
        closing = asyncio.create_task(pool.close(timeout=3600.0))
        # A close that joined the process on the loop would have held it until
        # the worker exited: this coroutine could not even run before then.
        for _ in range(5):
            await asyncio.sleep(0.05)
            assert not closing.done()
        # The idle worker left on its own and is reaped already.
        await wait_for(lambda: sum(reaped(p) for p in pids) == 1)
        for pid in pids:
            if not reaped(pid):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(closing, 30)
        assert all(reaped(p) for p in pids)
        [outcome] = await asyncio.wait_for(running, 30)
        assert outcome.reason is Reason.WORKER_CRASHED

    uvloop.run(main())


def test_closing_kills_a_worker_that_outlives_its_timeout_and_reaps_all(
    barrier: Barrier,
) -> None:
    async def main() -> None:
        pool = WorkerPool(2, "support.handlers", LIMITS, 3600.0)
        await pool.start()
        pids = pool.pids()
        running = asyncio.create_task(pool.run([BUSY]))
        await wait_for(lambda: barrier.started() == {"b"})
        await asyncio.wait_for(pool.close(timeout=0.5), 30)
        assert all(reaped(p) for p in pids)
        assert pool.pids() == []
        [outcome] = await asyncio.wait_for(running, 30)
        assert not outcome.ok

    uvloop.run(main())
