"""The benchmark harness runs end to end and writes a complete report (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A 90-second benchmark run: with the slow suites.
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def test_quick_benchmark_writes_a_complete_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# dlqproc benchmark")
    assert doc["complete"] and doc["runs"]

    opts = doc["options"]
    seen = {(r["workload"], r["path"]) for r in doc["runs"]}
    assert seen == {(w, p) for w in opts["workloads"] for p in opts["paths"]}
    assert {r["mode"] for r in doc["runs"]} == {"service", "inline", "baseline_a", "baseline_c"}

    for run in doc["runs"]:
        where = f"{run['config']} r{run['repeat']}"
        assert run["error"] is None, where
        # Every preloaded message was settled (ACKed or TERMed), and the
        # steady phase's messages too.
        assert run["preloaded"] > 0 and run["settled"] == run["preloaded"], where
        assert run["steady"]["settled"] == run["steady"]["published"] > 0, where
        assert run["msgs_per_s"] > 0 and run["rows_per_s"] > 0, where
        for latency in (run["latency_backlog_ms"], run["steady"]["latency_ms"]):
            assert all(latency[p] is not None for p in ("p50", "p95", "p99")), where
        for key in ("supervisor_ms_per_msg", "workers_ms_per_msg", "total_ms_per_msg"):
            assert run["cpu"][key] is not None, where
        assert run["rss_mb"]["supervisor"] > 0, where
        if run["mode"] == "service":
            assert len(run["rss_mb"]["workers"]) == run["workers"], where
            assert run["rss_mb"]["worker_max"] > 0, where

    assert set(doc["summary"]) == {run["config"] for run in doc["runs"]}
    for entry in doc["summary"].values():
        for key in ("msgs_per_s", "rows_per_s", "steady_p99_ms", "total_cpu_ms_per_msg"):
            stats = entry[key]
            assert stats is not None and stats["min"] <= stats["median"] <= stats["max"]

    ratios = {(r["workload"], r["path"], r["baseline"]): r["ratio"] for r in doc["ratios"]}
    for workload in opts["workloads"]:
        for baseline in ("a", "b", "c"):
            ratio = ratios[(workload, "dlq", baseline)]
            assert ratio is not None and ratio["median"] > 0
    # What a quick run measures is judged; the rest says "not measured".
    measured = {t["target"]: t for t in doc["targets"] if t["value"] is not None}
    for name in (
        "light/dlq: service (2 workers) vs baseline (a)",
        "light/dlq: service (2 workers) vs baseline (b)",
        "worker peak RSS",
    ):
        assert measured[name]["met"] in (True, False), name
    assert any(name.startswith("supervisor peak RSS") for name in measured)
