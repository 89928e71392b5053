"""Every decision of the flow, as pure functions the supervisor only carries out.

`decide` maps an outcome and a delivery count to ACK, NAK(delay) or EXHAUST;
the others decide what the flow does when a later step fails: a write, the
dead-letter publish, a commit that raised, a message that waited too long in
the local queue. The attempt number is JetStream's num_delivered and nothing
else, so a restart, a crash or a second replica can never reset or inflate it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol, TypeAlias

import msgspec

from dlqproc.model import FailureKind, Ok, Reason

if TYPE_CHECKING:
    from dlqproc.config import Config, MainConsumerConfig


class RetryPolicy(msgspec.Struct, frozen=True):
    base_delay: float  # seconds, first retry
    max_delay: float  # seconds, cap
    jitter: float  # fraction of each delay drawn at random, in [0, 1)
    max_retries: int  # deliveries after which a transient failure is exhausted


def dlq_policy(cfg: Config) -> RetryPolicy:
    return RetryPolicy(
        base_delay=cfg.nats.dlq_base_delay_minutes * 60,
        max_delay=cfg.nats.dlq_max_delay_minutes * 60,
        jitter=cfg.nats.retry_jitter,
        max_retries=cfg.nats.dlq_max_retries,
    )


def event_policy(main: MainConsumerConfig, jitter: float) -> RetryPolicy:
    # Dead-letter after max_deliver deliveries: the last one is the budget.
    return RetryPolicy(
        base_delay=main.nak_base_delay,
        max_delay=main.nak_max_delay,
        jitter=jitter,
        max_retries=main.max_deliver,
    )


class Ack(msgspec.Struct, frozen=True, tag="ack"):
    """Commit the rows, then ACK."""


class Nak(msgspec.Struct, frozen=True, tag="nak"):
    """NAK with a delay; nothing is written."""

    delay: float  # seconds


class Exhaust(msgspec.Struct, frozen=True, tag="exhaust"):
    """Insert into exhausted_events, then TERM (main lanes: dead-letter, then ACK)."""

    reason: Reason  # why it is stored


Decision: TypeAlias = Ack | Nak | Exhaust

ACK = Ack()


class Fault(Protocol):
    """A classified failure: a failed outcome, or a write the store refused."""

    @property
    def kind(self) -> FailureKind: ...

    @property
    def reason(self) -> Reason: ...


class _Fault(msgspec.Struct, frozen=True):
    kind: FailureKind
    reason: Reason


# What a write whose exhausted row could not be stored is retried as.
_STORE_UNAVAILABLE = _Fault(FailureKind.TRANSIENT, Reason.STORE_UNAVAILABLE)


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


def decide(outcome: Ok | Fault, num_delivered: int, policy: RetryPolicy, draw: float) -> Decision:
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
    if isinstance(outcome, Ok):
        return ACK
    if outcome.reason is Reason.STORE_UNAVAILABLE:
        return Nak(backoff(num_delivered, policy, draw))
    if outcome.kind is FailureKind.PERMANENT:
        return Exhaust(outcome.reason)
    if num_delivered >= policy.max_retries:
        return Exhaust(Reason.RETRIES_EXHAUSTED)
    return Nak(backoff(num_delivered, policy, draw))


class Redecision(msgspec.Struct, frozen=True):
    """A message's new decision after the write its first one needed failed."""

    decision: Decision
    reason: Reason  # the failure the message is now reported with
    # The write's failure is the message's error from now on (its data was
    # refused); an outage or an unwritten exhausted row keeps the first error.
    error_is_write: bool
    # The exhausted row itself was not written ("Failed to save exhausted event").
    save_failed: bool


def after_failed_write(
    decision: Decision,
    failure: Fault,
    num_delivered: int,
    policy: RetryPolicy,
    draw: float,
) -> Redecision:
    """Decide again for a message whose write failed (`failure`, from the store).

    Rows refused for this message's data count against its retry budget like
    any transient failure and may exhaust it. But a message whose exhausted
    row could not be written was already at the end of its budget: it is
    NAKed as if the store were down, so it stays in the stream until its row
    can be stored, never dropped and never exhausted without a row.
    """
    if isinstance(decision, Exhaust):
        again = decide(_STORE_UNAVAILABLE, num_delivered, policy, draw)
        return Redecision(again, Reason.STORE_UNAVAILABLE, error_is_write=False, save_failed=True)
    return Redecision(
        decide(failure, num_delivered, policy, draw),
        failure.reason,
        error_is_write=failure.reason is not Reason.STORE_UNAVAILABLE,
        save_failed=False,
    )


def after_failed_publish(num_delivered: int, policy: RetryPolicy) -> Nak:
    """A main-lane event whose dead-letter publish JetStream did not acknowledge.

    NAKed with the undrawn backoff: the event stays in its stream and its next
    delivery dead-letters it again (JetStream deduplicates a repeated publish).
    """
    return Nak(backoff(num_delivered, policy, 0.0))


# Dead-letter publishes a main lane tries before it stores the event in
# exhausted_events itself. JetStream may refuse an envelope for good (an
# operator's max message size, a sealed or full stream), and a DLQ stream that
# stayed down through that many backoffs is no better home than PostgreSQL.
DEAD_LETTER_ATTEMPTS: Final = 3


def dead_letter_given_up(num_delivered: int, reason: Reason, policy: RetryPolicy) -> bool:
    """Whether earlier deliveries tried DEAD_LETTER_ATTEMPTS times to dead-letter this event.

    A dead-lettered event is ACKed, so one delivered again after it was first
    exhausted is one whose publish failed (or whose ACK was lost). Handlers
    are pure: a permanent failure was exhausted from its first delivery, a
    spent retry budget from the budget's last.
    """
    first = policy.max_retries if reason is Reason.RETRIES_EXHAUSTED else 1
    return num_delivered - first >= DEAD_LETTER_ATTEMPTS


# An unexpected commit error (a bug, not an outage: the store classifies
# those) is a transient failure of each message it touched, retried one by one.
UNEXPECTED_COMMIT_ERROR = _Fault(FailureKind.TRANSIENT, Reason.HANDLER_ERROR)


def unexpected_error_text(exc: BaseException) -> str:
    """The error a message fails with when the flow itself raised around it."""
    return f"internal error: {type(exc).__name__}: {exc}"


def after_failed_settle(num_delivered: int, policy: RetryPolicy) -> Nak:
    """A message that could be neither committed nor settled even as a failure.

    Back to JetStream, which counts the delivery: the fallback that cannot fail.
    """
    return Nak(backoff(num_delivered, policy, 0.0))


def expired_locally(waited: float, ack_wait: float) -> bool:
    """A message that sat `waited` seconds since JetStream last heard of it.

    Past the ack wait JetStream has given it to someone else (or will): this
    attempt must not process it, only forget it.
    """
    return waited > ack_wait


def needs_progress(waited: float, ack_wait: float) -> bool:
    """Send an in-progress ack: past half the ack wait, before any redelivery."""
    return waited > ack_wait / 2


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
