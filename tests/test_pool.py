"""The worker pool under uvloop: large batches and replies, crashes, timeouts."""

from __future__ import annotations

import json

import msgspec
import uvloop

from dlqproc.model import Delivery, Lane, Reason
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
            pool.close()

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
    assert msgspec.json.decode(outcomes[1].rows[-1].rows[-1])["pad"] == "x" * 1000


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
