"""python -m bench [--quick] [options]: run the benchmark and write its report.

python -m bench metrics [options]: /metrics render time, size and RSS by tenant count
(bench/metrics.py).

python -m bench writepath [options]: the write paths for a heavy block on real
PostgreSQL (bench/writepath.py).

python -m bench replicas [options]: one replica, then several on the same durable
consumer, for the same backlog (bench/replicas.py).

python -m bench exhausted [options]: `dlqproc exhausted list` on 1,000,000 rows and the
unthrottled bulk replay rate (bench/exhausted.py).

python -m bench console [options]: the web console's pages on 1,000,000 exhausted rows
(bench/console.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.harness import Options, plan, run_all
from bench.workloads import PATHS, WORKLOADS


def _names(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose among {','.join(allowed)}")
        return names

    return parse


def _ints(minimum: int) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError("expected comma-separated integers") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few hundred messages, 1 repeat, tiny sweep (a smoke test, ~1.5 min)",
    )
    p.add_argument("--messages", type=int, help="backlog per run (heavy: 1/20 of it); default 5000")
    p.add_argument("--repeats", type=int, help="runs per configuration; default 3")
    p.add_argument("--workloads", type=_names(tuple(WORKLOADS)), help="light,heavy,mixed")
    p.add_argument("--paths", type=_names(PATHS), help="dlq,main")
    p.add_argument("--workers", type=_ints(1), help="worker counts to sweep; default 1,2,4,8")
    p.add_argument(
        "--fetch-batches",
        type=_ints(1),
        help="fetch batch sizes; default 64,256 (256 for the full matrix,"
        " the others swept on the dlq path)",
    )
    p.add_argument(
        "--ratio-workers",
        type=int,
        default=2,
        help="worker count of the service in the ratios; default 2",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip baselines (a) and (b)")
    p.add_argument("--steady-seconds", type=float, help="steady phase length; default 4")
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="max seconds to wait for a backlog to settle; default 300",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--nats-url", default="", help="use this NATS server (JetStream) instead of an embedded one"
    )
    p.add_argument(
        "--postgres-dsn",
        default="",
        help="use this PostgreSQL (CREATE DATABASE per run) instead of an embedded one",
    )
    p.add_argument(
        "--durable",
        action="store_true",
        help="embedded PostgreSQL with fsync and synchronous_commit on (production settings)"
        " instead of the test suite's fsync=off",
    )
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    a = p.parse_args(argv)  # fmt: skip
    if a.quick:
        opts = Options(
            messages=120, repeats=1, workers=(2,), fetch_batches=(256,), steady_seconds=1.0,
            steady_min=5, baseline_paths=("dlq",), quick=True, extra=(("light", "dlq", 1, 256),),
        )  # fmt: skip
    else:
        opts = Options()
    for name in ("messages", "repeats", "workloads", "paths", "workers", "fetch_batches",
                 "steady_seconds"):  # fmt: skip
        value = getattr(a, name)
        if value is not None:
            setattr(opts, name, value)
    opts.ratio_workers = a.ratio_workers
    opts.baselines = not a.no_baselines
    opts.settle_timeout = a.settle_timeout
    opts.durable = a.durable
    opts.seed, opts.nats_url, opts.postgres_dsn, opts.out = (
        a.seed,
        a.nats_url,
        a.postgres_dsn,
        a.out,
    )
    if opts.messages < 1 or opts.repeats < 1:
        p.error("--messages and --repeats must be positive")
    opts.dry_run = a.dry_run
    return opts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["metrics"]:
        from bench import metrics

        return metrics.main(args[1:])
    if args[:1] == ["replicas"]:
        from bench import replicas

        return replicas.main(args[1:])
    if args[:1] == ["writepath"]:
        from bench import writepath

        return writepath.main(args[1:])
    if args[:1] == ["exhausted"]:
        from bench import exhausted

        return exhausted.main(args[1:])
    if args[:1] == ["console"]:
        from bench import console

        return console.main(args[1:])
    opts = parse_args(argv)
    # SIGTERM stops a benchmark as Ctrl-C does: through the finally blocks that
    # stop the consumer and the embedded servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    specs = plan(opts)
    if opts.dry_run:
        for s in specs:
            print(f"{s.config_key} r{s.repeat}")
        print(f"{len(specs)} runs")
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{len(specs)} runs; results in {opts.out}/", file=sys.stderr, flush=True)
    t0 = time.monotonic()

    def partial(runs: list[dict[str, object]]) -> None:
        # Results so far, so a long benchmark that is interrupted still reports.
        report.write(report.document(opts, runs, started), opts.out, png=False)

    runs = run_all(opts, after_each=partial)
    doc = report.document(opts, runs, started)
    doc["wall_seconds"] = round(time.monotonic() - t0, 1)
    for path in report.write(doc, opts.out):
        print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(doc))
    failed = [r for r in runs if r.get("error") or r.get("settled") != r.get("preloaded")]
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: servers and consumer stopped; partial report kept", file=sys.stderr)
        sys.exit(130)
