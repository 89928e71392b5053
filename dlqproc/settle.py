"""What settling a message means: its verdict, and the record of what settling did.

A message's `Verdict` is decided once from its outcome and, when the write it
needs fails, replaced by a new one (never changed in place). Its lane (see
dlqproc.lanes) carries the verdict out and returns a `Settled`: what it did to
the message, which the lane's observer (dlqproc.observe) turns into counters
and log lines.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

import msgspec

from dlqproc.broker import Inbound, Puller, StreamSpec
from dlqproc.model import Failed, Lane, Outcome, Reason
from dlqproc.policy import Decision, Redecision, RetryPolicy

if TYPE_CHECKING:
    from dlqproc.lanes import Held

# Contract section 6: the error_type label of a failure.
ERROR_TYPE = {
    Reason.NOT_JSON: "unmarshal",
    Reason.BAD_ENVELOPE: "unmarshal",
    Reason.TOO_DEEP: "unmarshal",
    Reason.TOO_BIG: "validation",
    Reason.UNKNOWN_SUBJECT: "validation",
    Reason.INVALID_TENANT: "validation",
    Reason.TENANT_REFUSED: "validation",
    Reason.VALIDATION: "validation",
    Reason.NOT_FOUND: "not_found",
    Reason.DATABASE: "database",
    Reason.STORE_UNAVAILABLE: "database",
    # Counted in PostgreSQL's tenant registry and retried like a refused write.
    Reason.TENANT_LIMIT: "database",
    Reason.TIMEOUT: "timeout",
    Reason.WORKER_CRASHED: "panic",
    Reason.HANDLER_ERROR: "unknown",
    Reason.RETRIES_EXHAUSTED: "unknown",
}


class LaneRuntime(msgspec.Struct, frozen=True):
    """One consumer feeding the supervisor, and how its messages are settled."""

    lane: Lane
    puller: Puller
    policy: RetryPolicy
    fetch_batch: int
    ack_wait: float
    max_deliver: int  # reported as the envelope's max_retry when dead-lettering
    stream: StreamSpec  # recreated if it disappears
    owns_stream: bool  # dlqproc's own (the DLQ): reconciled, not just created


DIRECT_TOO_BIG: Final = "too big for a DLQ message"
DIRECT_GIVEN_UP: Final = "dead-letter publish failed on every attempt"


class Verdict(msgspec.Struct, frozen=True):
    """What will happen to one message; a failed write yields a new verdict."""

    out: Outcome
    decision: Decision
    error: str = ""  # the processing error (last_error, envelope error)
    reason: Reason | None = None  # the failure reported, None for a success
    db_error: str = ""  # why the write failed, when it did
    save_failed: bool = False  # the exhausted row could not be written
    inserted: bool = False  # an exhausted row was inserted by this attempt
    envelope: bytes | None = None  # a main lane's DLQ message, once built
    # Why a main-lane event goes to exhausted_events itself rather than to the
    # DLQ ("" when it is dead-lettered): DIRECT_TOO_BIG or DIRECT_GIVEN_UP.
    stored_directly: str = ""

    @classmethod
    def of(cls, out: Outcome, decision: Decision) -> Verdict:
        if isinstance(out, Failed):
            return cls(out, decision, error=out.error, reason=out.reason)
        return cls(out, decision)

    @property
    def company(self) -> str:
        """The tenant label, as the worker read it from the message."""
        return self.out.stored.company_id

    def redecided(self, again: Redecision, write_error: str) -> Verdict:
        return msgspec.structs.replace(
            self,
            decision=again.decision,
            reason=again.reason,
            error=write_error if again.error_is_write else self.error,
            db_error=write_error,
            save_failed=again.save_failed,
        )


class Did(enum.Enum):
    """What settling did (or tried to do, when `Settled.raised` says it failed)."""

    ACKED = "acked"
    NAKED = "naked"
    TERMED = "termed"  # the DLQ lane, after its exhausted row committed
    STORED_DIRECTLY = "stored_directly"  # a main-lane event not dead-lettered, stored: ACKed
    DEAD_LETTERED = "dead_lettered"  # published to the DLQ stream, then ACKed
    PUBLISH_FAILED = "publish_failed"  # the dead-letter publish failed: NAKed


class Settled(msgspec.Struct, frozen=True):
    """One message settled: the facts its lane's observer reports."""

    held: Held
    verdict: Verdict
    did: Did
    delay: float = 0.0  # of the NAK, when it NAKed
    publish_error: str = ""  # why the dead-letter publish failed
    raised: str = ""  # the ACK/NAK/TERM itself failed: JetStream redelivers it


def fields(msg: Inbound, company: str = "", source_subject: str = "") -> dict[str, object]:
    return {
        "source_subject": source_subject,
        "subject": msg.subject,
        "stream_seq": msg.stream_seq,
        "consumer_seq": msg.consumer_seq,
        "num_delivered": msg.num_delivered,
        "company_id": company or msg.subject.rpartition(".")[2],
    }
