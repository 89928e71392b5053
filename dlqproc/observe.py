"""What each lane reports: counters and the operators' log lines, beside the flow.

Settling returns what it did (`settle.Settled`); a lane's observer turns that,
and the other steps of a message (admitted, sent to a worker, expired,
fetched), into metrics and log lines. The flow itself never touches a counter
or writes an operator's line, so what operators see is defined here, per lane,
with the metric names and messages dashboards and alerts rely on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from dlqproc.ledger import Gauges
from dlqproc.metrics import Metrics
from dlqproc.model import Outcome, Reason
from dlqproc.policy import Ack, Exhaust
from dlqproc.settle import ERROR_TYPE, Did, Settled, fields

if TYPE_CHECKING:
    from dlqproc.lanes import Held

# Operators filter on this logger name (operator guide, section 1.2).
dlq_log = logging.getLogger("dlq_worker")
consumer_log = logging.getLogger("dlqproc.consumer")


class Observer:
    """Reports common to every lane; the defaults report nothing."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def fetching(self) -> None:
        """A pull request is about to be sent."""

    def fetch_failed(self) -> None:
        """A pull request failed."""

    def admitted(self, held: Held) -> None:
        """The message entered the in-flight ledger."""

    def submitted(self, held: Held) -> None:
        """The message goes to a worker."""

    def received(self, held: Held, out: Outcome) -> None:
        """The worker's outcome is about to be decided and committed."""

    def expired(self, held: Held) -> None:
        """The message waited past its ack wait locally and is not processed."""

    def settled(self, s: Settled, dispatched: float) -> None:
        """Report a settled message; `dispatched`: monotonic time it went to a worker."""

    def _settle_failed(self, s: Settled) -> None:
        company = s.verdict.company
        self.metrics.acks_failure.labels(company).inc()
        dlq_log.error(
            "settling message failed; JetStream will redeliver it",
            extra={**fields(s.held.msg, company), "error": s.raised},
        )


class DlqObserver(Observer):
    def fetching(self) -> None:
        self.metrics.fetch_requests.inc()

    def fetch_failed(self) -> None:
        self.metrics.fetch_errors.inc()

    def submitted(self, held: Held) -> None:
        self.metrics.tasks_submitted.labels(held.company).inc()

    def received(self, held: Held, out: Outcome) -> None:
        if dlq_log.isEnabledFor(logging.DEBUG):
            # Logged once the worker has read the envelope, so it names the source.
            dlq_log.debug(
                "Processing DLQ message",
                extra=fields(held.msg, out.stored.company_id, out.stored.source_subject),
            )

    def expired(self, held: Held) -> None:
        dlq_log.warning(
            "DLQ message expired in the local queue, not processed", extra=fields(held.msg)
        )

    def settled(self, s: Settled, dispatched: float) -> None:
        v, msg, m = s.verdict, s.held.msg, self.metrics
        company = v.company
        if dispatched:
            m.processing_duration.labels(company).observe(time.monotonic() - dispatched)
        if s.did is Did.ACKED:
            if s.raised:
                self._settle_failed(s)
                return
            m.acks_success.labels(company).inc()
            # The common case: no log fields are built unless DEBUG is on.
            if dlq_log.isEnabledFor(logging.DEBUG):
                dlq_log.debug(
                    "Successfully processed event from DLQ",
                    extra=fields(msg, company, v.out.stored.source_subject),
                )
            return
        f = fields(msg, company, v.out.stored.source_subject)
        reason = v.reason.value if v.reason else ""
        if s.did is Did.NAKED:
            if v.save_failed:
                dlq_log.error("Failed to save exhausted event...", extra={**f, "error": v.db_error})
            else:
                dlq_log.warning(
                    "Failed to process event from DLQ",
                    extra={**f, "error": v.db_error or v.error, "reason": reason},
                )
            dlq_log.info(
                "Retrying DLQ message with backoff",
                extra={**f, "delay_seconds": round(s.delay, 3)},
            )
            if s.raised:
                self._settle_failed(s)
                return
            m.task_retries.labels(company).inc()
            return
        exhausted = v.decision.reason.value if isinstance(v.decision, Exhaust) else ""
        dlq_log.warning(
            "Max retries exceeded, attempting to persist to exhausted store",
            extra={**f, "error": v.error, "reason": reason, "exhausted_reason": exhausted},
        )
        if s.raised:
            self._settle_failed(s)
            return
        m.acks_failure.labels(company).inc()
        if v.inserted:
            m.tasks_dropped.labels(company).inc()


class EventObserver(Observer):
    def __init__(self, metrics: Metrics, lane: str) -> None:
        super().__init__(metrics)
        self.lane = lane

    def admitted(self, held: Held) -> None:
        self.metrics.events_received.labels(held.event_type, held.company, self.lane).inc()

    def expired(self, held: Held) -> None:
        dlq_log.warning("event expired in the local queue, not processed", extra=fields(held.msg))

    def settled(self, s: Settled, dispatched: float) -> None:
        v, msg, m = s.verdict, s.held.msg, self.metrics
        labels = (s.held.event_type, v.company, self.lane)
        error_type = ERROR_TYPE.get(v.reason, "unknown") if v.reason else "none"
        if not v.out.ok or not isinstance(v.decision, Ack):
            m.events_failed.labels(*labels, error_type).inc()
        f = {**fields(msg, v.company), "error": v.error, "error_type": error_type}
        if s.did is Did.PUBLISH_FAILED:
            consumer_log.error(
                "Failed to publish event to DLQ, NAKing it",
                extra={**f, "publish_error": s.publish_error, "delay_seconds": s.delay},
            )
        if s.raised:
            self._settle_failed(s)
            return
        match s.did:
            case Did.ACKED:
                m.events_processed.labels(*labels).inc()
                m.event_actions.labels(*labels, "ack_success", "none").inc()
            case Did.NAKED:
                kind = "panic_nak" if v.reason is Reason.WORKER_CRASHED else "nak_retry"
                m.event_actions.labels(*labels, kind, error_type).inc()
                consumer_log.info(
                    "Event processing failed, retrying with backoff",
                    extra={
                        **fields(msg, v.company),
                        "error": v.db_error or v.error,
                        "error_type": error_type,
                        "delay_seconds": round(s.delay, 3),
                    },
                )
            case Did.STORED_DIRECTLY:
                m.event_actions.labels(*labels, "ack_success", error_type).inc()
                consumer_log.warning(
                    "Event not dead-lettered, stored in exhausted_events",
                    extra={
                        **fields(msg, v.company),
                        "why": v.stored_directly,
                        "error": v.error,
                        "size": len(msg.data),
                    },
                )
            case Did.PUBLISH_FAILED:
                m.event_actions.labels(*labels, "nak_dlq_publish_fail", "nats").inc()
            case _:
                consumer_log.warning("Published event to DLQ", extra=f)
                m.event_actions.labels(*labels, "dlq_published_ack_success", error_type).inc()
        if dispatched:
            m.event_duration.labels(*labels).observe(time.monotonic() - dispatched)


def show_gauges(metrics: Metrics, gauges: Gauges) -> None:
    metrics.queue_length.set(gauges.queue_length)
    metrics.in_flight.set(gauges.in_flight)
