"""Failures that must neither lose a message nor stall the service (found in review)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime

import psycopg

from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def raw_envelope(source_subject: str, company: str, payload_json: str) -> bytes:
    return (
        f'{{"source_subject": {json.dumps(source_subject)}, "company": "{company}", '
        f'"original_payload": {payload_json}, "error": "e", '
        f'"ts": "{datetime.now(UTC).isoformat()}"}}'
    ).encode()


def test_nul_characters_never_block_the_exhausted_row(service: Make) -> None:
    svc = service()
    svc.publish(
        "acme",
        [
            raw_envelope("t.x\u0000y.acme", "acme", '{"id": "a"}'),
            envelope("t.fail", "acme", {"id": "x\u0000y"}),
        ],
    )
    wait_until(lambda: len(svc.exhausted()) == 2)
    wait_until(svc.settled)
    rows = svc.exhausted()
    subjects = {r["source_subject"] for r in rows}
    assert "t.x\\u0000y.acme" in subjects and "t.fail.acme" in subjects
    assert {r["reason"] for r in rows} == {"unknown_subject", "retries_exhausted"}
    assert svc.find("Failed to save exhausted event...") == []


def test_buggy_handler_output_fails_its_event_only(service: Make) -> None:
    svc = service()
    svc.publish(
        "acme",
        [
            envelope("t.badop", "acme", {"id": "b"}),
            envelope("t.badkey", "acme", {"id": "k"}),
            envelope("t.ok", "acme", {"id": "fine"}),
        ],
    )
    wait_until(lambda: len(svc.exhausted()) == 2, timeout=30)
    wait_until(svc.settled)
    assert svc.rows("acme") == {"fine": 1}
    assert {r["reason"] for r in svc.exhausted()} == {"retries_exhausted"}
    assert all(
        "handler returned" in r["last_error"] or "RowOp" in r["last_error"] for r in svc.exhausted()
    )
    assert svc.stop() == 0


def test_workers_dying_while_idle_are_replaced_before_work_arrives(service: Make) -> None:
    svc = service(NATS_DLQTASKTIMEOUT="8s")
    for pid in svc.worker_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(svc.find("worker lost, replacing it")) == 2)
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "a"})])
    wait_until(lambda: svc.rows("acme"), timeout=30)
    # Processed on its first delivery: no attempt was burnt on a dead worker.
    assert svc.rows("acme") == {"a": 1}
    assert svc.find("Failed to process event from DLQ") == []


def test_a_locked_table_delays_but_loses_nothing(service: Make) -> None:
    svc = service(
        POSTGRES_STATEMENTTIMEOUT="300ms", NATS_DLQMAXRETRIES="5", NATS_DLQMAXDELIVER="10"
    )
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "first"})])
    wait_until(lambda: svc.rows("acme"))
    with psycopg.connect(svc.dsn) as lock:
        lock.execute("LOCK TABLE daisi_acme.test_rows IN ACCESS EXCLUSIVE MODE")
        svc.publish("acme", [envelope("t.ok", "acme", {"id": "second"})])
        wait_until(lambda: svc.find("Failed to process event from DLQ"), timeout=30)
        lock.rollback()
    wait_until(lambda: "second" in svc.rows("acme") or svc.exhausted(), timeout=30)
    wait_until(svc.settled)
    assert "second" in svc.rows("acme")
    assert svc.exhausted() == []


def test_a_value_no_column_can_hold_fails_only_its_event(service: Make) -> None:
    svc = service()
    svc.publish(
        "acme",
        [envelope("t.badvalue", "acme", {"id": "v"}), envelope("t.ok", "acme", {"id": "fine"})],
    )
    wait_until(svc.exhausted, timeout=30)
    wait_until(svc.settled)
    [row] = svc.exhausted()
    assert row["reason"] == "validation" and row["retry_count"] == 1
    assert "cannot store a complex value" in row["last_error"]
    assert svc.rows("acme") == {"fine": 1}
