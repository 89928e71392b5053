"""The in-flight ledger, without servers: admission by count and by bytes,
batches, expiry, release, the oversized message, and the gauges."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, stateful
from hypothesis import strategies as st

from dlqproc.ledger import Gauges, Ledger, Taken
from dlqproc.policy import Budget, FetchPlan


def never(_: str) -> bool:
    return False


def test_admission_by_count_stops_at_the_budget_and_resumes_on_release() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=3, bytes=1_000_000))
    assert ledger.plan("dlq", fetch_batch=10) == FetchPlan(3, 1_000_000)
    tokens = [ledger.admit(f"m{i}", 10) for i in range(3)]
    assert ledger.plan("dlq", fetch_batch=10).batch == 0
    assert ledger.plan("realtime", fetch_batch=10).batch == 0  # the budget is shared
    ledger.release(tokens[1])
    assert ledger.plan("dlq", fetch_batch=10) == FetchPlan(1, 1_000_000 - 20)
    assert ledger.plan("dlq", fetch_batch=10).batch <= 10


def test_admission_by_bytes_asks_only_for_the_room_left() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=100, bytes=1000))
    first = ledger.admit("a", 600)
    assert ledger.plan("dlq", 50) == FetchPlan(50, 400)
    ledger.admit("b", 400)
    assert ledger.plan("dlq", 50).batch == 0  # no bytes left, whatever the count
    ledger.release(first)
    assert ledger.plan("dlq", 50) == FetchPlan(50, 600)
    assert ledger.gauges() == Gauges(queue_length=2, in_flight=1, in_flight_bytes=400)


def test_a_message_larger_than_the_budget_is_fetched_alone() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=10, bytes=100))
    held = ledger.admit("small", 10)
    assert ledger.oversized("dlq") is True  # news: logged once
    assert ledger.oversized("dlq") is False
    # It waits for the ledger to empty; the other lanes hold back meanwhile.
    assert ledger.plan("dlq", 5).batch == 0
    assert ledger.plan("realtime", 5).batch == 0
    ledger.release(held)
    assert ledger.plan("dlq", 5) == FetchPlan(1)  # alone, no byte limit
    assert ledger.fitted("dlq") is True
    ledger.admit("huge", 500)
    assert ledger.plan("realtime", 5).batch == 0  # over budget until it is released
    assert ledger.fitted("dlq") is False


def test_take_is_fifo_and_bounded_by_count_and_bytes() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=100, bytes=10_000))
    tokens = [ledger.admit(f"m{i}", 100) for i in range(10)]
    taken = ledger.take(4, 10_000, now=1.0, expired=never)
    assert taken.tokens == tuple(tokens[:4]) and taken.expired == ()
    # The byte bound is reached by the message that crosses it: never an empty batch.
    taken = ledger.take(100, 150, now=2.0, expired=never)
    assert taken.tokens == tuple(tokens[4:6])
    assert ledger.gauges() == Gauges(queue_length=4, in_flight=10, in_flight_bytes=1000)
    entry = ledger.release(tokens[0])
    assert entry is not None and entry.dispatched == 1.0 and entry.item == "m0"
    assert ledger.release(tokens[0]) is None  # released once


def test_expired_messages_are_released_not_taken() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=100, bytes=10_000))
    for name in ("fresh1", "stale1", "fresh2", "stale2"):
        ledger.admit(name, 10)
    taken = ledger.take(10, 10_000, now=1.0, expired=lambda item: item.startswith("stale"))
    assert [ledger[t] for t in taken.tokens] == ["fresh1", "fresh2"]
    assert taken.expired == ("stale1", "stale2")
    assert ledger.gauges() == Gauges(queue_length=0, in_flight=2, in_flight_bytes=20)


def test_unqueue_hands_back_in_order_and_leaves_running_messages_held() -> None:
    ledger: Ledger[str] = Ledger(Budget(messages=100, bytes=10_000))
    tokens = [ledger.admit(f"m{i}", 1) for i in range(3)]
    running = ledger.take(1, 10, now=1.0, expired=never).tokens
    assert [ledger.unqueue(), ledger.unqueue(), ledger.unqueue()] == [*tokens[1:], None]
    assert ledger.tokens() == tokens and running == (tokens[0],)


@pytest.mark.parametrize("size", [1, 99, 100, 101])
def test_nothing_is_admitted_past_the_bytes_a_plan_allowed(size: int) -> None:
    ledger: Ledger[int] = Ledger(Budget(messages=1000, bytes=1000))
    while (plan := ledger.plan("dlq", 1000)).batch:
        fits = min(plan.batch, plan.max_bytes // size)
        if fits == 0:
            break  # JetStream would return nothing: the message is oversized
        for i in range(fits):
            ledger.admit(i, size)
    assert ledger.gauges().in_flight_bytes <= 1000


class LedgerMachine(stateful.RuleBasedStateMachine):
    """Any interleaving of fetches that obey the plan, batches and releases keeps
    the counts exact and the budget respected (one oversized message aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.budget = Budget(messages=8, bytes=500)
        self.ledger: Ledger[int] = Ledger(self.budget)
        self.sizes: dict[int, int] = {}
        self.queued: list[int] = []

    @stateful.rule(sizes=st.lists(st.integers(min_value=0, max_value=700), max_size=10))
    def fetch(self, sizes: list[int]) -> None:
        plan = self.ledger.plan("dlq", 5)
        if plan.batch == 0:
            return
        got, room = [], plan.max_bytes or None
        for size in sizes[: plan.batch]:
            if room is not None and size > room:
                break  # JetStream stops at the byte room
            got.append(size)
            if room is not None:
                room -= size
        if not got and sizes and room is not None:
            self.ledger.oversized("dlq")
            return
        self.ledger.fitted("dlq")
        for size in got:
            token = self.ledger.admit(size, size)
            self.sizes[token] = size
            self.queued.append(token)

    @stateful.rule(count=st.integers(min_value=1, max_value=4))
    def take(self, count: int) -> None:
        taken = self.ledger.take(count, 300, now=1.0, expired=never)
        assert list(taken.tokens) == self.queued[: len(taken.tokens)]
        del self.queued[: len(taken.tokens)]

    @stateful.rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        # Settled: only what went to a worker (the queue is handed back by unqueue).
        running = sorted(set(self.sizes) - set(self.queued))
        if running:
            token = data.draw(st.sampled_from(running))
            entry = self.ledger.release(token)
            assert entry is not None and entry.size == self.sizes.pop(token)

    @stateful.rule()
    def hand_back(self) -> None:
        token = self.ledger.unqueue()
        assert token == (self.queued.pop(0) if self.queued else None)
        if token is not None:
            assert self.ledger.release(token) is not None
            del self.sizes[token]

    @stateful.invariant()
    def counts_are_exact(self) -> None:
        g = self.ledger.gauges()
        assert g.in_flight == len(self.sizes) == len(self.ledger)
        assert g.in_flight_bytes == sum(self.sizes.values())
        over = [s for s in self.sizes.values() if s > self.budget.bytes]
        if over:  # an oversized message is only ever admitted alone
            assert len(self.sizes) == 1
        else:
            assert g.in_flight <= self.budget.messages
            assert g.in_flight_bytes <= self.budget.bytes


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


@given(st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=40))
def test_take_never_returns_an_empty_batch_while_something_is_queued(sizes: list[int]) -> None:
    ledger: Ledger[int] = Ledger(Budget(messages=100, bytes=10_000))
    for size in sizes:
        ledger.admit(size, size)
    while ledger.queued:
        taken = ledger.take(3, 40, now=1.0, expired=never)
        assert 1 <= len(taken.tokens) <= 3
        assert sum(ledger[t] for t in taken.tokens[:-1]) < 40


@given(
    st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=60),
    st.integers(min_value=1, max_value=1000),
    st.randoms(use_true_random=False),
)
def test_working_counts_the_batches_out_and_returns_to_zero(
    sizes: list[int], room: int, rnd: random.Random
) -> None:
    """While `working` is below a cap, a batch taken with the room left keeps it
    within the cap plus one message: what the dispatcher relies on."""
    ledger: Ledger[int] = Ledger(Budget(messages=1000, bytes=1 << 30))
    for i, size in enumerate(sizes):
        ledger.admit(i, size)
    out: list[Taken[int]] = []
    while ledger.queued or out:
        if ledger.queued and ledger.working < room and (not out or rnd.random() < 0.6):
            taken = ledger.take(32, room - ledger.working, 0.0, lambda _: False)
            assert taken.size == sum(sizes[ledger[t]] for t in taken.tokens)
            out.append(taken)
            assert ledger.working <= room + max(sizes)
        else:
            ledger.returned(out.pop(rnd.randrange(len(out))))
        assert ledger.working == sum(t.size for t in out)
    assert ledger.working == 0
