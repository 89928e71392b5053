"""Hostile input for minutes (issue 9): the generators of support.hostile through one
running service, batch after batch, until a time budget is spent.

Slow: run with `python3 dev.py test -- -m slow -k fuzz`. DLQPROC_FUZZ_SECONDS
sets the budget (default 240).
"""

from __future__ import annotations

import os
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from test_poison import hostile_service  # noqa: F401 - the module's own service

from support.hostile import Message, batches, settle_batch
from support.service import Service

BUDGET = float(os.environ.get("DLQPROC_FUZZ_SECONDS", "240"))
ROUND = 5  # examples per hypothesis run; the budget is checked between runs


@pytest.mark.slow
@pytest.mark.timeout(BUDGET + 300)
def test_hostile_input_for_minutes_leaves_everything_settled(
    hostile_service: Service,  # noqa: F811
) -> None:
    started = time.monotonic()
    settled: list[float] = []
    ended: Counter[str] = Counter()

    @settings(
        max_examples=ROUND,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(batch=batches())
    def one_round(batch: list[Message]) -> None:
        # No early return once the budget is spent: hypothesis replays a failing
        # batch, and the replay must meet the same service.
        drained, how = settle_batch(hostile_service, batch, timeout=60)
        settled.append(drained)
        ended.update(how)

    while time.monotonic() - started < BUDGET:
        one_round()
    # A run that drained nothing proved nothing.
    assert len(settled) >= 10, f"only {len(settled)} batches in {BUDGET}s"
    print(
        f"{len(settled)} hostile batches settled in {time.monotonic() - started:.0f}s;"
        f" slowest drain {max(settled):.1f}s; {dict(ended)}"
    )
