"""Prometheus metrics: the operator guide's names, and nothing else imports prometheus_client.

Per-tenant DLQ series carry the label `company_id`. Process-level series
(fetches, local queue, busy workers) have none.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.fetch_requests = Counter(
            "dlq_fetch_requests", "Fetch requests made to the DLQ stream.", registry=r
        )
        self.fetch_errors = Counter(
            "dlq_fetch_errors", "DLQ fetches that failed (not empty fetches).", registry=r
        )
        self.queue_length = Gauge(
            "dlq_queue_length", "DLQ messages fetched and waiting for a worker.", registry=r
        )
        self.tasks_submitted = Counter(
            "dlq_tasks_submitted",
            "DLQ messages handed to the worker pool.",
            ["company_id"],
            registry=r,
        )
        self.workers_active = Gauge(
            "dlq_workers_active", "Worker processes busy with a batch.", registry=r
        )
        self.processing_duration = Histogram(
            "dlq_processing_duration_seconds",
            "Time from handing a DLQ message to the pool until it is settled.",
            ["company_id"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.task_retries = Counter(
            "dlq_task_retries",
            "DLQ messages NAKed with a delay for another attempt.",
            ["company_id"],
            registry=r,
        )
        self.acks_success = Counter(
            "dlq_acks_success",
            "DLQ messages processed, committed and ACKed.",
            ["company_id"],
            registry=r,
        )
        self.acks_failure = Counter(
            "dlq_acks_failure",
            "DLQ messages terminated, or whose ACK/NAK/TERM failed (delayed NAKs excluded).",
            ["company_id"],
            registry=r,
        )
        self.tasks_dropped = Counter(
            "dlq_tasks_dropped", "Rows written to exhausted_events.", ["company_id"], registry=r
        )
        self.in_flight = Gauge(
            "dlq_messages_in_flight",
            "DLQ messages held locally (queued, in workers, settling).",
            registry=r,
        )
        self.worker_restarts = Counter(
            "dlq_worker_restarts", "Worker processes replaced, by reason.", ["reason"], registry=r
        )
        # Main consumers (realtime, historical).
        main_labels = ["event_type", "company_id", "consumer_type"]
        self.events_received = Counter(
            "message_event_service_events_received",
            "Events fetched by the main consumers.",
            main_labels,
            registry=r,
        )
        self.events_processed = Counter(
            "message_event_service_events_processed",
            "Events whose rows were committed and that were ACKed.",
            main_labels,
            registry=r,
        )
        self.events_failed = Counter(
            "message_event_service_events_failed",
            "Events whose processing attempt failed.",
            [*main_labels, "error_type"],
            registry=r,
        )
        self.event_duration = Histogram(
            "message_event_service_event_processing_duration_seconds",
            "Time from handing an event to the pool until it is settled.",
            main_labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.event_actions = Counter(
            "message_event_service_event_processing_actions",
            "What the main consumers did with each delivery (contract section 6).",
            [*main_labels, "action", "error_type"],
            registry=r,
        )
