"""The worker pool under uvloop: large batches and replies, crashes, timeouts."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
from pathlib import Path

import msgspec
import uvloop

from dlqproc.model import Delivery, Lane, Outcome, Reason
from dlqproc.pool import WorkerPool
from dlqproc.reprocess import Limits

LIMITS = Limits("v1.dlq", 8 << 20)


def env(base: str, payload: dict[str, object]) -> bytes:
    return json.dumps(
        {"source_subject": f"{base}.acme", "company": "acme", "original_payload": payload}
    ).encode()


def run(batches: list[list[Delivery]], workers: int = 1, timeout: float = 10.0) -> list:
    async def main() -> list:
        pool = WorkerPool(workers, "support.handlers", LIMITS, timeout)
        await pool.start()
        try:
            return [await pool.run(b) for b in batches]
        finally:
            await pool.close()

    return uvloop.run(main())


def test_megabyte_batches_and_replies_cross_the_socket_intact() -> None:
    # Far beyond a pipe's 64 KiB buffer both ways: 2 MB in, ~2 MB out.
    padding = "y" * (2 << 20)
    batch = [
        Delivery(1, "v1.dlq.acme", env("t.ok", {"id": "a", "pad": padding}), 1, Lane.DLQ),
        Delivery(2, "v1.dlq.acme", env("t.big", {"id": "b"}), 1, Lane.DLQ),
    ]
    [outcomes] = run([batch])
    assert [o.token for o in outcomes] == [1, 2]
    assert outcomes[0].ok and outcomes[1].ok
    assert sum(len(block.rows) for block in outcomes[1].rows) == 2000
    block = outcomes[1].rows[-1]
    # A value every row of a block shares travels once, beside the rows.
    shared = msgspec.json.decode(block.shared) if block.shared_columns else {}
    assert {**msgspec.json.decode(block.rows[-1]), **shared}["pad"] == "x" * 1000


def test_a_crash_costs_only_the_crashing_message() -> None:
    batch = [
        Delivery(1, "v1.dlq.acme", env("t.ok", {"id": "a"}), 1, Lane.DLQ),
        Delivery(2, "v1.dlq.acme", env("t.crash", {"id": "c", "crash_times": 1}), 1, Lane.DLQ),
        Delivery(3, "v1.dlq.acme", env("t.ok", {"id": "b"}), 1, Lane.DLQ),
    ]
    [outcomes] = run([batch])
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].reason is Reason.WORKER_CRASHED


def test_a_hung_handler_times_out_and_the_pool_recovers() -> None:
    hung = [Delivery(1, "v1.dlq.acme", env("t.hang", {"id": "h", "hang_times": 1}), 1, Lane.DLQ)]
    after = [Delivery(2, "v1.dlq.acme", env("t.ok", {"id": "a"}), 1, Lane.DLQ)]
    first, second = run([hung, after], timeout=1.0)
    assert first[0].reason is Reason.TIMEOUT
    assert second[0].ok


def _dead(pid: int) -> bool:
    """The process has exited (a zombie until its parent reaps it), probed without the loop."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_a_worker_killed_while_idle_costs_its_next_batch_nothing() -> None:
    # Killed while idle, then handed a batch before the loop has noticed the
    # death: the batch is retried one message at a time on the replacement.
    batch = [Delivery(i, "v1.dlq.acme", env("t.ok", {"id": str(i)}), 1, Lane.DLQ) for i in (1, 2)]

    async def main() -> list[Outcome]:
        pool = WorkerPool(1, "support.handlers", LIMITS, 10.0)
        await pool.start()
        try:
            [pid] = pool.pids()
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            # Deliberately blocking: the loop must not run until the batch is handed over.
            while not _dead(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _dead(pid)
            outcomes = await pool.run(batch)
            assert pool.alive == 1 and pool.pids() != [pid]
            return outcomes
        finally:
            await pool.close()

    loop_errors: list[dict[str, object]] = []

    async def watched() -> list[Outcome]:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: loop_errors.append(ctx))
        outcomes = await main()
        gc.collect()  # a never-retrieved future exception is reported when collected
        return outcomes

    outcomes = uvloop.run(watched())
    assert [(o.token, o.ok) for o in outcomes] == [(1, True), (2, True)], outcomes
    assert loop_errors == []
