"""How each lane turns a decision into writes and a settle call, with its logs and metrics.

The DLQ lane stores exhausted messages and TERMs them; the main lanes (realtime,
historical) dead-letter them to the DLQ stream and ACK only once JetStream has
acknowledged that publish. Both ACK a success only after its rows committed,
and NAK with a delay otherwise. The supervisor owns the flow; this module owns
what "settling" means per lane.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import msgspec

from dlqproc import envelope
from dlqproc.broker import Broker, Inbound, PublishFailed, Puller, StreamSpec
from dlqproc.metrics import Metrics
from dlqproc.model import Lane, Outcome, Reason
from dlqproc.policy import Action, Decision, RetryPolicy, backoff
from dlqproc.store import ExhaustedRow, Write

# Operators filter on this logger name (operator guide, section 1.2).
dlq_log = logging.getLogger("dlq_worker")
consumer_log = logging.getLogger("dlqproc.consumer")

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


class Held:
    """A message from fetch until it is settled."""

    __slots__ = ("company", "dispatched", "event_type", "lane", "msg")

    def __init__(self, msg: Inbound, lane: LaneRuntime, company: str, event_type: str) -> None:
        self.msg = msg
        self.lane = lane
        self.company = company  # metrics label; refined once the worker read the message
        self.event_type = event_type
        self.dispatched = 0.0


class Verdict:
    """What will happen to one message, revised when its write fails."""

    __slots__ = (
        "db_error",
        "decision",
        "envelope",
        "error",
        "inserted",
        "out",
        "reason",
        "save_failed",
        "stored_directly",
    )

    def __init__(self, out: Outcome, decision: Decision) -> None:
        self.out = out
        self.decision = decision
        self.error = out.error  # the processing error (last_error, envelope error)
        self.reason = out.reason
        self.db_error = ""  # why the write failed, when it did
        self.save_failed = False  # the exhausted row could not be written
        self.inserted = False  # an exhausted row was inserted by this attempt
        self.envelope: bytes | None = None  # a main lane's DLQ message, once built
        # A main-lane event too big for a DLQ message goes to exhausted_events itself.
        self.stored_directly = False


def fields(msg: Inbound, company: str = "", source_subject: str = "") -> dict[str, object]:
    return {
        "source_subject": source_subject,
        "subject": msg.subject,
        "stream_seq": msg.stream_seq,
        "consumer_seq": msg.consumer_seq,
        "num_delivered": msg.num_delivered,
        "company_id": company or msg.subject.rpartition(".")[2],
    }


class Settler:
    def __init__(self, broker: Broker, metrics: Metrics, dlq_subject: str) -> None:
        self.broker = broker
        self.metrics = metrics
        self.dlq_subject = dlq_subject

    def write_for(self, held: Held, v: Verdict) -> Write | None:
        """What must be committed before this message may be settled."""
        if v.decision.action is Action.ACK:
            return Write(tenant=v.out.stored.company_id, rows=v.out.rows) if v.out.rows else None
        if v.decision.action is not Action.EXHAUST:
            return None
        if held.lane.lane is not Lane.DLQ:
            v.envelope = self._envelope(held, v)
            # Room for the headers too: a publish NATS refuses would loop forever.
            if len(v.envelope) + 1024 <= self.broker.max_payload:
                return None
            v.stored_directly = True
        msg, stored = held.msg, v.out.stored
        return Write(
            exhausted=ExhaustedRow(
                company_id=stored.company_id,
                source_subject=stored.source_subject,
                last_error=v.error,
                retry_count=msg.num_delivered,
                reason=v.decision.reason.value if v.decision.reason else "unknown",
                event_timestamp=stored.event_timestamp,
                # A stored-directly event has no envelope: dlq_payload describes it.
                envelope_json=stored.envelope_json,
                original_json=stored.original_json,
                raw=msg.data,
                # The event's own bytes when they were not JSON.
                original_raw=stored.original_raw,
                dlq_stream=msg.stream,
                dlq_sequence=msg.stream_seq,
                dlq_subject=msg.subject,
            )
        )

    @staticmethod
    def publishes(held: Held, v: Verdict) -> bool:
        """Whether settling waits on JetStream: a main-lane event being dead-lettered."""
        return (
            held.lane.lane is not Lane.DLQ
            and v.decision.action not in (Action.ACK, Action.NAK)
            and not v.stored_directly
        )

    async def settle(self, held: Held, v: Verdict) -> None:
        try:
            if held.lane.lane is Lane.DLQ:
                await self._settle_dlq(held, v)
            else:
                await self._settle_event(held, v)
        except Exception as exc:
            # JetStream redelivers an unsettled message after its ack wait.
            self.metrics.acks_failure.labels(held.company).inc()
            dlq_log.error(
                "settling message failed; JetStream will redeliver it",
                extra={**fields(held.msg, held.company), "error": str(exc)},
            )

    # -- DLQ lane: ACK, NAK(delay), or TERM after the exhausted row committed

    async def _settle_dlq(self, held: Held, v: Verdict) -> None:
        msg, company, m = held.msg, held.company, self.metrics
        if held.dispatched:
            m.processing_duration.labels(company).observe(time.monotonic() - held.dispatched)
        action = v.decision.action
        if action is Action.ACK:
            # The common case: no log fields are built unless DEBUG is on.
            await msg.ack()
            m.acks_success.labels(company).inc()
            if dlq_log.isEnabledFor(logging.DEBUG):
                dlq_log.debug(
                    "Successfully processed event from DLQ",
                    extra=fields(msg, company, v.out.stored.source_subject),
                )
            return
        f = fields(msg, company, v.out.stored.source_subject)
        reason = v.reason.value if v.reason else ""
        if action is Action.NAK:
            if v.save_failed:
                dlq_log.error("Failed to save exhausted event...", extra={**f, "error": v.db_error})
            else:
                dlq_log.warning(
                    "Failed to process event from DLQ",
                    extra={**f, "error": v.db_error or v.error, "reason": reason},
                )
            dlq_log.info(
                "Retrying DLQ message with backoff",
                extra={**f, "delay_seconds": round(v.decision.delay, 3)},
            )
            await msg.nak(v.decision.delay)
            m.task_retries.labels(company).inc()
        else:
            dlq_log.warning(
                "Max retries exceeded, attempting to persist to exhausted store",
                extra={
                    **f,
                    "error": v.error,
                    "reason": reason,
                    "exhausted_reason": v.decision.reason.value if v.decision.reason else "",
                },
            )
            await msg.term()
            m.acks_failure.labels(company).inc()
            if v.inserted:
                m.tasks_dropped.labels(company).inc()

    # -- main lanes: ACK, NAK(delay), or publish to the DLQ and then ACK

    async def _settle_event(self, held: Held, v: Verdict) -> None:
        msg, m, lane = held.msg, self.metrics, held.lane
        labels = (held.event_type, held.company, lane.lane.value)
        error_type = ERROR_TYPE.get(v.reason, "unknown") if v.reason else "none"
        if not v.out.ok or v.decision.action is not Action.ACK:
            m.events_failed.labels(*labels, error_type).inc()
        action = v.decision.action
        if action is Action.ACK:
            await msg.ack()
            m.events_processed.labels(*labels).inc()
            m.event_actions.labels(*labels, "ack_success", "none").inc()
        elif action is Action.NAK:
            await msg.nak(v.decision.delay)
            kind = "panic_nak" if v.reason is Reason.WORKER_CRASHED else "nak_retry"
            m.event_actions.labels(*labels, kind, error_type).inc()
            consumer_log.info(
                "Event processing failed, retrying with backoff",
                extra={
                    **fields(msg, held.company),
                    "error": v.db_error or v.error,
                    "error_type": error_type,
                    "delay_seconds": round(v.decision.delay, 3),
                },
            )
        elif v.stored_directly:
            # Too big to dead-letter: its exhausted row is committed, so ACK.
            await msg.ack()
            m.event_actions.labels(*labels, "ack_success", error_type).inc()
            consumer_log.warning(
                "Event too big for the DLQ, stored in exhausted_events",
                extra={**fields(msg, held.company), "error": v.error, "size": len(msg.data)},
            )
        else:
            await self._dead_letter(held, v, labels, error_type)
        if held.dispatched:
            m.event_duration.labels(*labels).observe(time.monotonic() - held.dispatched)

    @staticmethod
    def _envelope(held: Held, v: Verdict) -> bytes:
        msg = held.msg
        return envelope.build(
            source_subject=msg.subject,
            company=msg.subject.rpartition(".")[2],
            original_json=v.out.stored.original_json,
            raw=msg.data,
            error=v.error,
            fatal=v.decision.reason is not Reason.RETRIES_EXHAUSTED,
            retry_count=msg.num_delivered,
            max_retry=held.lane.max_deliver,
            ts=datetime.now(UTC).isoformat(),
        )

    async def _dead_letter(
        self, held: Held, v: Verdict, labels: tuple[str, str, str], error_type: str
    ) -> None:
        msg, lane = held.msg, held.lane
        # company_id is a valid tenant or INVALID_TENANT_ID, both valid subject
        # tokens; the invalid token itself may not even be one.
        token = envelope.tenant_or_invalid(v.out.stored.company_id)
        body = v.envelope or self._envelope(held, v)
        headers = {
            # Deduplicated by JetStream: a retried publish never makes two DLQ messages.
            "Nats-Msg-Id": f"dlq-{msg.stream}-{msg.stream_seq}",
            "Original-Nats-Msg-Id": msg.msg_id or f"msg-{msg.stream_seq}",
        }
        f = {**fields(msg, held.company), "error": v.error, "error_type": error_type}
        try:
            await self.broker.publish(f"{self.dlq_subject}.{token}", body, headers)
        except PublishFailed as exc:
            delay = backoff(msg.num_delivered, lane.policy, 0.0)
            consumer_log.error(
                "Failed to publish event to DLQ, NAKing it",
                extra={**f, "publish_error": str(exc), "delay_seconds": delay},
            )
            await msg.nak(delay)
            self.metrics.event_actions.labels(*labels, "nak_dlq_publish_fail", "nats").inc()
            return
        await msg.ack()
        consumer_log.warning("Published event to DLQ", extra=f)
        self.metrics.event_actions.labels(*labels, "dlq_published_ack_success", error_type).inc()
