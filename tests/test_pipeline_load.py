"""10,000 generated events through `dlqproc publish` and the whole pipeline: counts reconcile."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_pipeline import main_settled

from support.expected import expected, publish, stored_ids
from support.service import Service, wait_until

Make = Callable[..., Service]


def _bases() -> tuple[str, ...]:
    from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

    return (*REALTIME_BASES, *HISTORY_BASES)


@pytest.mark.parametrize("n", [10_000])
def test_ten_thousand_published_events_reconcile(pipeline: Make, n: int) -> None:
    svc = pipeline(
        NATS_DLQWORKERS="2", NATS_DLQBASEDELAYMINUTES="0.005", NATS_DLQMAXDELAYMINUTES="0.01"
    )
    publish(svc.nats_url, n, svc.env)
    wait_until(
        lambda: main_settled(svc) and main_settled(svc, realtime=False) and svc.settled(),
        timeout=400,
        interval=1.0,
    )
    invalid, orphans, ids = expected(n, 7, 0.02)
    exhausted = svc.exhausted()
    # Every invalid event and every orphan update, and nothing else, is exhausted.
    reasons = [r["reason"] for r in exhausted]
    assert reasons.count("validation") == invalid
    assert reasons.count("retries_exhausted") == orphans
    assert len(exhausted) == invalid + orphans
    # Every event reached a table or the DLQ: what is in the DLQ is the invalid
    # ones plus updates that raced their upsert and were then applied.
    dlq = svc.dlq_messages()
    assert len(dlq) >= invalid + orphans
    assert stored_ids(svc.query, ids) == ids
