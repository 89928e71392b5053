"""python -m bench metrics: /metrics render time and size, and the server's RSS, by tenant count.

For each tenant count a child process plays the supervisor's part of the
metrics: it creates the real `MetricsDir` and `Metrics` (with
`--max-tenants` as `server.metricsMaxTenants`), records for every tenant the
series the service records for it (`record` below), leaves the files of one
live and one dead worker process in the directory, and serves them on the
real `HealthServer` with render reuse off, so that every scrape renders. The
parent scrapes it over HTTP, sequentially and concurrently, and reads the
child's RSS from /proc between rounds.

Why not the whole service with events for 10,000 tenants: those events first
create 10,000 schemas (minutes, ~2 GB of catalog, bounded by
`tenants.maxNewPerHour` besides), and the supervisor's RSS would then mix
what the metrics cost with what the flow costs. The series, their files and
the render are the same code here; only the events are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

# The handlers' event types of a WhatsApp deployment, and the lanes' names.
EVENT_TYPES = ("v1.messages.upsert", "v1.chats.upsert", "v1.contacts.upsert")


def record(metrics: Any, tenants: int) -> None:
    """The series of `tenants` tenants, as the supervisor records them (settle.py).

    Every tenant: DLQ messages handed to the pool, settled and ACKed, and
    main-lane events received, processed and ACKed (one event type each).
    Every tenth tenant also: a retry, an exhausted event (TERM) and an
    unresolved backlog in PostgreSQL. About 40 lines of exposition a tenant.
    """
    m = metrics
    backlog: dict[str, tuple[int, float]] = {}
    for i in range(tenants):
        company = f"tenant{i:05d}"
        m.tasks_submitted.labels(company).inc(3)
        m.processing_duration.labels(company).observe(0.004 * (i % 50))
        m.acks_success.labels(company).inc(3)
        labels = (EVENT_TYPES[i % len(EVENT_TYPES)], company, "realtime")
        m.events_received.labels(*labels).inc(2)
        m.events_processed.labels(*labels).inc(2)
        m.event_actions.labels(*labels, "ack_success", "none").inc(2)
        m.event_duration.labels(*labels).observe(0.003 * (i % 40))
        if i % 10 == 0:
            m.task_retries.labels(company).inc()
            m.acks_failure.labels(company).inc()
            m.tasks_dropped.labels(company).inc()
            backlog[company] = (1 + i % 7, 60.0 * (i % 13))
    m.set_exhausted(backlog)
    m.fetch_requests.inc(tenants)
    m.workers_alive.set(2)


def _worker_series() -> None:
    # A spawned process: PROMETHEUS_MULTIPROC_DIR is inherited, so these go to its files.
    from dlqproc.metrics import WorkerMetrics

    seconds = WorkerMetrics().handler_seconds
    for i, base in enumerate(EVENT_TYPES * 50):
        seconds.labels(base).observe(0.0005 * (i % 20))


def serve(tenants: int, max_tenants: int) -> None:
    """The child: record, then serve /metrics until SIGTERM; print one JSON line each way."""
    import uvloop

    from dlqproc.health import HealthServer
    from dlqproc.metrics import Metrics, MetricsDir

    metrics_dir = MetricsDir("")
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_worker_series) for _ in range(2)]
    for w in workers:
        w.start()
        w.join(60)
    # One worker "died" (folded into the archive), the other's files stay as a live one's.
    assert workers[0].pid is not None
    metrics_dir.process_exited(workers[0].pid)
    metrics = Metrics(max_tenants)
    t0 = time.perf_counter()
    record(metrics, tenants)
    recorded = time.perf_counter() - t0
    renders: list[float] = []

    def render() -> tuple[bytes, str]:
        start = time.perf_counter()
        out = metrics_dir.render(metrics.registry)
        renders.append(time.perf_counter() - start)
        return out

    async def main() -> None:
        server = HealthServer("127.0.0.1", 0, lambda: True, lambda: [], render, reuse=0.0)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        _emit({"port": server.port, "record_s": recorded, "labelled": len(metrics.tenants)})
        await stop.wait()
        await server.close()

    try:
        uvloop.run(main())
    finally:
        metrics_dir.close()
    _emit({"renders_s": renders})


def _emit(data: dict[str, Any]) -> None:
    print(json.dumps(data), flush=True)


def _rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _scrape(url: str) -> tuple[float, bytes]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body: bytes = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")
    return time.perf_counter() - start, body


def measure(tenants: int, max_tenants: int, scrapes: int, concurrent: int) -> dict[str, Any]:
    """One tenant count: start the child, scrape it, read its RSS, stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.metrics", "--serve", str(tenants), str(max_tenants)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        ready = json.loads(proc.stdout.readline() or "null")
        if not ready:
            raise RuntimeError(f"the metrics child for {tenants} tenants did not start")
        url = f"http://127.0.0.1:{ready['port']}/metrics"
        rss = {"recorded": _rss_mb(proc.pid)}
        first_s, body = _scrape(url)
        rss["first_scrape"] = _rss_mb(proc.pid)
        sequential = [first_s] + [_scrape(url)[0] for _ in range(scrapes - 1)]
        rss["sequential"] = _rss_mb(proc.pid)
        times: list[float] = []

        def scraper() -> None:
            for _ in range(scrapes):
                times.append(_scrape(url)[0])

        threads = [threading.Thread(target=scraper) for _ in range(concurrent)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_wall = time.perf_counter() - start
        rss["concurrent"] = _rss_mb(proc.pid)
        sequential += [_scrape(url)[0] for _ in range(scrapes)]
        rss["after"] = _rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        tail, _ = proc.communicate(timeout=60)
    renders = json.loads(tail.strip().splitlines()[-1])["renders_s"]
    lines = body.count(b"\n")
    return {
        "tenants": tenants,
        "max_tenants": max_tenants,
        "labelled_tenants": ready["labelled"],
        "record_s": round(ready["record_s"], 3),
        "bytes": len(body),
        "lines": lines,
        "series": lines - body.count(b"\n#") - body.startswith(b"#"),
        "render_s": _summary(renders),
        "scrape_s": _summary(sequential),
        "concurrent": {
            "scrapers": concurrent,
            "scrapes": len(times),
            "wall_s": round(concurrent_wall, 3),
            "scrape_s": _summary(times),
        },
        "rss_mb": rss,
    }


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 4),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4),
        "max": round(ordered[-1], 4),
    }


def markdown(results: list[dict[str, Any]]) -> str:
    rows = [
        "| tenants | labelled | series | size MB | render ms median / max"
        " | scrape ms median | RSS MB recorded / after 1st scrape / after all / peak |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        rss = r["rss_mb"]
        rows.append(
            f"| {r['tenants']:,} | {r['labelled_tenants']:,} | {r['series']:,}"
            f" | {r['bytes'] / 1e6:.2f} | {r['render_s']['median'] * 1000:.0f}"
            f" / {r['render_s']['max'] * 1000:.0f} | {r['scrape_s']['median'] * 1000:.0f}"
            f" | {rss['recorded']['VmRSS']:.0f} / {rss['first_scrape']['VmRSS']:.0f}"
            f" / {rss['after']['VmRSS']:.0f} / {rss['after']['VmHWM']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench metrics", description=__doc__)
    p.add_argument("--tenants", default="100,1000,10000", help="tenant counts, comma separated")
    p.add_argument(
        "--max-tenants",
        type=int,
        default=500,
        help="server.metricsMaxTenants for the run (default 500, the service's default)",
    )
    p.add_argument("--scrapes", type=int, default=10, help="scrapes per round (default 10)")
    p.add_argument("--concurrent", type=int, default=4, help="concurrent scrapers (default 4)")
    p.add_argument("--out", type=Path, default=Path("bench/results/metrics"))
    a = p.parse_args(argv)
    counts = [int(t) for t in a.tenants.split(",") if t.strip()]
    if not counts or min(counts) < 1 or a.max_tenants < 1 or a.scrapes < 1 or a.concurrent < 1:
        p.error("tenant counts, --max-tenants, --scrapes and --concurrent must be positive")
    results = []
    for n in counts:
        print(f"{n} tenants ...", file=sys.stderr, flush=True)
        results.append(measure(n, a.max_tenants, a.scrapes, a.concurrent))
    a.out.mkdir(parents=True, exist_ok=True)
    doc = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(), "runs": results}
    (a.out / "metrics.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(results)
    (a.out / "metrics.md").write_text(f"# /metrics by tenant count\n\n{table}")
    print(table)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
