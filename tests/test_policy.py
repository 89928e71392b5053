"""The policy: decide() over every outcome and delivery count, the decisions after a
failed write, publish or settle, local expiry, backoff(), and fetch sizing."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.model import Failed, FailureKind, Ok, Outcome, Reason, Stored, failure
from dlqproc.policy import (
    ACK,
    DEAD_LETTER_ATTEMPTS,
    Ack,
    Budget,
    Exhaust,
    Nak,
    RetryPolicy,
    after_failed_publish,
    after_failed_settle,
    after_failed_write,
    backoff,
    dead_letter_given_up,
    decide,
    expired_locally,
    needs_progress,
    plan_fetch,
)

POLICY = RetryPolicy(base_delay=10.0, max_delay=300.0, jitter=0.2, max_retries=5)
STORED = Stored("acme", "t.ok.acme", None, None, None)


def fault(kind: FailureKind, reason: Reason) -> Failed:
    """A failed outcome, as a worker returns it."""
    return failure(1, STORED, kind, reason, "boom")


TRANSIENT_REASONS = [
    Reason.NOT_FOUND,
    Reason.HANDLER_ERROR,
    Reason.WORKER_CRASHED,
    Reason.TIMEOUT,
]
PERMANENT_REASONS = [
    Reason.NOT_JSON,
    Reason.TOO_BIG,
    Reason.TOO_DEEP,
    Reason.BAD_ENVELOPE,
    Reason.UNKNOWN_SUBJECT,
    Reason.INVALID_TENANT,
    Reason.VALIDATION,
]
DELIVERIES = list(range(1, 13))
DRAWS = [0.0, 0.5, 0.999]


@pytest.mark.parametrize("n", DELIVERIES)
@pytest.mark.parametrize("draw", DRAWS)
def test_success_is_always_ack(n: int, draw: float) -> None:
    assert decide(Ok(1, STORED), n, POLICY, draw) == ACK


@pytest.mark.parametrize("n", DELIVERIES)
@pytest.mark.parametrize("reason", PERMANENT_REASONS)
def test_permanent_failure_is_exhausted_at_once_with_its_reason(n: int, reason: Reason) -> None:
    decision = decide(fault(FailureKind.PERMANENT, reason), n, POLICY, 0.3)
    assert decision == Exhaust(reason)


@pytest.mark.parametrize("n", DELIVERIES)
@pytest.mark.parametrize("reason", TRANSIENT_REASONS)
@pytest.mark.parametrize("draw", DRAWS)
def test_transient_failure_naks_then_exhausts(n: int, reason: Reason, draw: float) -> None:
    decision = decide(fault(FailureKind.TRANSIENT, reason), n, POLICY, draw)
    if n < POLICY.max_retries:
        assert decision == Nak(backoff(n, POLICY, draw))
        assert decision.delay > 0
    else:
        assert decision == Exhaust(Reason.RETRIES_EXHAUSTED)


@pytest.mark.parametrize("n", DELIVERIES)
@pytest.mark.parametrize("draw", DRAWS)
def test_store_unavailable_never_exhausts_nor_acks(n: int, draw: float) -> None:
    # JetStream redelivers without limit: always a NAK with backoff.
    decision = decide(fault(FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE), n, POLICY, draw)
    assert decision == Nak(backoff(n, POLICY, draw))
    assert decision.delay > 0


@pytest.mark.parametrize("n", DELIVERIES)
def test_a_failed_write_counts_against_the_budget(n: int) -> None:
    decision = decide(fault(FailureKind.TRANSIENT, Reason.DATABASE), n, POLICY, 0.5)
    expected = Exhaust if n >= POLICY.max_retries else Nak
    assert type(decision) is expected


def test_exhaustion_boundary_is_max_retries() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.0, max_retries=3)
    kinds = [
        type(decide(fault(FailureKind.TRANSIENT, Reason.TIMEOUT), n, policy, 0.0))
        for n in range(1, 6)
    ]
    assert kinds == [Nak, Nak, Exhaust, Exhaust, Exhaust]


policies = st.builds(
    lambda base, extra, jitter, retries: RetryPolicy(base, base + extra, jitter, retries),
    st.floats(min_value=1e-3, max_value=1e6),
    st.floats(min_value=0.0, max_value=1e6),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.integers(min_value=1, max_value=50),
)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


@given(
    policy=policies,
    n=st.integers(min_value=1, max_value=10**6),
    reason=st.sampled_from([*TRANSIENT_REASONS, Reason.STORE_UNAVAILABLE]),
    draw=draws,
)
def test_every_nak_has_a_positive_delay(
    policy: RetryPolicy, n: int, reason: Reason, draw: float
) -> None:
    decision = decide(fault(FailureKind.TRANSIENT, reason), n, policy, draw)
    if isinstance(decision, Nak):
        assert decision.delay > 0
        assert decision.delay <= policy.max_delay
    else:
        assert n >= policy.max_retries and reason is not Reason.STORE_UNAVAILABLE


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 5), (2, 10), (3, 20), (4, 40), (5, 80), (6, 160), (7, 300), (8, 300), (9, 300), (10, 300)],
)
def test_backoff_without_jitter_table(n: int, expected: float) -> None:
    policy = RetryPolicy(base_delay=5.0, max_delay=300.0, jitter=0.0, max_retries=5)
    assert backoff(n, policy, 0.7) == expected
    assert backoff(n, policy, 0.7) == min(5.0 * 2 ** (n - 1), 300.0)


def test_backoff_default_config_is_flat_five_minutes() -> None:
    policy = RetryPolicy(base_delay=300.0, max_delay=300.0, jitter=0.0, max_retries=5)
    assert [backoff(n, policy, 0.0) for n in range(1, 6)] == [300.0] * 5


def test_backoff_jitter_scales_down_from_the_cap() -> None:
    policy = RetryPolicy(base_delay=100.0, max_delay=100.0, jitter=0.5, max_retries=5)
    assert backoff(1, policy, 0.0) == 100.0
    assert backoff(1, policy, 0.5) == 75.0
    assert 50.0 < backoff(1, policy, 0.999999) < 50.01


@given(
    n=st.integers(min_value=1, max_value=10**6),
    base=st.floats(min_value=0.0, max_value=1e9),
    extra=st.floats(min_value=0.0, max_value=1e9),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    draw=draws,
)
def test_backoff_is_bounded_by_the_cap(
    n: int, base: float, extra: float, jitter: float, draw: float
) -> None:
    policy = RetryPolicy(base, base + extra, jitter, 5)
    delay = backoff(n, policy, draw)
    assert math.isfinite(delay)
    assert 0.0 <= delay <= policy.max_delay
    # jitter only ever takes away, at most `jitter` of the undelayed value
    undelayed = backoff(n, RetryPolicy(base, base + extra, 0.0, 5), draw)
    assert delay <= undelayed
    assert delay >= undelayed * (1.0 - jitter) - 1e-9 * undelayed


@given(
    n=st.integers(min_value=1, max_value=10**6),
    base=st.floats(min_value=1e-3, max_value=1e6),
    extra=st.floats(min_value=0.0, max_value=1e6),
    jitter=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    draw=draws,
)
def test_backoff_is_non_decreasing_in_attempt(
    n: int, base: float, extra: float, jitter: float, draw: float
) -> None:
    policy = RetryPolicy(base, base + extra, jitter, 5)
    assert backoff(n, policy, draw) <= backoff(n + 1, policy, draw)
    flat = RetryPolicy(base, base + extra, 0.0, 5)
    assert backoff(n, flat, draw) <= backoff(n + 1, flat, draw)


@given(
    n=st.integers(min_value=1, max_value=10**6),
    base=st.floats(min_value=1e-3, max_value=1e6),
    extra=st.floats(min_value=0.0, max_value=1e6),
)
def test_backoff_without_jitter_is_exact_doubling_capped(n: int, base: float, extra: float) -> None:
    policy = RetryPolicy(base, base + extra, 0.0, 5)
    # exact: compare in integer-exponent space to avoid overflow in the oracle
    expected = policy.max_delay if n > 80 else min(base * 2.0 ** (n - 1), policy.max_delay)
    assert backoff(n, policy, 0.5) == expected


@pytest.mark.parametrize("n", [10**6, 10**9, 10**18, 2**63, 10**100])
@pytest.mark.parametrize("base", [1e-6, 1.0, 300.0, 1e300])
def test_backoff_huge_attempts_do_not_overflow(n: int, base: float) -> None:
    policy = RetryPolicy(base, max(base, 600.0), 0.2, 5)
    delay = backoff(n, policy, 0.5)
    assert math.isfinite(delay)
    assert 0 < delay <= policy.max_delay


@pytest.mark.parametrize("n", [0, -1, -(10**9)])
def test_backoff_non_positive_attempt_is_treated_as_first(n: int) -> None:
    policy = RetryPolicy(5.0, 300.0, 0.0, 5)
    assert backoff(n, policy, 0.0) == 5.0


# --- fetch planning --------------------------------------------------------------------

budgets = st.builds(Budget, st.integers(1, 5000), st.integers(1, 1 << 30))


@given(
    budget=budgets,
    in_flight=st.integers(0, 6000),
    in_flight_bytes=st.integers(0, 1 << 31),
    fetch_batch=st.integers(1, 1000),
    oversized=st.booleans(),
    lane_waiting=st.booleans(),
)
def test_a_fetch_never_asks_past_the_budget(
    budget: Budget,
    in_flight: int,
    in_flight_bytes: int,
    fetch_batch: int,
    oversized: bool,
    lane_waiting: bool,
) -> None:
    plan = plan_fetch(budget, in_flight, in_flight_bytes, fetch_batch, oversized, lane_waiting)
    assert 0 <= plan.batch <= fetch_batch
    if plan.batch and plan.max_bytes == 0:
        # Unlimited only for the one message bigger than the room, admitted alone.
        assert (plan.batch, in_flight, oversized) == (1, 0, True)
    if plan.batch and plan.max_bytes:
        assert in_flight + plan.batch <= budget.messages
        assert in_flight_bytes + plan.max_bytes <= budget.bytes


@given(budget=budgets, fetch_batch=st.integers(1, 1000), oversized=st.booleans())
def test_nothing_in_flight_always_allows_a_fetch(
    budget: Budget, fetch_batch: int, oversized: bool
) -> None:
    # Whatever the sizes seen so far: no message size or setting starves a lane.
    plan = plan_fetch(budget, 0, 0, fetch_batch, oversized, lane_waiting=False)
    assert plan.batch >= 1


@given(budget=budgets, in_flight=st.integers(1, 6000), in_flight_bytes=st.integers(0, 1 << 31))
def test_an_oversized_lane_waits_for_the_budget_to_drain(
    budget: Budget, in_flight: int, in_flight_bytes: int
) -> None:
    assert plan_fetch(budget, in_flight, in_flight_bytes, 64, True, False).batch == 0
    # ...and the other lanes hold back meanwhile, so that the drain ends.
    assert plan_fetch(budget, in_flight, in_flight_bytes, 64, False, True).batch == 0


# -- the one-of types: what cannot be built


def test_a_nak_needs_a_delay_and_an_exhaust_a_reason() -> None:
    with pytest.raises(TypeError):
        Nak()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Exhaust()  # type: ignore[call-arg]
    decoder = msgspec.json.Decoder(Ack | Nak | Exhaust)
    assert decoder.decode(b'{"type": "nak", "delay": 2.5}') == Nak(2.5)
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"type": "nak"}')
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(b'{"type": "exhaust"}')


def test_a_success_carries_no_failure_and_a_failure_always_has_one() -> None:
    ok = Ok(1, STORED)
    assert ok.ok and ok.reason is None and ok.kind is None and ok.error == ""
    with pytest.raises(TypeError):
        Ok(1, STORED, reason=Reason.TIMEOUT)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Failed(1, STORED)  # type: ignore[call-arg]
    decoder = msgspec.msgpack.Decoder(list[Outcome])
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode([["failed", 1, ["acme", "s", None, None, None]]]))
    both: list[Outcome] = [
        ok,
        failure(2, STORED, FailureKind.PERMANENT, Reason.VALIDATION, "x" * 5000),
    ]
    again = decoder.decode(msgspec.msgpack.encode(both))
    assert again == both and len(both[1].error) == 2000


# -- re-decisions, pure and total

decisions = st.one_of(
    st.just(ACK),
    st.builds(Nak, st.floats(min_value=0.0, max_value=1e6)),
    st.builds(Exhaust, st.sampled_from(list(Reason))),
)
faults = st.builds(fault, st.sampled_from(list(FailureKind)), st.sampled_from(list(Reason)))
deliveries = st.integers(min_value=1, max_value=10**6)


@given(decision=decisions, failed=faults, n=deliveries, policy=policies, draw=draws)
def test_a_failed_exhausted_row_write_is_never_dropped_nor_exhausted(
    decision: Ack | Nak | Exhaust, failed: Failed, n: int, policy: RetryPolicy, draw: float
) -> None:
    again = after_failed_write(decision, failed, n, policy, draw)
    if isinstance(decision, Exhaust):
        # Its row was not written: back to the stream, whatever the failure,
        # and its first error kept for the row that will be written later.
        assert again.decision == Nak(backoff(n, policy, draw))
        assert again.save_failed and again.reason is Reason.STORE_UNAVAILABLE
        assert not again.error_is_write
    else:
        # A rows write that failed is the message's own failure, decided as such.
        assert again.decision == decide(failed, n, policy, draw)
        assert not again.save_failed and again.reason is failed.reason
        assert again.error_is_write == (failed.reason is not Reason.STORE_UNAVAILABLE)
    assert not isinstance(again.decision, Ack)


@given(failed=faults, n=deliveries, policy=policies, draw=draws)
def test_a_rows_write_refused_while_the_store_is_down_is_never_exhausted(
    failed: Failed, n: int, policy: RetryPolicy, draw: float
) -> None:
    down = fault(FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE)
    for decision in (ACK, Exhaust(failed.reason)):
        again = after_failed_write(decision, down, n, policy, draw)
        assert isinstance(again.decision, Nak) and again.decision.delay > 0


@given(n=deliveries, policy=policies)
def test_failed_publish_and_failed_settle_nak_with_the_undrawn_backoff(
    n: int, policy: RetryPolicy
) -> None:
    for nak in (after_failed_publish(n, policy), after_failed_settle(n, policy)):
        assert nak == Nak(backoff(n, policy, 0.0))
        assert 0 < nak.delay <= policy.max_delay
        # The undrawn delay is the longest jitter allows: never sooner than a drawn one.
        assert nak.delay >= backoff(n, policy, 0.999)


@given(
    waited=st.floats(min_value=0.0, max_value=1e6),
    ack_wait=st.floats(min_value=1e-3, max_value=1e5),
)
def test_local_expiry_and_progress_acks(waited: float, ack_wait: float) -> None:
    expired = expired_locally(waited, ack_wait)
    assert expired == (waited > ack_wait)
    # A message is kept alive (in-progress) before it could ever expire.
    if expired:
        assert needs_progress(waited, ack_wait)
    assert not needs_progress(ack_wait / 2, ack_wait)


@given(
    st.integers(min_value=1, max_value=10_000),
    st.sampled_from([*PERMANENT_REASONS, Reason.RETRIES_EXHAUSTED]),
    st.integers(min_value=1, max_value=50),
)
def test_a_dead_letter_is_given_up_after_its_attempts_and_never_before(
    n: int, reason: Reason, budget: int
) -> None:
    """Deliveries since the event was first exhausted are its dead-letter attempts.

    A permanent failure is exhausted on its first delivery, a spent budget on
    the budget's last; once DEAD_LETTER_ATTEMPTS of them failed to publish,
    every later delivery stores the event directly (never a loop)."""
    policy = msgspec.structs.replace(POLICY, max_retries=budget)
    first = budget if reason is Reason.RETRIES_EXHAUSTED else 1
    given_up = dead_letter_given_up(n, reason, policy)
    assert given_up == (n >= first + DEAD_LETTER_ATTEMPTS)
    if given_up:
        assert dead_letter_given_up(n + 1, reason, policy)


def test_a_first_exhaustion_always_tries_the_dlq() -> None:
    assert not dead_letter_given_up(1, Reason.VALIDATION, POLICY)
    assert not dead_letter_given_up(POLICY.max_retries, Reason.RETRIES_EXHAUSTED, POLICY)
    assert DEAD_LETTER_ATTEMPTS >= 1
