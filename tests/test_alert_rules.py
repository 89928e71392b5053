"""The Prometheus rules, their unit tests, the example config and the Grafana dashboard.

The promtool checks run only where promtool is installed (Debian: the
`prometheus` package), and fail in CI when it is not; the dashboard and
metric-name checks always run, against the series the metrics module defines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlqproc.metrics import Metrics, WorkerMetrics

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERTS_TEST = PROM / "alerts_test.yml"
PROM_CONFIG = PROM / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dlqproc-dashboard.json"

PROMTOOL = shutil.which("promtool")
# Skipped on a developer's machine without it; CI installs it, so there it must run.
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None and not os.environ.get("CI"),
    reason="promtool is not on PATH (install Prometheus, e.g. `apt-get install prometheus`)",
)


def exposed_families() -> dict[str, str]:
    """Family name -> type of every series the service's /metrics can carry.

    Taken from the metrics module itself, never from a list kept by hand: the
    supervisor's registry as /metrics writes it out (a family shows its TYPE
    line even before it has a series), and the histogram the workers record.
    """
    text = "\n".join(Metrics().registry.expose())
    families = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    for family in WorkerMetrics().handler_seconds.describe():
        families[family.name] = family.type
    return families


def sample_names(families: dict[str, str]) -> set[str]:
    """The names a query can use: a histogram's buckets, count and sum; others as typed."""
    names: set[str] = set()
    for name, kind in families.items():
        if kind == "histogram":
            names |= {name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(name)
    return names


EXPOSED = sample_names(exposed_families())
# Families labelled by tenant: their panels must honour the tenant variable.
PER_TENANT = sample_names(
    {
        family.name + family.suffix: family.kind
        for family in Metrics().registry.families
        if "company_id" in family.labelnames
    }
)

EXPECTED_ALERTS = {
    "DLQExhaustedEventsIncreasing",
    "DLQQueueLengthHigh",
    "DLQFetchErrors",
    "DLQRetryRateHigh",
    "DLQUnresolvedBacklogGrowing",
    "DLQUnresolvedBacklogStale",
    "DLQWorkerRestarts",
    "DLQFetchStalled",
    "DLQPublishFailures",
    "DLQNotProcessing",
    "DLQProcessorDown",
    "DLQNewTenantsBurst",
}

# An identifier that starts like one of the service's metric names.
_METRIC_WORD = re.compile(r"(?<![A-Za-z0-9_:])((?:dlq|message_event_service)_[A-Za-z0-9_]*)")


def metric_names(expr: str) -> set[str]:
    # Quoted strings hold label values, not metric names.
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(_METRIC_WORD.findall(without_strings))


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that draws data (rows only group them), nested rows included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in graph_panels(load_dashboard())
        for target in panel["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- promtool -----------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config() -> None:
    result = promtool("check", "config", PROM_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, is valid PromQL."""
    substitutions = {"$__rate_interval": "5m", "$company_id": ".*"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_exprs()):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unhandled dashboard variable in {expr!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- rules --------------------------------------------------------------------


def test_alerts_cover_the_troubleshooting_section() -> None:
    names = {rule["alert"] for rule in alert_rules() if "alert" in rule}
    assert names == EXPECTED_ALERTS


def test_alerts_have_severity_and_operator_annotations() -> None:
    for rule in alert_rules():
        if "alert" not in rule:
            continue
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"


def test_rules_use_only_exposed_metrics() -> None:
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - EXPOSED
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {sorted(unknown)}"


def test_every_alert_has_unit_tests() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
    silent = {
        case["alertname"]
        for test in doc["tests"]
        for case in test["alert_rule_test"]
        if not case.get("exp_alerts")
    }
    assert tested == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS, "each alert needs a case where it does not fire"


# --- dashboard ----------------------------------------------------------------


def test_dashboard_is_valid_json_with_variables() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["company_id"]["type"] == "query"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_dashboard_panel_has_prometheus_targets() -> None:
    panels = graph_panels(load_dashboard())
    assert panels
    for panel in panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no targets"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r}: empty expr"
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]


def test_dashboard_uses_only_exposed_metrics() -> None:
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"panel {title!r}: no dlqproc metric in {expr!r}"
        unknown = names - EXPOSED
        assert not unknown, f"panel {title!r}: unknown metrics {sorted(unknown)}"
        used |= names
    # The panels the operator guide asks for are all there.
    for name in (
        "dlq_fetch_errors_total",
        "dlq_queue_length",
        "dlq_messages_in_flight",
        "dlq_worker_restarts_total",
        "dlq_processing_duration_seconds_bucket",
        "dlq_tasks_dropped_total",
        "dlq_exhausted_oldest_unresolved_age_seconds",
        "dlq_consumer_ack_pending",
        "message_event_service_event_processing_actions_total",
    ):
        assert name in used, f"no panel shows {name}"


def test_dashboard_tenant_filter_is_applied() -> None:
    """Every query on a per-tenant series honours the company_id variable."""
    per_tenant = PER_TENANT
    assert "dlq_tasks_dropped_total" in per_tenant
    assert "dlq_processing_duration_seconds_bucket" in per_tenant
    for title, expr in dashboard_exprs():
        if metric_names(expr) & per_tenant:
            assert 'company_id=~"$company_id"' in expr, f"panel {title!r} ignores the tenant"


def test_metric_names_helper() -> None:
    expr = (
        'sum by (le) (rate(dlq_processing_duration_seconds_bucket{company_id=~"$company_id",'
        'consumer="dlq_x"}[5m])) / dlq:retry_ratio:rate5m'
    )
    assert metric_names(expr) == {"dlq_processing_duration_seconds_bucket"}


def test_exposed_series_are_the_metrics_modules() -> None:
    families = exposed_families()
    assert families["dlq_tasks_dropped_total"] == "counter"
    assert families["dlq_processing_duration_seconds"] == "histogram"
    assert families["dlq_handler_duration_seconds"] == "histogram"
    assert families["dlq_queue_length"] == "gauge"
    assert "dlq_tasks_dropped" not in EXPOSED  # a counter is queried with its _total
    assert "dlq_processing_duration_seconds" not in EXPOSED  # a histogram by its parts


# Read from PostgreSQL or from JetStream's consumer info: every replica reports
# the same value, so a sum across replicas would count it once per replica.
REPLICA_SHARED = {
    "dlq_exhausted_unresolved",
    "dlq_exhausted_oldest_unresolved_age_seconds",
    "dlq_tenants_known",
    "dlq_replays_total",
    "dlq_consumer_pending",
    "dlq_consumer_ack_pending",
}
_AGGREGATION = re.compile(r"\b(sum|max|min|avg|count)\s*(?:by\s*\(([^)]*)\))?\s*\($")


def innermost_aggregation(expr: str, metric: str) -> tuple[str, set[str]] | None:
    """The aggregation operator (and its `by` labels) that first encloses `metric`."""
    found = re.search(rf"(?<![A-Za-z0-9_:]){re.escape(metric)}(?![A-Za-z0-9_:])", expr)
    assert found, metric
    at = found.start()
    depth = 0
    for i in range(at - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth:
                depth -= 1
                continue
            m = _AGGREGATION.search(expr[: i + 1])
            if m:
                return m.group(1), {x.strip() for x in (m.group(2) or "").split(",") if x.strip()}
    return None


def test_innermost_aggregation_helper() -> None:
    assert innermost_aggregation("sum(max by (c) (rate(x[5m])))", "x") == ("max", {"c"})
    assert innermost_aggregation("sum by (instance) (x)", "x") == ("sum", {"instance"})
    assert innermost_aggregation("x > 0", "x") is None
    assert innermost_aggregation("sum(x_total) + max(x)", "x") == ("max", set())


def test_dashboard_counts_replica_shared_values_once() -> None:
    """A value every replica reports alike is taken with max (or kept per instance)."""
    assert REPLICA_SHARED.issubset(EXPOSED)
    seen: set[str] = set()
    for title, expr in dashboard_exprs():
        for metric in metric_names(expr) & REPLICA_SHARED:
            seen.add(metric)
            agg = innermost_aggregation(expr, metric)
            assert agg is not None, f"panel {title!r}: {metric} shown per series"
            op, by = agg
            assert op == "max" or "instance" in by, (
                f"panel {title!r}: {op} over {metric} counts it once per replica"
            )
    assert seen == REPLICA_SHARED, f"no panel shows {sorted(REPLICA_SHARED - seen)}"
