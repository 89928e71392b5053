"""The supervisor's series: bounded per-tenant labels and an exposition Prometheus can read.

In-process: Metrics and its Registry touch no global state (only MetricsDir
does, so none is created here).
"""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dlqproc.metrics import Metrics
from dlqproc.series import OTHER_TENANT, Histogram, Registry


def samples(metrics: Metrics) -> dict[str, list[Sample]]:
    text = "\n".join([*metrics.registry.expose(), ""])
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def by_tenant(found: list[Sample], name: str) -> dict[str, float]:
    return {s.labels["company_id"]: s.value for s in found if s.name == name}


def test_the_first_tenants_keep_their_label_and_the_rest_add_up_under_other() -> None:
    m = Metrics(max_tenants=3)
    for i in range(10):
        m.acks_success.labels(f"t{i}").inc(i + 1)
        m.events_received.labels("v1.chats.upsert", f"t{i}", "realtime").inc()
    m.acks_success.labels("t0").inc()  # a labelled tenant stays labelled
    m.acks_success.labels("_invalid").inc(5)  # the service's own value: no slot taken
    m.acks_success.labels("t9").inc()  # a late tenant stays under _other
    found = samples(m)
    acks = by_tenant(found["dlq_acks_success"], "dlq_acks_success_total")
    assert acks == {"t0": 2, "t1": 2, "t2": 3, OTHER_TENANT: sum(range(4, 11)) + 1, "_invalid": 5}
    # Nothing is lost: the sum over labels is every increment.
    assert sum(acks.values()) == sum(range(1, 11)) + 1 + 5 + 1
    received = by_tenant(
        found["message_event_service_events_received"],
        "message_event_service_events_received_total",
    )
    assert received == {"t0": 1, "t1": 1, "t2": 1, OTHER_TENANT: 7}


def test_ten_thousand_tenants_give_a_bounded_exposition() -> None:
    m = Metrics(max_tenants=50)
    for i in range(10_000):
        tenant = f"tenant{i:05d}"
        m.tasks_submitted.labels(tenant).inc()
        m.processing_duration.labels(tenant).observe(0.01)
    lines = m.registry.expose()
    # 51 label values (50 tenants and _other): a counter line, 17 histogram lines
    # and the four DLQ counters every seen tenant has at 0.
    assert sum(1 for line in lines if not line.startswith("#")) < 51 * 22 + 100
    count = by_tenant(
        samples(m)["dlq_processing_duration_seconds"], "dlq_processing_duration_seconds_count"
    )
    assert count[OTHER_TENANT] == 10_000 - 50 and sum(count.values()) == 10_000


def test_exhausted_gauges_sum_counts_keep_the_oldest_age_and_drop_resolved_tenants() -> None:
    m = Metrics(max_tenants=1)
    m.set_exhausted({"acme": (3, 10.0), "globex": (4, 50.0), "initech": (5, 20.0)})
    found = samples(m)
    unresolved = by_tenant(found["dlq_exhausted_unresolved"], "dlq_exhausted_unresolved")
    age = by_tenant(
        found["dlq_exhausted_oldest_unresolved_age_seconds"],
        "dlq_exhausted_oldest_unresolved_age_seconds",
    )
    assert unresolved == {"acme": 3, OTHER_TENANT: 9}
    assert age == {"acme": 10.0, OTHER_TENANT: 50.0}
    m.set_exhausted({"globex": (1, 5.0)})
    unresolved = by_tenant(samples(m)["dlq_exhausted_unresolved"], "dlq_exhausted_unresolved")
    assert unresolved == {"acme": 0, OTHER_TENANT: 1}  # resolved: zero, not out of sight


def test_histograms_are_cumulative_and_labels_escaped() -> None:
    r = Registry()
    h = Histogram(
        "h_seconds", "help with \\ and\nnewline", ["who"], buckets=(0.1, 1, 10), registry=r
    )
    for value in (0.05, 0.1, 0.5, 5, 50):
        h.labels('a"b\\c\nd').observe(value)
    text = "\n".join([*r.expose(), ""])
    (family,) = text_string_to_metric_families(text)
    assert family.documentation == "help with \\ and\nnewline"
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert {s.labels["who"] for s in family.samples} == {'a"b\\c\nd'}
    assert got == {
        ("h_seconds_bucket", "0.1"): 2,  # "less than or equal"
        ("h_seconds_bucket", "1.0"): 3,
        ("h_seconds_bucket", "10.0"): 4,
        ("h_seconds_bucket", "+Inf"): 5,
        ("h_seconds_count", None): 5,
        ("h_seconds_sum", None): pytest.approx(55.65),
    }


def test_gauges_write_infinities_and_counters_refuse_to_go_down() -> None:
    m = Metrics()
    m.queue_length.set(math.inf)
    assert "dlq_queue_length +Inf" in m.registry.expose()
    with pytest.raises(ValueError):
        m.fetch_requests.inc(-1)
    with pytest.raises(ValueError):
        m.acks_success.labels("a", "b")


def test_a_seen_tenants_dlq_counters_exist_at_zero() -> None:
    m = Metrics(max_tenants=1)
    before = "\n".join(m.registry.expose())
    assert 'company_id="acme"' not in before
    m.tasks_submitted.labels("acme").inc()  # first seen: handed to the pool
    m.events_received.labels("v1.chats.upsert", "globex", "realtime").inc()  # -> _other
    scrape = "\n".join(m.registry.expose()).splitlines()
    for name in ("dlq_task_retries", "dlq_acks_success", "dlq_acks_failure", "dlq_tasks_dropped"):
        for tenant in ("acme", OTHER_TENANT):
            assert f'{name}_total{{company_id="{tenant}"}} 0.0' in scrape, (name, tenant)
    m.task_retries.labels("acme").inc()
    assert 'dlq_task_retries_total{company_id="acme"} 1.0' in "\n".join(m.registry.expose())
