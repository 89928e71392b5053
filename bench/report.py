"""Summaries, ratios and the output files: results.json, results.md, throughput.png."""

from __future__ import annotations

import json
import operator
import os
import platform
import statistics
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.harness import Options, plan

# Targets (bench/README.md).
TARGET_LIGHT_VS_A = 8.0
TARGET_LIGHT_VS_B = 0.8
TARGET_HEAVY_VS_B = 1.7
# Issue 13: against the careful single-process batched consumer, baseline (c).
TARGET_HEAVY_VS_C = 1.3
TARGET_HEAVY_VS_B_13 = 1.5
TARGET_LIGHT_VS_C = 0.95
TARGET_LIGHT_VS_A_DURABLE = 10.0
TARGET_SUPERVISOR_RSS_MB = 150.0
TARGET_WORKER_RSS_MB = 100.0

Getter = Callable[[dict[str, Any]], float | None]

MEASURES: dict[str, Getter] = {
    "msgs_per_s": lambda r: r.get("msgs_per_s"),
    "rows_per_s": lambda r: r.get("rows_per_s"),
    "backlog_p50_ms": lambda r: (r.get("latency_backlog_ms") or {}).get("p50"),
    "backlog_p99_ms": lambda r: (r.get("latency_backlog_ms") or {}).get("p99"),
    "steady_p50_ms": lambda r: ((r.get("steady") or {}).get("latency_ms") or {}).get("p50"),
    "steady_p95_ms": lambda r: ((r.get("steady") or {}).get("latency_ms") or {}).get("p95"),
    "steady_p99_ms": lambda r: ((r.get("steady") or {}).get("latency_ms") or {}).get("p99"),
    "supervisor_cpu_ms_per_msg": lambda r: (r.get("cpu") or {}).get("supervisor_ms_per_msg"),
    "workers_cpu_ms_per_msg": lambda r: (r.get("cpu") or {}).get("workers_ms_per_msg"),
    "total_cpu_ms_per_msg": lambda r: (r.get("cpu") or {}).get("total_ms_per_msg"),
    "postgres_cpu_ms_per_msg": lambda r: (r.get("cpu") or {}).get("postgres_ms_per_msg"),
    "postgres_cpu_us_per_row": lambda r: (r.get("cpu") or {}).get("postgres_us_per_row"),
    "postgres_busy": lambda r: (r.get("cpu") or {}).get("postgres_busy"),
    "nats_cpu_ms_per_msg": lambda r: (r.get("cpu") or {}).get("nats_ms_per_msg"),
    "supervisor_rss_mb": lambda r: (r.get("rss_mb") or {}).get("supervisor"),
    "worker_rss_mb": lambda r: (r.get("rss_mb") or {}).get("worker_max"),
    "exhausted": lambda r: r.get("exhausted"),
    "worker_restarts": lambda r: r.get("worker_restarts"),
}


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 4),
        "median": round(statistics.median(values), 4),
        "max": round(max(values), 4),
        "n": len(values),
    }


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """min/median/max of every measure per configuration (over its successful repeats)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        groups[r["config"]].append(r)
    summary: dict[str, dict[str, Any]] = {}
    for key, runs in groups.items():
        ok = [r for r in runs if not r.get("error")]
        first = runs[0]
        entry: dict[str, Any] = {
            k: first[k] for k in ("workload", "path", "mode", "workers", "fetch_batch")
        }
        entry["runs"] = len(runs)
        entry["failed_runs"] = len(runs) - len(ok)
        entry["preloaded"] = first.get("preloaded")
        for name, get in MEASURES.items():
            values = [v for v in (get(r) for r in ok) if v is not None]
            entry[name] = _stats(values)
        summary[key] = entry
    return summary


def _by_repeat(results: Sequence[dict[str, Any]], key: str) -> dict[int, float]:
    return {
        r["repeat"]: r["msgs_per_s"]
        for r in results
        if r["config"] == key and not r.get("error") and r.get("msgs_per_s")
    }


def ratios(results: Sequence[dict[str, Any]], opts: Options) -> list[dict[str, Any]]:
    """Service (at opts.ratio_workers, and at 0 workers against (c)) over each
    baseline, paired repeat by repeat."""
    out = []
    fb = opts.primary_fetch_batch
    w = opts.ratio_workers
    pairs_of = (
        (f"service/w{w}", w, "baseline_a", "a"),
        (f"service/w{w}", w, "inline", "b"),
        (f"service/w{w}", w, "baseline_c", "c"),
        ("inline/w0", 0, "baseline_c", "c"),
    )
    for wl in opts.workloads:
        for path in opts.paths:
            for mine, workers, base, label in pairs_of:
                if base.startswith("baseline_") and path != "dlq":
                    continue
                service = _by_repeat(results, f"{wl}/{path}/{mine}/fb{fb}")
                other = _by_repeat(results, f"{wl}/{path}/{base}/w0/fb{fb}")
                pairs = [service[r] / other[r] for r in sorted(service) if r in other]
                if not service or not other:
                    continue
                out.append(
                    {
                        "workload": wl,
                        "path": path,
                        "service_workers": workers,
                        "baseline": label,
                        "ratio": _stats(pairs),
                    }
                )
    return out


def targets(
    summary: dict[str, dict[str, Any]], rat: Sequence[dict[str, Any]], durable: bool = False
) -> list[dict[str, Any]]:
    """The README's targets, each met / missed / not measured, on medians."""

    def ratio(wl: str, baseline: str, path: str = "dlq") -> float | None:
        """The service's (at its ratio worker count, not 0) median ratio."""
        for r in rat:
            if (r["workload"], r["baseline"], r["path"]) != (wl, baseline, path) or not r["ratio"]:
                continue
            if r["service_workers"] != 0:
                return float(r["ratio"]["median"])
        return None

    def pg_per_row(wl: str, mode: str) -> float | None:
        for e in summary.values():
            here = (e["workload"], e["path"], e["mode"]) == (wl, "dlq", mode)
            ratio_run = mode != "service" or e["workers"] == 2
            if here and ratio_run and e["postgres_cpu_us_per_row"]:
                return float(e["postgres_cpu_us_per_row"]["median"])
        return None

    def check(
        name: str, value: float | None, goal: str, ok: Callable[[float], bool]
    ) -> dict[str, Any]:
        return {
            "target": name,
            "goal": goal,
            "value": None if value is None else round(value, 2),
            "met": None if value is None else ok(value),
        }

    out = [
        check(
            "light/dlq: service (2 workers) vs baseline (a)",
            ratio("light", "a"),
            f">= {TARGET_LIGHT_VS_A:g}x",
            lambda v: v >= TARGET_LIGHT_VS_A,
        )
    ]
    for path in ("dlq", "main"):
        for workload, goal in (("light", TARGET_LIGHT_VS_B), ("heavy", TARGET_HEAVY_VS_B)):
            out.append(
                check(
                    f"{workload}/{path}: service (2 workers) vs baseline (b)",
                    ratio(workload, "b", path),
                    f">= {goal:g}x",
                    partial(operator.le, goal),  # goal <= v
                )
            )
    out += [
        check(
            "heavy/dlq: service (2 workers) vs baseline (c)",
            ratio("heavy", "c"),
            f">= {TARGET_HEAVY_VS_C:g}x",
            partial(operator.le, TARGET_HEAVY_VS_C),
        ),
        check(
            "heavy/dlq: service (2 workers) vs service at 0 workers (b)",
            ratio("heavy", "b"),
            f">= {TARGET_HEAVY_VS_B_13:g}x",
            partial(operator.le, TARGET_HEAVY_VS_B_13),
        ),
        check(
            "light/dlq: service (2 workers) vs baseline (c)",
            ratio("light", "c"),
            f">= {TARGET_LIGHT_VS_C:g}x",
            partial(operator.le, TARGET_LIGHT_VS_C),
        ),
        check(
            "light/dlq: service (2 workers) vs baseline (a), durable PostgreSQL (--durable)",
            ratio("light", "a") if durable else None,
            f">= {TARGET_LIGHT_VS_A_DURABLE:g}x",
            partial(operator.le, TARGET_LIGHT_VS_A_DURABLE),
        ),
    ]
    for wl in ("heavy", "light"):
        mine, theirs = pg_per_row(wl, "service"), pg_per_row(wl, "baseline_c")
        out.append(
            check(
                f"{wl}/dlq: PostgreSQL CPU per row, service (2 workers) / baseline (c)",
                None if mine is None or theirs is None or not theirs else mine / theirs,
                "<= 1",
                partial(operator.ge, 1.0),
            )
        )
    sup = [
        e["supervisor_rss_mb"]["max"]
        for e in summary.values()
        if e["supervisor_rss_mb"] and e["mode"] == "service"
    ]
    wrk = [e["worker_rss_mb"]["max"] for e in summary.values() if e["worker_rss_mb"]]
    backlog = max((e["preloaded"] or 0 for e in summary.values()), default=0)
    out.append(
        check(
            f"supervisor peak RSS (largest backlog run here: {backlog} messages;"
            " the target is for 50,000)",
            max(sup) if sup else None,
            f"< {TARGET_SUPERVISOR_RSS_MB:g} MB",
            lambda v: v < TARGET_SUPERVISOR_RSS_MB,
        )
    )
    out.append(
        check(
            "worker peak RSS",
            max(wrk) if wrk else None,
            f"< {TARGET_WORKER_RSS_MB:g} MB",
            lambda v: v < TARGET_WORKER_RSS_MB,
        )
    )
    return out


def _fmt(stats: dict[str, float] | None, digits: int = 0) -> str:
    if not stats:
        return "-"
    f = f"{{:.{digits}f}}"
    if stats["n"] == 1:
        return f.format(stats["median"])
    return f"{f.format(stats['min'])}-**{f.format(stats['median'])}**-{f.format(stats['max'])}"


def _mode(entry: dict[str, Any]) -> str:
    if entry["mode"] == "baseline_a":
        return "baseline (a)"
    if entry["mode"] == "baseline_c":
        return "baseline (c): batched single process"
    if entry["mode"] == "inline":
        return "baseline (b): service, 0 workers"
    return f"service, {entry['workers']} workers"


def _durability(opts: dict[str, Any]) -> str:
    if opts.get("external_servers"):
        return "given by DSN"
    if opts.get("durable_postgres"):
        return "durable (fsync on, synchronous_commit on)"
    return "with fsync off (the test-suite setting)"


def markdown(doc: dict[str, Any]) -> str:
    opts = doc["options"]
    summary: dict[str, dict[str, Any]] = doc["summary"]
    lines = [
        "# dlqproc benchmark",
        "",
        f"{doc['started']} · {doc['machine']['cpus']} CPUs · Python {doc['machine']['python']}"
        f" · {opts['messages']} messages (heavy: 1/20) · {opts['repeats']} repeat(s)"
        f" · steady phase {opts['steady_seconds']:g} s at 50% of the measured throughput"
        f" · PostgreSQL {_durability(opts)}",
        "",
        "Cells with several repeats read min-**median**-max. Throughput counts from the"
        " service's ready log line to the last ACK/TERM of the preloaded backlog."
        " Latency is publish → final ACK/TERM. CPU is per settled message over the backlog"
        " window (ms). RSS is the peak (VmHWM) in MB.",
        "",
        "## Throughput, latency, CPU and memory",
        "",
        "| workload | path | consumer | fetch | msg/s | rows/s | backlog p99 ms"
        " | steady p50 / p95 / p99 ms | CPU sup ms/msg | CPU workers ms/msg"
        " | CPU postgres / nats-server ms/msg | PG CPU µs/row | PG busy | RSS sup MB"
        " | RSS worker MB | exhausted | worker restarts |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    order = {"baseline_a": 0, "baseline_c": 1, "inline": 2, "service": 3}
    entries = sorted(
        summary.values(),
        key=lambda e: (
            opts["workloads"].index(e["workload"]) if e["workload"] in opts["workloads"] else 9,
            e["path"],
            e["fetch_batch"] != doc["primary_fetch_batch"],
            e["fetch_batch"],
            order[e["mode"]],
            e["workers"],
        ),
    )
    for e in entries:
        steady = " / ".join(_fmt(e[k]) for k in ("steady_p50_ms", "steady_p95_ms", "steady_p99_ms"))
        failed = f" ({e['failed_runs']} failed)" if e["failed_runs"] else ""
        lines.append(
            f"| {e['workload']} | {e['path']} | {_mode(e)}{failed} | {e['fetch_batch']}"
            f" | {_fmt(e['msgs_per_s'])} | {_fmt(e['rows_per_s'])}"
            f" | {_fmt(e['backlog_p99_ms'])} | {steady}"
            f" | {_fmt(e['supervisor_cpu_ms_per_msg'], 2)} | {_fmt(e['workers_cpu_ms_per_msg'], 2)}"
            f" | {_fmt(e['postgres_cpu_ms_per_msg'], 2)} / {_fmt(e['nats_cpu_ms_per_msg'], 2)}"
            f" | {_fmt(e['postgres_cpu_us_per_row'], 1)} | {_fmt(e['postgres_busy'], 2)}"
            f" | {_fmt(e['supervisor_rss_mb'])} | {_fmt(e['worker_rss_mb'])}"
            f" | {_fmt(e['exhausted'])} | {_fmt(e['worker_restarts'])} |"
        )
    lines += [
        "",
        "## Ratios (same run, paired by repeat)",
        "",
        "| workload | path | service vs | ratio (msg/s) |",
        "|---|---|---|--:|",
    ]
    for r in doc["ratios"]:
        name = {
            "a": "baseline (a): plain consumer",
            "b": "baseline (b): 0 workers",
            "c": "baseline (c): batched single process",
        }[r["baseline"]]
        lines.append(
            f"| {r['workload']} | {r['path']} | {name} (service at {r['service_workers']} workers)"
            f" | {_fmt(r['ratio'], 2)} |"
        )
    lines += [
        "",
        "## Targets (medians)",
        "",
        "| target | goal | value | met |",
        "|---|---|--:|---|",
    ]
    for t in doc["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        value = "-" if t["value"] is None else f"{t['value']:g}"
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {met} |")
    errors = [r for r in doc["runs"] if r.get("error")]
    if errors:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['config']} r{r['repeat']}: {r['error'][:300]}" for r in errors]
    lines.append("")
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> bool:
    """throughput.png: msg/s and steady p99 against workers. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            "matplotlib is not installed (pip install 'dlqproc[bench]'): no throughput.png",
            stacklevel=2,
        )
        return False
    summary: dict[str, dict[str, Any]] = doc["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for e in summary.values():
        if e["mode"] in ("service", "inline"):
            series[(e["workload"], e["path"], e["fetch_batch"])].append(e)
    for (wl, p, fb), entries in sorted(series.items()):
        entries.sort(key=lambda e: e["workers"])
        xs = [e["workers"] for e in entries]
        label = f"{wl}/{p}" + ("" if fb == doc["primary_fetch_batch"] else f" fetch {fb}")

        def med(e: dict[str, Any], k: str) -> float:
            s = e[k]
            return float(s["median"]) if s else float("nan")

        (line,) = ax1.plot(xs, [med(e, "msgs_per_s") for e in entries], marker="o", label=label)
        lo = [med(e, "msgs_per_s") - (e["msgs_per_s"] or {"min": 0})["min"] for e in entries]
        hi = [(e["msgs_per_s"] or {"max": 0})["max"] - med(e, "msgs_per_s") for e in entries]
        ax1.errorbar(xs, [med(e, "msgs_per_s") for e in entries], yerr=[lo, hi], fmt="none",
                     ecolor=line.get_color(), capsize=3)  # fmt: skip
        ax2.plot(xs, [med(e, "steady_p99_ms") for e in entries], marker="o", label=label)
    for ax, title, ylabel in (
        (ax1, "Backlog throughput (median, min-max bars)", "messages / s"),
        (ax2, "Steady-state latency p99 (median)", "ms, publish → ACK"),
    ):
        ax.set_title(title)
        ax.set_xlabel("worker processes (0 = in-process, baseline b)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"dlqproc benchmark, {doc['machine']['cpus']} CPUs, {doc['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def document(opts: Options, runs: list[dict[str, Any]], started: str) -> dict[str, Any]:
    planned = len(plan(opts))
    summary = summarize(runs)
    rat = ratios(runs, opts)
    return {
        "started": started,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "options": {
            "messages": opts.messages,
            "repeats": opts.repeats,
            "workloads": list(opts.workloads),
            "paths": list(opts.paths),
            "workers": list(opts.workers),
            "fetch_batches": list(opts.fetch_batches),
            "ratio_workers": opts.ratio_workers,
            "steady_seconds": opts.steady_seconds,
            "quick": opts.quick,
            "seed": opts.seed,
            "external_servers": bool(opts.nats_url or opts.postgres_dsn),
            "durable_postgres": opts.durable,
        },
        "primary_fetch_batch": opts.primary_fetch_batch,
        "planned_runs": planned,
        "complete": len(runs) == planned,
        "runs": runs,
        "summary": summary,
        "ratios": rat,
        "targets": targets(summary, rat, durable=opts.durable and not opts.postgres_dsn),
    }


def write(doc: dict[str, Any], out: Path, png: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(doc, indent=2) + "\n")
    written[1].write_text(markdown(doc))
    if not png:
        return written
    png_path = out / "throughput.png"
    if plot(doc, png_path):  # it warns when matplotlib is missing
        written.append(png_path)
    return written
