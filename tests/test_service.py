"""The DLQ reprocessor end to end: real nats-server, real PostgreSQL, real worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from support.barrier import Barrier
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def test_success_commits_rows_and_acks(service: Make) -> None:
    svc = service()
    svc.publish("acme", [envelope("t.ok", "acme", {"id": f"m{i}"}) for i in range(20)])
    wait_until(svc.settled)
    assert svc.rows("acme") == {f"m{i}": 1 for i in range(20)}
    consumer = svc.consumer()
    assert consumer["ack_pending"] == 0 and consumer["ack_floor"] == 20
    assert svc.exhausted() == []
    assert len(svc.find("Successfully processed event from DLQ")) == 20


def test_transient_then_success_uses_configured_delays(service: Make) -> None:
    svc = service()
    svc.publish("acme", [envelope("t.flaky", "acme", {"id": "f", "fail_times": 2})])
    wait_until(lambda: svc.rows("acme").get("f"))
    wait_until(svc.settled)
    # Succeeded on delivery k+1 = 3; budget is 3 so it must not be exhausted.
    assert svc.rows("acme") == {"f": 3}
    assert svc.exhausted() == []
    delays = [
        (e["num_delivered"], e["delay_seconds"])
        for e in svc.find("Retrying DLQ message with backoff")
    ]
    # base 0.3 s doubling, jitter off: 0.3 after delivery 1, 0.6 after delivery 2.
    assert delays == [(1, 0.3), (2, 0.6)]


def test_transient_forever_is_exhausted_once_at_budget(service: Make) -> None:
    svc = service()
    [seq] = svc.publish("acme", [envelope("t.fail", "acme", {"id": "x"})])
    wait_until(svc.exhausted)
    wait_until(svc.settled)
    [row] = svc.exhausted()
    assert row["retry_count"] == 3  # NATS_DLQMAXRETRIES
    assert row["reason"] == "retries_exhausted"
    assert row["company_id"] == "acme" and row["source_subject"] == "t.fail.acme"
    assert row["dlq_sequence"] == seq and row["resolved"] is False
    assert row["original_payload"] == {"id": "x"}
    assert row["dlq_payload"]["source_subject"] == "t.fail.acme"
    assert "always failing x" in row["last_error"]
    # TERMed after the commit: nothing pending, and JetStream's max deliver (6)
    # was never reached.
    delivered = [e["num_delivered"] for e in svc.find("Failed to process event from DLQ")]
    assert max(delivered) == 2
    assert svc.find(
        "Max retries exceeded, attempting to persist to exhausted store", num_delivered=3
    )
    assert svc.consumer()["ack_pending"] == 0


def test_permanent_failure_is_exhausted_on_first_delivery(service: Make) -> None:
    svc = service()
    svc.publish(
        "acme", [envelope("t.perm", "acme", {"id": "p"}), envelope("t.nosuch", "acme", {"id": "u"})]
    )
    wait_until(lambda: len(svc.exhausted()) == 2)
    wait_until(svc.settled)
    rows = {r["source_subject"]: r for r in svc.exhausted()}
    assert rows["t.perm.acme"]["retry_count"] == 1
    assert rows["t.perm.acme"]["reason"] == "validation"
    assert rows["t.nosuch.acme"]["retry_count"] == 1
    assert rows["t.nosuch.acme"]["reason"] == "unknown_subject"
    assert svc.find("Retrying DLQ message with backoff") == []


def test_garbage_body_is_stored_with_raw_bytes(service: Make) -> None:
    svc = service()
    garbage = b"\xff\xfe not json \x00 at all"
    deep = envelope("t.ok", "acme", "DEEP").replace(b'"DEEP"', b"[" * 100_000 + b"]" * 100_000)
    nul = envelope("t.ok", "acme", {"id": "nul"}).replace(b'"nul"', b'"nul\\u0000"')
    svc.publish("acme", [garbage, deep, nul])
    wait_until(lambda: len(svc.exhausted()) == 3)
    wait_until(svc.settled)
    rows = svc.exhausted()
    by_raw = {bytes(r["raw_payload"]): r for r in rows if r["raw_payload"] is not None}
    assert by_raw[garbage]["reason"] == "not_json"
    assert by_raw[garbage]["company_id"] == "acme"
    assert by_raw[garbage]["retry_count"] == 1
    assert by_raw[garbage]["dlq_payload"]["undecodable"] is True
    assert by_raw[deep]["reason"] == "too_deep"
    # \u0000 is valid JSON, but PostgreSQL refuses it in text and jsonb: the row
    # write fails as a permanent validation error, and the exhausted row keeps
    # the raw bytes since jsonb cannot hold them. Stored once, never looping.
    assert by_raw[nul]["reason"] == "validation"
    assert by_raw[nul]["retry_count"] == 1
    assert svc.rows("acme") == {}


def test_exhausted_row_written_once_even_if_term_is_lost(service: Make) -> None:
    svc = service()
    body = envelope("t.perm", "acme", {"id": "once"})
    [seq] = svc.publish("acme", [body])
    wait_until(svc.exhausted)
    wait_until(svc.settled)
    [first] = svc.exhausted()
    assert svc.stop() == 0
    # As if the TERM had been lost: the consumer is gone, and the next process
    # gets the same DLQ message (same stream sequence, same bytes) again from
    # JetStream and exhausts it a second time.
    asyncio.run(_delete_consumer(svc))
    again = service(NATS_DLQSTREAM=svc.stream, NATS_DLQSUBJECT=svc.subject)
    wait_until(
        lambda: again.find(
            "Max retries exceeded, attempting to persist to exhausted store", stream_seq=seq
        ),
        timeout=30,
    )
    wait_until(again.settled)
    assert again.find("Starting DLQ worker...")
    assert again.exhausted() == [first]
    assert first["dlq_sequence"] == seq


async def _delete_consumer(svc: Service) -> None:
    nc = await nats.connect(svc.nats_url)
    try:
        await nc.jetstream().delete_consumer(svc.stream, svc.durable)
    finally:
        await nc.close()


def test_operator_sql_runs_unchanged(service: Make) -> None:
    svc = service()
    svc.publish("acme", [envelope("t.perm", "acme", {"id": "op"})])
    wait_until(svc.exhausted)
    inspect = """
SELECT
    id,
    created_at,
    company_id,
    source_subject,
    last_error,
    retry_count,
    event_timestamp,
    dlq_payload::jsonb ->> 'original_payload' as original_payload, -- Extract original payload
    resolved,
    resolved_at,
    notes
FROM
    exhausted_events
WHERE
    company_id = 'acme'
    AND resolved = false -- Focus on unresolved issues
ORDER BY
    created_at DESC;
"""
    [row] = svc.query(inspect)
    event_id = row[0]
    assert json.loads(row[7]) == {"id": "op"}
    assert row[6] is not None  # event_timestamp from the envelope's ts
    resolution = """
    UPDATE exhausted_events
    SET
        resolved = true,
        resolved_at = NOW(),
        notes = 'Manually reprocessed after fixing bug XYZ / Marked as resolved, data no longer needed.'
    WHERE
        id = <event_id>;
    """
    assert svc.execute(resolution.replace("<event_id>", str(event_id))) == 1
    assert svc.query(inspect) == []


def test_postgres_down_while_exhausting_naks_then_stores(service: Make, pg_home: Path) -> None:
    from conftest import fresh_database

    from dlqproc.embedded import PostgresServer

    with PostgresServer(pg_home / "data") as pg:
        svc = service(db=fresh_database(pg))
        pg.stop()
        svc.publish("acme", [envelope("t.perm", "acme", {"id": "pgdown"})])
        wait_until(lambda: svc.find("Failed to save exhausted event..."))
        assert svc.find("Retrying DLQ message with backoff")
        # NAKed, not TERMed: the message is still in the stream, waiting.
        assert svc.stream_messages() == 1
        pg.start()
        wait_until(svc.exhausted, timeout=60)
        wait_until(svc.settled)
        [row] = svc.exhausted()
        assert row["source_subject"] == "t.perm.acme" and row["retry_count"] >= 2
        svc.stop()


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    service: Make, tmp_path: Path
) -> None:
    # Every run of the handler leaves a line (its worker's pid, the attempt):
    # the upserted rows alone would hide a message processed twice.
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    svc = service(NATS_DLQWORKERBATCH="10")
    n = 200
    ids = [f"k{i}" for i in range(n)]
    svc.publish(
        "acme",
        [
            envelope("t.record", "acme", {"id": i, "sleep": 0.01, "record": str(runs_dir)})
            for i in ids
        ],
    )
    killed = svc.worker_pids()[0]
    wait_until(lambda: (runs_dir / str(killed)).exists())  # it is running a batch
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: svc.find("worker lost, replacing it"))
    wait_until(lambda: len(svc.rows("acme")) == n, timeout=60)
    wait_until(svc.settled)
    runs: dict[str, list[int]] = {}
    for f in runs_dir.iterdir():
        for line in f.read_text().splitlines():
            event_id, attempt = line.split()
            # No JetStream redelivery: the kill cost no message a delivery.
            assert attempt == "1", line
            runs.setdefault(event_id, []).append(int(f.name))
    assert sorted(runs) == sorted(ids)
    twice = {i: pids for i, pids in runs.items() if len(pids) > 1}
    # Only the killed worker's batch runs again, each of its messages once more
    # in a worker that lives; every other message ran exactly once.
    assert len(twice) <= 10, twice
    assert all(len(p) == 2 and p.count(killed) == 1 for p in twice.values()), twice
    assert killed not in svc.worker_pids()
    assert len(svc.worker_pids()) == 2
    assert svc.exhausted() == []
    consumer = svc.consumer()
    assert consumer["ack_floor"] == n and consumer["ack_pending"] == 0
    assert consumer["redelivered"] == 0


def test_crashing_message_is_isolated_from_its_batch(service: Make) -> None:
    svc = service(NATS_DLQWORKERBATCH="20", NATS_DLQWORKERS="1")
    bodies = [envelope("t.ok", "acme", {"id": f"c{i}"}) for i in range(10)]
    bodies.insert(5, envelope("t.crash", "acme", {"id": "boom", "crash_times": 1}))
    bodies.insert(
        8, envelope("t.crash", "acme", {"id": "segv", "crash_times": 1, "segfault": True})
    )
    svc.publish("acme", bodies)
    wait_until(lambda: len(svc.rows("acme")) == 12, timeout=60)
    wait_until(svc.settled)
    rows = svc.rows("acme")
    # The other ten succeeded on their first delivery: not delayed by the crashes.
    assert all(rows[f"c{i}"] == 1 for i in range(10))
    assert rows["boom"] == 2 and rows["segv"] == 2
    assert len(svc.find("worker lost, replacing it", reason="crash")) >= 2
    assert svc.exhausted() == []


def test_hung_worker_is_killed_and_replaced(service: Make) -> None:
    svc = service(NATS_DLQTASKTIMEOUT="1s", NATS_DLQACKWAIT="5s", NATS_DLQWORKERS="1")
    before = svc.worker_pids()
    svc.publish("acme", [envelope("t.hang", "acme", {"id": "h", "hang_times": 1})])
    wait_until(lambda: svc.find("worker lost, replacing it", reason="timeout"), timeout=30)
    wait_until(lambda: svc.rows("acme").get("h"), timeout=30)
    assert svc.rows("acme") == {"h": 2}
    after = svc.worker_pids()
    assert len(after) == 1 and after != before


def test_in_progress_keeps_slow_work_from_redelivery(service: Make) -> None:
    # ack wait 3 s; each message takes 1.2 s on the only worker, so the last of
    # four waits ~3.6 s in the local queue: only in-progress acks keep it.
    svc = service(
        NATS_DLQACKWAIT="3s", NATS_DLQTASKTIMEOUT="2s", NATS_DLQWORKERS="1", NATS_DLQWORKERBATCH="1"
    )
    svc.publish(
        "acme", [envelope("t.slow", "acme", {"id": f"s{i}", "sleep": 1.2}) for i in range(4)]
    )
    wait_until(lambda: len(svc.rows("acme")) == 4, timeout=60)
    wait_until(svc.settled)
    assert svc.rows("acme") == {f"s{i}": 1 for i in range(4)}
    assert svc.consumer()["redelivered"] == 0


def test_sigterm_with_work_in_flight_exits_zero_and_loses_nothing(
    service: Make, tmp_path: Path
) -> None:
    # A long ack wait: a message left neither ACKed nor NAKed would only come
    # back after 120 s, far beyond the bounded waits below.
    slow_ack = {"NATS_DLQACKWAIT": "120s", "NATS_DLQTASKTIMEOUT": "60s"}
    barrier = Barrier(tmp_path / "barrier")
    svc = service(NATS_SHUTDOWNGRACE="30s", NATS_DLQWORKERBATCH="1", **barrier.env, **slow_ack)
    n = 12
    svc.publish("acme", [envelope("t.barrier", "acme", {"id": f"t{i}"}) for i in range(n)])
    # Both workers are inside a handler: work in flight, as a fact.
    started = wait_until(lambda: len(barrier.started()) == 2 and barrier.started())
    svc.signal(signal.SIGTERM)
    wait_until(lambda: svc.find("shutting down"))
    barrier.release()
    assert svc.wait_exit(60) == 0
    assert svc.find("stopped", exit_code=0)
    # What was in flight finished within the grace: committed (and ACKed).
    assert started <= set(svc.rows("acme"))
    # Every ACK followed its commit.
    assert len(svc.rows("acme")) >= svc.consumer()["ack_floor"]
    # Every other message was NAKed (short delay), not left to its ack wait: a
    # fresh process finishes all of them well before the 120 s ack wait.
    svc2 = service(
        NATS_DLQSTREAM=svc.stream, NATS_DLQSUBJECT=svc.subject, **barrier.env, **slow_ack
    )
    wait_until(lambda: len(svc2.rows("acme")) == n, timeout=40)
    wait_until(svc2.settled)
    assert svc2.exhausted() == []


def test_shutdown_past_the_grace_period_naks_the_running_batches(
    service: Make, tmp_path: Path
) -> None:
    # The handlers stay inside until released: "in flight" is a fact, not a sleep.
    barrier = Barrier(tmp_path / "barrier")
    slow_ack = {"NATS_DLQACKWAIT": "120s", "NATS_DLQTASKTIMEOUT": "60s"}
    svc = service(NATS_SHUTDOWNGRACE="1s", NATS_DLQWORKERBATCH="1", **barrier.env, **slow_ack)
    n = 5
    ids = [f"g{i}" for i in range(n)]
    svc.publish("acme", [envelope("t.barrier", "acme", {"id": i}) for i in ids])
    running = wait_until(lambda: len(barrier.started()) == 2 and barrier.started())  # both workers
    svc.signal(signal.SIGTERM)
    assert svc.wait_exit(60) == 0
    assert svc.find("stopped", exit_code=0)
    assert svc.rows("acme") == {}  # the running batches were cancelled, not committed
    # All five were NAKed (the two running past the grace, the three queued),
    # not left to the 120 s ack wait: a fresh process finishes them long before.
    barrier.release()
    svc2 = service(
        NATS_DLQSTREAM=svc.stream, NATS_DLQSUBJECT=svc.subject, **barrier.env, **slow_ack
    )
    wait_until(lambda: len(svc2.rows("acme")) == n, timeout=40)
    wait_until(svc2.settled)
    # Each came back as its second delivery: the cancelled attempt was counted.
    assert svc2.rows("acme") == {i: 2 for i in ids}
    assert all(barrier.attempts(i) == [1, 2] for i in running)
    assert svc2.exhausted() == []


@pytest.mark.parametrize("limit", ["count", "bytes"])
def test_in_flight_messages_never_exceed_the_budget(service: Make, limit: str) -> None:
    pad = "x" * 2000
    n = 15
    bodies = [
        envelope("t.slow", "acme", {"id": f"b{i}", "sleep": 0.3, "pad": pad}) for i in range(n)
    ]
    size = max(len(b) for b in bodies)
    # Room for three messages either way; four workers could take more.
    budget = (
        {"NATS_DLQMAXINFLIGHT": "3"}
        if limit == "count"
        else {"NATS_DLQMAXINFLIGHTBYTES": str(3 * size + size // 2)}
    )
    svc = service(NATS_DLQWORKERS="4", NATS_DLQWORKERBATCH="1", **budget)
    svc.publish("acme", bodies)
    seen: list[int] = []
    deadline = time.monotonic() + 120
    while len(svc.rows("acme")) < n:
        # Unacknowledged deliveries: what the service holds (fetched, not settled).
        seen.append(svc.consumer()["ack_pending"])
        assert time.monotonic() < deadline, f"{len(svc.rows('acme'))} of {n} stored"
    wait_until(svc.settled)
    assert max(seen) == 3, seen
    assert svc.rows("acme") == {f"b{i}": 1 for i in range(n)}


def test_update_before_upsert_is_retried_not_lost(service: Make) -> None:
    svc = service()
    svc.publish("acme", [envelope("t.update", "acme", {"id": "late"})])
    wait_until(svc.exhausted, timeout=30)
    [row] = svc.exhausted()
    assert row["reason"] == "retries_exhausted" and row["retry_count"] == 3
    assert "not found" in row["last_error"]


def test_workers_that_cannot_start_stop_the_service(service: Make) -> None:
    svc = service(start=False, HANDLERS_MODULE="support.broken_handlers")
    svc.start(wait=False)
    assert svc.wait_exit(60) == 3
    assert "worker processes do not start" in svc.log_text()


def test_second_signal_exits_at_once_and_loses_nothing(service: Make, tmp_path: Path) -> None:
    slow_ack = {"NATS_DLQACKWAIT": "8s", "NATS_DLQTASKTIMEOUT": "7s"}
    barrier = Barrier(tmp_path / "barrier")
    svc = service(NATS_SHUTDOWNGRACE="60s", NATS_DLQWORKERBATCH="1", **barrier.env, **slow_ack)
    n = 6
    svc.publish("acme", [envelope("t.barrier", "acme", {"id": f"d{i}"}) for i in range(n)])
    # Both workers are held inside a handler until released: in flight, as a fact.
    wait_until(lambda: len(barrier.started()) == 2)
    svc.signal(signal.SIGTERM)
    wait_until(lambda: svc.find("shutting down"))
    svc.signal(signal.SIGTERM)
    # Forced exit: it does not wait for the work in flight, nor the grace.
    assert svc.wait_exit(4) == 130
    assert not svc.find("stopped")
    barrier.release()
    # Unsettled messages come back after their ack wait; a new process finishes all.
    svc2 = service(
        NATS_DLQSTREAM=svc.stream,
        NATS_DLQSUBJECT=svc.subject,
        NATS_DLQWORKERS="6",
        **barrier.env,
        **slow_ack,
    )
    wait_until(lambda: len(svc2.rows("acme")) == n, timeout=60)
    wait_until(svc2.settled, timeout=30)
    assert svc2.exhausted() == []


def test_topology_is_created_then_reconciled(service: Make) -> None:
    svc = service(NATS_DLQMAXDELIVER="6", NATS_DLQMAXACKPENDING="100", NATS_DLQMAXAGEDAYS="1")
    assert svc.find("NATS topology reconciled", change=f"created stream {svc.stream}")
    assert svc.find("NATS topology reconciled", change=f"created consumer {svc.durable}")
    assert svc.stop() == 0
    svc2 = service(
        NATS_DLQSTREAM=svc.stream,
        NATS_DLQSUBJECT=svc.subject,
        NATS_DLQMAXDELIVER="8",
        NATS_DLQMAXACKPENDING="200",
        NATS_DLQMAXAGEDAYS="2",
    )
    changes = [e["change"] for e in svc2.find("NATS topology reconciled")]
    # A longer max age is safe to raise to (a shorter one is left alone: see below).
    assert f"updated stream {svc.stream}: max_age 86400s -> 172800s" in changes
    [consumer] = [c for c in changes if c.startswith(f"updated consumer {svc.durable}")]
    assert "max_ack_pending 100 -> 200" in consumer
    # JetStream redelivers without limit whatever nats.dlqMaxDeliver says.
    assert "max_deliver" not in consumer
    assert svc2.stop() == 0
    # Unchanged settings: nothing to reconcile.
    svc3 = service(
        NATS_DLQSTREAM=svc.stream,
        NATS_DLQSUBJECT=svc.subject,
        NATS_DLQMAXDELIVER="8",
        NATS_DLQMAXACKPENDING="200",
        NATS_DLQMAXAGEDAYS="2",
    )
    assert svc3.find("NATS topology reconciled") == []


def test_tenant_mode_reads_only_its_tenant(service: Make) -> None:
    svc = service(COMPANY_ID="acme")
    assert svc.durable.endswith("_worker_consumer")
    svc.durable = f"{svc.durable}_acme"
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "mine"})])
    svc.publish("globex", [envelope("t.ok", "globex", {"id": "theirs"})])
    wait_until(lambda: svc.rows("acme"))
    wait_until(svc.settled)
    assert svc.rows("acme") == {"mine": 1}
    assert svc.rows("globex") == {}
    # The other tenant's message stays in the stream for its own deployment.
    assert svc.stream_messages() == 2


def test_envelope_claiming_another_tenant_is_rejected(service: Make) -> None:
    svc = service()
    svc.publish("acme", [envelope("t.ok", "globex", {"id": "spoof"})])
    wait_until(svc.exhausted)
    [row] = svc.exhausted()
    assert row["reason"] == "invalid_tenant"
    assert svc.rows("globex") == {} and svc.rows("acme") == {}


def test_message_expired_in_local_queue_is_left_to_redelivery(service: Make, tmp_path) -> None:
    from dlqproc.embedded import NatsServer

    with NatsServer(tmp_path / "nats") as nats_server:
        # One worker, one message at a time, 2 s each; ack wait 3 s. While NATS
        # is down no in-progress ack gets through, so the queued messages pass
        # their ack wait locally and must not be processed by this attempt.
        svc = service(
            nats_url=nats_server.url,
            NATS_DLQACKWAIT="3s",
            NATS_DLQTASKTIMEOUT="2500ms",
            NATS_DLQWORKERS="1",
            NATS_DLQWORKERBATCH="1",
        )
        n = 5
        svc.publish(
            "acme", [envelope("t.slow", "acme", {"id": f"q{i}", "sleep": 2.0}) for i in range(n)]
        )
        # The first message is done: the rest are fetched, held, one running.
        wait_until(lambda: svc.rows("acme"), timeout=30)
        nats_server.stop()
        wait_until(
            lambda: svc.find("DLQ message expired in the local queue, not processed"), timeout=30
        )
        nats_server.start()
        wait_until(lambda: len(svc.rows("acme")) == n, timeout=60)
        wait_until(svc.settled, timeout=30)
        expired = svc.find("DLQ message expired in the local queue, not processed")
        assert all(e["num_delivered"] == 1 for e in expired)
        rows = svc.rows("acme")
        # The expired ones were processed by a later delivery, not by the stale one.
        for e in expired:
            assert rows[f"q{e['stream_seq'] - 1}"] >= 2
        svc.stop()


def test_in_process_mode_without_worker_processes(service: Make) -> None:
    svc = service(NATS_DLQWORKERS="0")
    assert svc.worker_pids() == []
    svc.publish(
        "acme",
        [envelope("t.ok", "acme", {"id": f"i{i}"}) for i in range(10)]
        + [envelope("t.perm", "acme", {"id": "p"})],
    )
    wait_until(lambda: len(svc.rows("acme")) == 10 and svc.exhausted(), timeout=30)
    wait_until(svc.settled)
    assert svc.rows("acme") == {f"i{i}": 1 for i in range(10)}
    assert svc.stop() == 0


def test_deleted_dlq_stream_and_consumer_are_recreated(service: Make) -> None:
    import asyncio

    import nats

    svc = service()

    async def delete() -> None:
        nc = await nats.connect(svc.nats_url)
        try:
            await nc.jetstream().delete_stream(svc.stream)
        finally:
            await nc.close()

    asyncio.run(delete())
    wait_until(
        lambda: (
            len(svc.find("NATS topology reconciled", change=f"created stream {svc.stream}")) == 2
        ),
        timeout=60,
    )
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "after"})])
    wait_until(lambda: svc.rows("acme") == {"after": 1}, timeout=30)


def _operator_stream(url: str, name: str, subjects: list[str]) -> dict[str, object]:
    """An operator's DLQ stream with limits of its own; returns its config as created."""
    import asyncio

    import nats
    from nats.js import api

    async def go() -> dict[str, object]:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().add_stream(
                api.StreamConfig(
                    name=name,
                    subjects=subjects,
                    description="operator's DLQ: 14 days, 1 GiB",
                    max_age=14 * 86400,
                    duplicate_window=600,
                    max_bytes=1 << 30,
                    storage=api.StorageType.FILE,
                )
            )
            return _kept_settings(info.config)
        finally:
            await nc.close()

    return asyncio.run(go())


def _kept_settings(config: object) -> dict[str, object]:
    names = ("description", "max_age", "duplicate_window", "max_bytes", "num_replicas", "subjects")
    return {n: getattr(config, n) for n in names}


def _stream_settings(url: str, name: str) -> dict[str, object]:
    import asyncio

    import nats

    async def go() -> dict[str, object]:
        nc = await nats.connect(url)
        try:
            return _kept_settings((await nc.jetstream().stream_info(name)).config)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_an_operators_dlq_stream_keeps_its_settings(service: Make, nats_server) -> None:
    # Created by the operator: 14 days, a 600 s duplicate window, 1 GiB, a
    # description. dlqproc (7 days by default) must neither shorten nor reset
    # any of it: at start-up, nor when fetches fail and it restores the topology.
    import asyncio

    import nats

    svc = service(start=False)
    before = _operator_stream(nats_server.url, svc.stream, [f"{svc.subject}.>"])
    svc.start()
    assert _stream_settings(nats_server.url, svc.stream) == before
    [kept] = svc.find("NATS stream setting left as is", setting="max_age")
    assert kept["have"] == 14 * 86400 * 10**9 and kept["want"] == 7 * 86400 * 10**9
    assert not svc.find_containing("updated stream")

    async def delete_consumer() -> None:
        nc = await nats.connect(svc.nats_url)
        try:
            await nc.jetstream().delete_consumer(svc.stream, svc.durable)
        finally:
            await nc.close()

    # Fetches fail until the restore recreates the consumer.
    asyncio.run(delete_consumer())
    wait_until(
        lambda: (
            svc.find("NATS topology reconciled", change=f"created consumer {svc.durable}")
            and len(svc.find("NATS topology reconciled")) == 2
        ),
        timeout=30,
    )
    assert svc.find("fetch failed")
    assert _stream_settings(nats_server.url, svc.stream) == before
    assert len(svc.find("NATS stream setting left as is", setting="max_age")) >= 2
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "after"})])
    wait_until(lambda: svc.rows("acme") == {"after": 1}, timeout=30)


def test_every_server_of_nats_url_is_tried(service: Make, nats_server) -> None:
    # Two servers that accept nothing, listed around the one that runs.
    from dlqproc.embedded import free_port

    dead = [f"nats://127.0.0.1:{free_port()}" for _ in range(2)]
    svc = service(nats_url=",".join([dead[0], nats_server.url, dead[1]]))
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "via-list"})])
    wait_until(lambda: svc.rows("acme") == {"via-list": 1}, timeout=30)
