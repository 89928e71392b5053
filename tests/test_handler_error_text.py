"""A handler error whose text cannot be encoded as it stands (a lone surrogate) is
reported as that error: in the exhausted row and the log, never as a crash."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest

from dlqproc.logs import JsonFormatter
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


@pytest.mark.parametrize("workers", ["2", "0"])
def test_an_error_with_a_lone_surrogate_is_reported_as_that_error(
    service: Make, workers: str
) -> None:
    svc = service(HANDLERS_MODULE="support.lifecycle_handlers", NATS_DLQWORKERS=workers)
    [perm_seq] = svc.publish("acme", [envelope("t.surrogate", "acme", {"id": "p1"})])
    [transient_seq] = svc.publish(
        "acme", [envelope("t.surrogate", "acme", {"id": "t1", "transient": True})]
    )
    wait_until(lambda: len(svc.exhausted()) == 2, timeout=60)
    wait_until(svc.settled, timeout=30)
    rows = {r["dlq_sequence"]: r for r in svc.exhausted()}
    permanent, transient = rows[perm_seq], rows[transient_seq]
    # The handler's own classification and words, the surrogate made storable.
    assert permanent["reason"] == "validation" and permanent["retry_count"] == 1, permanent
    assert transient["reason"] == "retries_exhausted" and transient["retry_count"] == 3
    for row, ident in ((permanent, "p1"), (transient, "t1")):
        assert row["last_error"].startswith("bad text ") and row["last_error"].endswith(ident)
        assert "\ud800" not in row["last_error"]
    logged = [e for e in svc.logs() if e.get("stream_seq") == perm_seq and e.get("error")]
    assert logged and all(e["error"].startswith("bad text ") for e in logged), logged
    # Nothing was mistaken for a dead worker or an internal error.
    assert not svc.find("worker lost, replacing it")
    assert "Traceback" not in svc.log_text()
    assert svc.rows("acme") == {}


def test_a_log_line_with_a_lone_surrogate_is_written_escaped() -> None:
    record = logging.makeLogRecord(
        {"name": "dlq_worker", "msg": "failed \ud800", "levelname": "WARNING"}
    )
    record.error = "bad text \udc80 in p1"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "failed \\ud800"
    assert line["error"] == "bad text \\udc80 in p1"
