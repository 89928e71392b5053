"""The retry policy: one pure function from an outcome and a delivery count to an action.

The attempt number is JetStream's num_delivered and nothing else, so a restart,
a crash or a second replica can never reset or inflate it.
"""

from __future__ import annotations

import enum

import msgspec

from dlqproc.model import FailureKind, Reason


class Action(enum.Enum):
    ACK = "ack"  # commit the rows, then ACK
    NAK = "nak"  # NAK with a delay; nothing is written
    EXHAUST = "exhaust"  # insert into exhausted_events, then TERM (main lanes: dead-letter)


class RetryPolicy(msgspec.Struct, frozen=True):
    base_delay: float  # seconds, first retry
    max_delay: float  # seconds, cap
    jitter: float  # fraction of each delay drawn at random, in [0, 1)
    max_retries: int  # deliveries after which a transient failure is exhausted


class Decision(msgspec.Struct, frozen=True):
    action: Action
    delay: float = 0.0  # seconds, for NAK
    reason: Reason | None = None  # for EXHAUST: why it is stored


def backoff(attempt: int, policy: RetryPolicy, draw: float) -> float:
    """Delay before the next delivery after `attempt` deliveries.

    base * 2^(attempt-1), capped at max_delay, then scaled into
    [d * (1 - jitter), d] by `draw` in [0, 1): jitter spreads a burst of
    failures without ever exceeding the cap.
    """
    exponent = max(attempt, 1) - 1
    # 2**exponent overflows float for absurd attempts; the cap is hit long before.
    raw = policy.base_delay * (2.0 ** min(exponent, 64))
    delay = min(raw, policy.max_delay)
    return delay * (1.0 - policy.jitter * draw)


def decide(
    ok: bool,
    kind: FailureKind | None,
    reason: Reason | None,
    num_delivered: int,
    policy: RetryPolicy,
    draw: float,
) -> Decision:
    """ACK, NAK(delay) or EXHAUST for one outcome at delivery `num_delivered`.

    - success: ACK;
    - permanent failure: EXHAUST at once (retrying cannot help);
    - transient failure with deliveries left: NAK with backoff;
    - transient failure at or past the budget: EXHAUST, reason retries_exhausted;
    - the store itself unavailable (reason store_unavailable, also when the
      exhausted row could not be written): NAK, never EXHAUST, since the
      message is not at fault. Every consumer dlqproc reads redelivers without
      limit, so that NAK can never make JetStream abandon the message.
    """
    if ok:
        return Decision(Action.ACK)
    if reason is Reason.STORE_UNAVAILABLE:
        return Decision(Action.NAK, delay=backoff(num_delivered, policy, draw))
    if kind is FailureKind.PERMANENT:
        return Decision(Action.EXHAUST, reason=reason)
    if num_delivered >= policy.max_retries:
        return Decision(Action.EXHAUST, reason=Reason.RETRIES_EXHAUSTED)
    return Decision(Action.NAK, delay=backoff(num_delivered, policy, draw))


class FetchPlan(msgspec.Struct, frozen=True):
    """The next pull request of a lane: `batch` 0 means wait for room."""

    batch: int
    max_bytes: int = 0  # 0: no byte limit


class Budget(msgspec.Struct, frozen=True):
    """The in-flight limits (nats.dlqMaxInFlight, nats.dlqMaxInFlightBytes)."""

    messages: int
    bytes: int


def plan_fetch(
    budget: Budget,
    in_flight: int,
    in_flight_bytes: int,
    fetch_batch: int,
    oversized: bool,
    lane_waiting: bool,
) -> FetchPlan:
    """How much one lane may ask JetStream for now.

    in_flight, in_flight_bytes: messages held locally. oversized: this lane's last
    request found its next message larger than the room it asked for.
    lane_waiting: some other lane is waiting to be admitted that way.

    The byte limit goes into the request itself, so JetStream never delivers
    past the room, whatever the message sizes. A message larger than the
    whole budget is admitted alone: its lane waits until nothing is in flight
    (other lanes hold back meanwhile, or they could keep the budget busy for
    ever), then asks for one message without a byte limit. So some request is
    always possible once nothing is in flight: fetching cannot starve.
    """
    if oversized:
        return FetchPlan(1) if in_flight == 0 else FetchPlan(0)
    free = budget.messages - in_flight
    room = budget.bytes - in_flight_bytes
    if lane_waiting or free <= 0 or room <= 0:
        return FetchPlan(0)
    return FetchPlan(min(free, fetch_batch), room)
