"""The lanes: one type per kind of consumer, owning what its messages need.

A lane knows how a message of its consumer becomes a delivery for the
workers, what must be committed before the message may be settled, and how
it is settled. The DLQ lane stores an exhausted message in exhausted_events
and TERMs it; an events lane (realtime, historical) dead-letters it to the DLQ
stream and ACKs only once JetStream acknowledged that publish. Both ACK a
success only after its rows committed, and NAK with a delay otherwise. What
each lane reports is its observer's (dlqproc.observe); the supervisor and the
committer run any lane the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from dlqproc import envelope
from dlqproc.broker import Broker, Inbound, PublishFailed, oversized
from dlqproc.envelope import tenant_or_invalid
from dlqproc.metrics import Metrics
from dlqproc.model import Delivery, Lane, Meta, Ok, Reason
from dlqproc.observe import DlqObserver, EventObserver, Observer
from dlqproc.policy import Ack, Exhaust, Nak, after_failed_publish, dead_letter_given_up
from dlqproc.settle import DIRECT_GIVEN_UP, DIRECT_TOO_BIG, Did, LaneRuntime, Settled, Verdict
from dlqproc.store import ExhaustedRow, Write

# The event_type label of a subject outside the lane's stream bases: the events
# streams are the producers' and may carry other subjects, which must not each
# become a series. A base never starts with "_".
OTHER_EVENT_TYPE = "_other"


class Held(msgspec.Struct, frozen=True):
    """A message from fetch until it is settled, and the lane it belongs to."""

    msg: Inbound
    lane: FlowLane
    # Metrics labels from the subject, until the worker has read the message
    # (then Verdict.company). Label values come from untrusted subjects: the
    # tenant is bounded by tenant_or_invalid, the event type by the lane's bases.
    company: str
    event_type: str


class FlowLane:
    """What every lane does alike; the kinds differ in exhausting and settling."""

    def __init__(self, spec: LaneRuntime, broker: Broker, observe: Observer) -> None:
        self.spec = spec
        self.name = spec.lane.value
        self.broker = broker
        self.observe = observe
        # The bases of the lane's stream subjects ("<base>.*", events_stream's),
        # looked up per message without building a pattern for it.
        self._bases = frozenset(s[:-2] for s in spec.stream.subjects if s.endswith(".*"))

    def hold(self, msg: Inbound) -> Held:
        event_type, _, tenant = msg.subject.rpartition(".")
        if event_type not in self._bases:
            event_type = OTHER_EVENT_TYPE
        return Held(msg, self, tenant_or_invalid(tenant), event_type)

    def delivery(self, token: int, held: Held, received_at: str) -> Delivery:
        msg = held.msg
        meta = Meta(
            msg.stream, msg.consumer, msg.stream_seq, msg.consumer_seq, msg.msg_id, received_at
        )
        return Delivery(token, msg.subject, msg.data, msg.num_delivered, self.spec.lane, meta)

    def write(self, held: Held, v: Verdict) -> tuple[Verdict, Write | None]:
        """What must be committed before the message may be settled.

        Returns the verdict again, with what planning the write found out
        (a main lane's DLQ envelope), and the write, or None for nothing.
        """
        match v.decision:
            case Ack():
                rows = v.out.rows if isinstance(v.out, Ok) else ()
                return v, (Write(tenant=v.company, rows=rows) if rows else None)
            case Nak():
                return v, None
            case Exhaust():
                return self._exhaust(held, v)

    def _exhaust(self, held: Held, v: Verdict) -> tuple[Verdict, Write | None]:
        return v, exhausted_write(held, v)

    def publishes(self, v: Verdict) -> bool:
        """Whether settling waits on JetStream (a dead-letter publish)."""
        return False

    async def settle(self, held: Held, v: Verdict) -> Settled:
        """Carry the verdict out; what was done (or failed) is in the result."""
        done = self._intent(held, v)
        try:
            return await self._carry_out(done)
        except Exception as exc:
            # JetStream redelivers an unsettled message after its ack wait.
            return msgspec.structs.replace(done, raised=str(exc))

    def _intent(self, held: Held, v: Verdict) -> Settled:
        match v.decision:
            case Ack():
                return Settled(held, v, Did.ACKED)
            case Nak(delay=delay):
                return Settled(held, v, Did.NAKED, delay=delay)
            case Exhaust():
                return Settled(held, v, Did.TERMED)

    async def _carry_out(self, s: Settled) -> Settled:
        msg = s.held.msg
        match s.did:
            case Did.ACKED:
                await msg.ack()
            case Did.NAKED:
                await msg.nak(s.delay)
            case _:
                await msg.term()
        return s


class DlqLane(FlowLane):
    """The DLQ consumer: an exhausted message is stored, then TERMed."""


class EventLane(FlowLane):
    """A main consumer: an exhausted event is dead-lettered, then ACKed."""

    def __init__(
        self, spec: LaneRuntime, broker: Broker, observe: Observer, dlq_subject: str
    ) -> None:
        super().__init__(spec, broker, observe)
        self.dlq_subject = dlq_subject  # e.g. "v1.dlq": the tenant is appended

    def _exhaust(self, held: Held, v: Verdict) -> tuple[Verdict, Write | None]:
        assert isinstance(v.decision, Exhaust)
        if v.stored_directly:  # planned already (a write being retried)
            return v, exhausted_write(held, v)
        msg = held.msg
        body = self._envelope(held, v)
        # Headers count too: a publish NATS refuses would come back for ever.
        if oversized(body, _dead_letter_headers(msg), self.broker.max_payload) is not None:
            why = DIRECT_TOO_BIG
        elif dead_letter_given_up(msg.num_delivered, v.decision.reason, self.spec.policy):
            why = DIRECT_GIVEN_UP
        else:
            return msgspec.structs.replace(v, envelope=body), None
        # Stored in exhausted_events directly, the reason in its last_error.
        v = msgspec.structs.replace(
            v, envelope=body, stored_directly=why, error=f"{v.error} [stored directly: {why}]"
        )
        return v, exhausted_write(held, v)

    def publishes(self, v: Verdict) -> bool:
        return isinstance(v.decision, Exhaust) and not v.stored_directly

    def _intent(self, held: Held, v: Verdict) -> Settled:
        if isinstance(v.decision, Exhaust):
            did = Did.STORED_DIRECTLY if v.stored_directly else Did.DEAD_LETTERED
            return Settled(held, v, did)
        return super()._intent(held, v)

    async def _carry_out(self, s: Settled) -> Settled:
        msg = s.held.msg
        if s.did is Did.STORED_DIRECTLY:
            # Its exhausted row is committed, so ACK.
            await msg.ack()
            return s
        if s.did is not Did.DEAD_LETTERED:
            return await super()._carry_out(s)
        try:
            await self._dead_letter(s.held, s.verdict)
        except PublishFailed as exc:
            nak = after_failed_publish(msg.num_delivered, self.spec.policy)
            s = msgspec.structs.replace(
                s, did=Did.PUBLISH_FAILED, delay=nak.delay, publish_error=str(exc)
            )
            try:
                await msg.nak(nak.delay)
            except Exception as again:
                return msgspec.structs.replace(s, raised=str(again))
            return s
        await msg.ack()
        return s

    def _envelope(self, held: Held, v: Verdict) -> bytes:
        msg = held.msg
        assert isinstance(v.decision, Exhaust)
        return envelope.build(
            source_subject=msg.subject,
            company=msg.subject.rpartition(".")[2],
            original_json=v.out.stored.original_json,
            raw=msg.data,
            error=v.error,
            fatal=v.decision.reason is not Reason.RETRIES_EXHAUSTED,
            retry_count=msg.num_delivered,
            max_retry=self.spec.max_deliver,
            ts=datetime.now(UTC).isoformat(),
        )

    async def _dead_letter(self, held: Held, v: Verdict) -> None:
        msg = held.msg
        # company_id is a valid tenant or INVALID_TENANT_ID, both valid subject
        # tokens; the invalid token itself may not even be one.
        token = envelope.tenant_or_invalid(v.out.stored.company_id)
        body = v.envelope or self._envelope(held, v)
        await self.broker.publish(f"{self.dlq_subject}.{token}", body, _dead_letter_headers(msg))


def _dead_letter_headers(msg: Inbound) -> dict[str, str]:
    return {
        # Deduplicated by JetStream: a retried publish never makes two DLQ messages.
        "Nats-Msg-Id": f"dlq-{msg.stream}-{msg.stream_seq}",
        "Original-Nats-Msg-Id": msg.msg_id or f"msg-{msg.stream_seq}",
    }


def exhausted_write(held: Held, v: Verdict) -> Write:
    """The exhausted_events row of a message, keyed on the message itself."""
    msg, stored = held.msg, v.out.stored
    assert isinstance(v.decision, Exhaust)
    return Write(
        exhausted=ExhaustedRow(
            company_id=stored.company_id,
            source_subject=stored.source_subject,
            last_error=v.error,
            retry_count=msg.num_delivered,
            reason=v.decision.reason.value,
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


def build(spec: LaneRuntime, broker: Broker, metrics: Metrics, dlq_subject: str) -> FlowLane:
    """The lane object of a consumer: the one place that asks which kind it is."""
    if spec.lane is Lane.DLQ:
        return DlqLane(spec, broker, DlqObserver(metrics))
    return EventLane(spec, broker, EventObserver(metrics, spec.lane.value), dlq_subject)
