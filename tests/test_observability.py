"""Metrics, health and readiness as operators use them: a real Prometheus scrapes the service."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fresh_database
from test_alert_rules import (
    alert_rules,
    dashboard_exprs,
    exposed_families,
    metric_names,
    sample_names,
)

from dlqproc.embedded import NatsServer, PostgresServer, free_port
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]
# Skipped on a developer's machine without it; CI installs it, so there it must run.
needs_prometheus = pytest.mark.skipif(
    (shutil.which("prometheus") is None or shutil.which("promtool") is None)
    and not os.environ.get("CI"),
    reason="Debian's prometheus package (prometheus, promtool) is not installed",
)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def scrape(svc: Service) -> str:
    status, body = get(f"http://127.0.0.1:{svc.port}/metrics")
    assert status == 200
    return body.decode()


def value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, number = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(number)
    return total


def mixed_workload(svc: Service) -> None:
    bodies = [envelope("t.ok", "acme", {"id": f"ok{i}"}) for i in range(20)]
    bodies += [envelope("t.flaky", "acme", {"id": f"fl{i}", "fail_times": 2}) for i in range(5)]
    bodies += [envelope("t.perm", "globex", {"id": f"p{i}"}) for i in range(4)]
    bodies += [envelope("t.fail", "acme", {"id": f"f{i}"}) for i in range(2)]
    svc.publish("acme", [b for b in bodies if b"globex" not in b])
    svc.publish("globex", [b for b in bodies if b"globex" in b])
    svc.publish("acme", [b"not json %d" % i for i in range(3)])
    wait_until(lambda: len(svc.exhausted()) == 9, timeout=60)
    wait_until(svc.settled, timeout=30)


# Expected from the workload above (budget 3): 25 successes, 14 delayed NAKs
# (5 x 2 flaky + 2 x 2 failing), 9 exhausted rows (4 permanent, 3 not JSON,
# 2 out of retries), each TERMed, and 48 deliveries handed to the pool.
EXPECTED = {
    "dlq_acks_success_total": 25,
    "dlq_task_retries_total": 14,
    "dlq_tasks_dropped_total": 9,
    "dlq_acks_failure_total": 9,
    "dlq_tasks_submitted_total": 48,
}


def test_health_ready_and_metrics_endpoints(service: Make) -> None:
    svc = service()
    mixed_workload(svc)
    assert get(f"http://127.0.0.1:{svc.port}/health")[0] == 200
    status, body = get(f"http://127.0.0.1:{svc.port}/ready")
    assert status == 200 and json.loads(body) == {"status": "ready"}
    assert get(f"http://127.0.0.1:{svc.port}/nope")[0] == 404
    text = scrape(svc)
    for name, want in EXPECTED.items():
        assert value(text, name) == want, name
    assert value(text, "dlq_tasks_dropped_total", company_id="globex") == 4
    # Recorded inside the worker processes, aggregated by the supervisor.
    assert value(text, "dlq_handler_duration_seconds_count") == 25
    assert value(text, "dlq_handler_duration_seconds_count", event_type="t.flaky") == 5
    assert value(text, "dlq_workers_alive") == 2
    assert value(text, "dlq_fetch_requests_total") > 0
    wait_until(
        lambda: value(scrape(svc), "dlq_exhausted_unresolved", company_id="acme") == 5, timeout=15
    )
    # The alert rules and the dashboard query series this running service serves.
    served = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert served == exposed_families()
    used = {n for rule in alert_rules() for n in metric_names(rule["expr"])}
    used |= {n for _, expr in dashboard_exprs() for n in metric_names(expr)}
    assert used and not used - sample_names(served), sorted(used - sample_names(served))


def test_tenants_past_server_metrics_max_tenants_are_counted_under_other(
    service: Make,
) -> None:
    svc = service(SERVER_METRICSMAXTENANTS="1")
    mixed_workload(svc)
    text = scrape(svc)
    labelled = {
        t for t in ("acme", "globex") if f'company_id="{t}"' in text
    }  # whichever the service recorded first
    assert len(labelled) == 1 and 'company_id="_other"' in text
    # Nothing is lost: every count adds up over the label values.
    for name, want in EXPECTED.items():
        assert value(text, name) == want, name
    dropped_other = value(text, "dlq_tasks_dropped_total", company_id="_other")
    assert dropped_other == {"acme": 4, "globex": 5}[labelled.pop()]


@needs_prometheus
def test_promtool_accepts_the_exposition(service: Make, tmp_path: Path) -> None:
    svc = service()
    mixed_workload(svc)
    out = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape(svc),
        text=True,
        capture_output=True,
        timeout=60,
    )
    # promtool lints too (e.g. counter naming); it must find no errors.
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: dlqproc\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
        )
        procs.append(
            subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(tmp_path / "prometheus.log", "wb"),  # noqa: SIM115
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), timeout=60, interval=0.2)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def _ready(url: str) -> bool:
    try:
        return get(f"{url}/-/ready")[0] == 200
    except OSError:
        return False


def promql(url: str, query: str) -> float | None:
    status, body = get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@needs_prometheus
def test_prometheus_scrapes_counters_equal_to_postgres_and_jetstream(
    service: Make, prometheus: Callable[[int], str]
) -> None:
    svc = service()
    url = prometheus(svc.port)
    wait_until(lambda: promql(url, 'up{job="dlqproc"}') == 1, timeout=30)
    mixed_workload(svc)
    exhausted = len(svc.exhausted())
    rows = len(svc.rows("acme"))
    assert (exhausted, rows) == (9, 25)
    checks = {
        "sum(dlq_tasks_dropped_total)": exhausted,
        "sum(dlq_acks_success_total)": rows,
        "sum(dlq_acks_failure_total)": exhausted,
        "sum(dlq_task_retries_total)": EXPECTED["dlq_task_retries_total"],
        "sum(dlq_tasks_submitted_total)": EXPECTED["dlq_tasks_submitted_total"],
        "sum(dlq_handler_duration_seconds_count)": rows,
        'sum(dlq_exhausted_unresolved{company_id="globex"})': 4,
        'dlq_consumer_pending{consumer="dlq"}': 0,
    }
    for query, want in checks.items():
        wait_until(lambda q=query, w=want: promql(url, q) == w, timeout=30)


def test_worker_churn_keeps_counters_exact_and_the_metrics_dir_bounded(
    service: Make, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    svc = service(
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        NATS_DLQWORKERBATCH="4",
        NATS_DLQMAXRETRIES="8",
        NATS_DLQMAXDELIVER="12",
    )
    n = 600
    svc.publish(
        "acme", [envelope("t.slow", "acme", {"id": f"k{i}", "sleep": 0.01}) for i in range(n)]
    )
    rng = random.Random(5)
    for kill in range(50):
        # Only ready workers: one killed while starting is retried, not replaced.
        pids = svc.worker_pids()
        assert len(pids) == 2
        os.kill(rng.choice(pids), signal.SIGKILL)
        wait_until(lambda k=kill: len(svc.find("worker replaced")) >= k + 1)
    wait_until(lambda: len(svc.rows("acme")) == n, timeout=120)
    wait_until(svc.settled, timeout=60)
    text = scrape(svc)
    assert value(text, "dlq_worker_restarts_total", reason="crash") == 50
    # Nothing reset, nothing counted twice: the supervisor's counters equal the
    # database, and the workers' histogram kept what the dead workers recorded.
    assert value(text, "dlq_acks_success_total") == n
    assert value(text, "dlq_tasks_dropped_total") == len(svc.exhausted()) == 0
    assert value(text, "dlq_handler_duration_seconds_count") >= n
    # One file per kind for the archive, per live process: not one per dead worker.
    files = sorted(p.name for p in metrics_dir.glob("*.db"))
    assert len(files) <= 8, files


def test_ready_follows_postgres_and_nats(service: Make, tmp_path: Path, pg_home: Path) -> None:
    with NatsServer(tmp_path / "nats") as nats_server, PostgresServer(pg_home / "d") as pg:
        svc = service(nats_url=nats_server.url, db=fresh_database(pg))
        ready = f"http://127.0.0.1:{svc.port}/ready"
        wait_until(lambda: get(ready)[0] == 200, timeout=10)
        pg.stop()
        _, body = wait_until(lambda: (r := get(ready))[0] == 503 and r, timeout=10)
        assert "postgres: not reachable" in json.loads(body)["problems"]
        assert get(f"http://127.0.0.1:{svc.port}/health")[0] == 200
        pg.start()
        wait_until(lambda: get(ready)[0] == 200, timeout=15)
        nats_server.stop()
        _status, body = wait_until(lambda: (r := get(ready))[0] == 503 and r, timeout=10)
        assert "nats: not connected" in json.loads(body)["problems"]
        nats_server.start()
        wait_until(lambda: get(ready)[0] == 200, timeout=15)
        assert svc.stop() == 0
