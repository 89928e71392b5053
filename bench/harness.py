"""One benchmark run, and the plan of runs.

A run: fresh streams and a fresh database; PRELOAD the workload (published and
acknowledged by JetStream before anything consumes); start the consumer as a
child process (the real `python -m dlqproc run`, or baseline (a)); wait until
every message is settled; then a short steady phase at a fixed rate; stop.

Measures (see bench/README.md):
- backlog throughput: messages settled / seconds from the ready log line to
  the last final ACK/TERM; rows/s over the same window;
- latency publish -> final ACK/TERM, from a core-NATS subscription to
  `$JS.ACK.<stream>.>` (the replies the consumer sends) and the publish times;
- CPU seconds per message (supervisor, workers) from /proc/<pid>/stat over the
  backlog window, and peak RSS (VmHWM) just before stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg
from psycopg import sql

from bench import procs
from bench.workloads import TENANTS, WORKLOADS, Item, iter_sizes
from dlqproc import config, topology
from dlqproc.broker import Broker, ack_fields
from dlqproc.demo import TABLES
from dlqproc.embedded import NatsServer, PostgresServer, free_port
from dlqproc.publish import RateLimiter

PUBLISH_CONCURRENCY = 256
_ids = itertools.count(1)


@dataclass
class Options:
    messages: int = 5000
    repeats: int = 3
    workloads: tuple[str, ...] = ("light", "heavy", "mixed")
    paths: tuple[str, ...] = ("dlq", "main")
    workers: tuple[int, ...] = (1, 2, 4, 8)
    fetch_batches: tuple[int, ...] = (64, 256)
    ratio_workers: int = 2
    baselines: bool = True
    # Paths on which the baselines run (baseline (a) only ever reads the DLQ).
    baseline_paths: tuple[str, ...] = ("dlq", "main")
    steady_min: int = 10  # messages in the steady phase, at least
    steady_seconds: float = 4.0
    settle_timeout: float = 300.0
    seed: int = 7
    nats_url: str = ""
    postgres_dsn: str = ""
    # The embedded PostgreSQL with fsync and synchronous commit on, as in
    # production, instead of the test suite's fsync=off.
    durable: bool = False
    out: Path = Path("bench/results")
    quick: bool = False
    dry_run: bool = False
    # Extra (workload, path, workers, fetch_batch) service runs (quick mode's sweep).
    extra: tuple[tuple[str, str, int, int], ...] = ()

    @property
    def primary_fetch_batch(self) -> int:
        """The fetch batch of the workload x path x workers matrix (dlqproc's default)."""
        return 256 if 256 in self.fetch_batches else self.fetch_batches[0]


@dataclass(frozen=True)
class Spec:
    """What one run consumes with what."""

    workload: str
    path: str  # "dlq" | "main"
    # "service" | "inline" (baseline b, nats.dlqWorkers=0) | "baseline_a" | "baseline_c"
    mode: str
    workers: int
    fetch_batch: int
    repeat: int

    @property
    def config_key(self) -> str:
        return f"{self.workload}/{self.path}/{self.mode}/w{self.workers}/fb{self.fetch_batch}"


def plan(opts: Options) -> list[Spec]:
    """Every run, repeats interleaved so drift over time hits every configuration alike."""
    fb0 = opts.primary_fetch_batch
    specs: list[Spec] = []
    for r in range(opts.repeats):
        for wl in opts.workloads:
            for path in opts.paths:
                if opts.baselines and path in opts.baseline_paths:
                    if path == "dlq":
                        specs.append(Spec(wl, path, "baseline_a", 0, fb0, r))
                        specs.append(Spec(wl, path, "baseline_c", 0, fb0, r))
                    specs.append(Spec(wl, path, "inline", 0, fb0, r))
                for w in opts.workers:
                    specs.append(Spec(wl, path, "service", w, fb0, r))
                if path == "dlq":
                    for fb in opts.fetch_batches:
                        if fb != fb0:
                            for w in opts.workers:
                                specs.append(Spec(wl, path, "service", w, fb, r))
        for wl, path, w, fb in opts.extra:
            specs.append(Spec(wl, path, "service", w, fb, r))
    seen: set[tuple[str, int]] = set()
    unique = []
    for s in specs:
        if (s.config_key, s.repeat) not in seen:
            seen.add((s.config_key, s.repeat))
            unique.append(s)
    return unique


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def servers(opts: Options) -> Iterator[tuple[str, str, ServerPids]]:
    """(nats url, postgres dsn, pids): given or embedded servers, stopped on exit.

    A server given by URL or DSN has no pid: its CPU cannot be read.
    """
    homes: list[Path] = []
    started: list[NatsServer | PostgresServer] = []
    try:
        url, dsn = opts.nats_url, opts.postgres_dsn
        pids = ServerPids()
        if not url:
            home = Path(tempfile.mkdtemp(prefix="dlqproc-bench-nats-"))
            homes.append(home)
            nats_server = NatsServer(home)
            started.append(nats_server)
            nats_server.start()
            url, pids.nats = nats_server.url, nats_server.pid
        if not dsn:
            # Outside pytest's temp root: PostgreSQL runs as an unprivileged
            # user and must traverse every parent folder.
            home = Path(tempfile.mkdtemp(prefix="dlqproc-bench-pg-"))
            homes.append(home)
            pg = PostgresServer(home / "data", durable=opts.durable)
            started.append(pg)
            pg.start()
            dsn, pids.postgres = pg.dsn, pg.pid
        yield url, dsn, pids
    finally:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)


@dataclass
class ServerPids:
    postgres: int | None = None  # the postmaster
    nats: int | None = None


def _per_msg(before: float | None, after: float | None, settled: float) -> float | None:
    if before is None or after is None:
        return None
    return round((after - before) * 1000 / settled, 4)


def _with_db(dsn: str, db: str) -> str:
    base, sep, tail = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + db + (sep + tail if sep else "")


# --------------------------------------------------------------------------- ACK tracking


class AckTracker:
    """Every ACK/NAK/TERM the consumer sends, from `$JS.ACK.<stream>.>`.

    Reply subject tokens after the consumer name: delivered count, stream
    sequence, consumer sequence, timestamp, pending. A +ACK or +TERM is final.
    """

    def __init__(self) -> None:
        self.final: dict[tuple[str, int], float] = {}
        self.naks = 0
        self.terms = 0
        self._subs: list[Any] = []

    async def subscribe(self, nc: Client, streams: Sequence[str]) -> None:
        for stream in streams:
            self._subs.append(await nc.subscribe(f"$JS.ACK.{stream}.>", cb=self._on_reply))
        await nc.flush()

    async def _on_reply(self, msg: Msg) -> None:
        now = time.monotonic()
        fields = ack_fields(msg.subject)
        if fields is None:
            return
        stream, seq = fields[0], fields[3]
        data = msg.data
        if data.startswith((b"+ACK", b"+TERM")) or not data:
            self.final[(stream, seq)] = now
            if data.startswith(b"+TERM"):
                self.terms += 1
        elif data.startswith(b"-NAK"):
            self.naks += 1

    async def close(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


@dataclass
class Published:
    sent: dict[tuple[str, int], float] = field(default_factory=dict)
    failed: int = 0


async def publish(
    nc: Client, items: Sequence[Item], rate: float | None = None, out: Published | None = None
) -> Published:
    """Publish and wait for JetStream's acks; note each message's send time by (stream, seq)."""
    js = nc.jetstream()
    out = out or Published()
    slots = asyncio.Semaphore(PUBLISH_CONCURRENCY)
    limiter = RateLimiter(rate) if rate else None
    tasks: set[asyncio.Task[None]] = set()

    async def one(subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        try:
            sent = time.monotonic()
            ack = await js.publish(subject, body, headers=headers, timeout=30)
            out.sent[(ack.stream, int(ack.seq))] = sent
        except Exception:
            out.failed += 1
        finally:
            slots.release()

    for subject, body, headers in items:
        if limiter is not None:
            await limiter.acquire()
        await slots.acquire()
        task = asyncio.create_task(one(subject, body, headers))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return out


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        # nearest-rank percentile
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "p50": round(at(0.50) * 1000, 2),
        "p95": round(at(0.95) * 1000, 2),
        "p99": round(at(0.99) * 1000, 2),
        "max": round(ordered[-1] * 1000, 2),
    }


# --------------------------------------------------------------------------- one run


class RunError(Exception):
    pass


class Run:
    def __init__(
        self,
        spec: Spec,
        opts: Options,
        nats_url: str,
        dsn: str,
        logs: Path,
        pids: ServerPids | None = None,
    ) -> None:
        self.spec, self.opts, self.nats_url = spec, opts, nats_url
        self.pids = pids or ServerPids()
        rid = f"{os.getpid()}_{next(_ids)}"
        self.db = f"bench_{rid}"
        self.server_dsn = dsn
        self.dsn = _with_db(dsn, self.db)
        self.dlq_stream = f"bench_dlq_{rid}"
        self.dlq_subject = f"bench{rid}.dlq"
        self.rt_stream = f"bench_rt_{rid}"
        self.hist_stream = f"bench_hist_{rid}"
        self.log_path = logs / f"{rid}-{spec.workload}-{spec.path}-{spec.mode}-w{spec.workers}.log"
        main = spec.path == "main"
        self.env = {
            **os.environ,
            "NATS_URL": nats_url,
            "POSTGRES_DSN": self.dsn,
            "SERVER_HOST": "127.0.0.1",
            "SERVER_PORT": str(free_port()),
            "LOG_LEVEL": "INFO",
            "HANDLERS_MODULE": "dlqproc.handlers.whatsapp",
            "NATS_DLQSTREAM": self.dlq_stream,
            "NATS_DLQSUBJECT": self.dlq_subject,
            "NATS_DLQWORKERS": str(spec.workers),
            "NATS_DLQFETCHBATCH": str(spec.fetch_batch),
            "NATS_REALTIME_ENABLED": "true" if main else "false",
            "NATS_HISTORICAL_ENABLED": "true" if main else "false",
            "NATS_REALTIME_STREAM": self.rt_stream,
            "NATS_HISTORICAL_STREAM": self.hist_stream,
            "NATS_REALTIME_FETCHBATCH": str(spec.fetch_batch),
            "NATS_HISTORICAL_FETCHBATCH": str(spec.fetch_batch),
            # Fast retries (every workload gets the same config; only mixed retries).
            "NATS_DLQBASEDELAYMINUTES": "0.005",
            "NATS_DLQMAXDELAYMINUTES": "0.02",
            "NATS_REALTIME_NAKBASEDELAY": "100ms",
            "NATS_REALTIME_NAKMAXDELAY": "1s",
            "NATS_HISTORICAL_NAKBASEDELAY": "100ms",
            "NATS_HISTORICAL_NAKMAXDELAY": "1s",
            # Not measured; bounds a stop (the service may wait the whole grace).
            "NATS_SHUTDOWNGRACE": "3s",
        }
        for key in ("COMPANY_ID", "PROMETHEUS_MULTIPROC_DIR", "SERVER_METRICSDIR"):
            self.env.pop(key, None)
        self.cfg = config.load(environ=self.env)
        self.child: procs.Child | None = None

    # -- topology and database

    def consumers(self) -> list[tuple[str, str]]:
        out = [(self.cfg.nats.dlq_stream, self.cfg.dlq_durable)]
        if self.spec.path == "main":
            n = self.cfg.nats
            out += [(n.realtime.stream, self.cfg.durable(n.realtime))]
            out += [(n.historical.stream, self.cfg.durable(n.historical))]
        return out

    async def create_topology(self) -> None:
        """The streams and consumers exactly as dlqproc declares them (topology.py).

        Created before preloading: the history stream has interest retention,
        so it keeps only messages published while a consumer exists.
        """
        broker = await Broker.connect(self.nats_url, name="bench-setup")
        try:
            cfg = self.cfg
            await broker.ensure_stream(topology.dlq_stream(cfg), reconcile=True)
            await broker.ensure_consumer(topology.dlq_consumer(cfg))
            if self.spec.path == "main":
                for main, hist in ((cfg.nats.realtime, False), (cfg.nats.historical, True)):
                    changes = await broker.ensure_stream(
                        topology.events_stream(main, hist), reconcile=False
                    )
                    if any("differs" in c for c in changes):
                        raise RunError(f"stream {main.stream} exists with another config")
                    await broker.ensure_consumer(topology.events_consumer(cfg, main, hist))
        except Exception as exc:
            if "subjects overlap" in str(exc):
                raise RunError(
                    "another stream on this NATS server already holds the events subjects"
                    " (v1.messages.upsert.* ...): the main path needs a server without it"
                ) from exc
            raise
        finally:
            await broker.close()

    async def delete_topology(self, nc: Client) -> None:
        js = nc.jetstream()
        for stream in (self.dlq_stream, self.rt_stream, self.hist_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)

    def create_db(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            db = sql.Identifier(self.db)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(db))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(db))

    def drop_db(self) -> None:
        with psycopg.connect(self.server_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.db))
            )

    def count_rows(self) -> tuple[int, int]:
        """(rows in the tenants' tables, rows in exhausted_events)."""
        total = 0
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for tenant in TENANTS:
                for table in TABLES:
                    try:
                        got = conn.execute(
                            sql.SQL("SELECT count(*) FROM {}").format(
                                sql.Identifier(f"daisi_{tenant}", table)
                            )
                        ).fetchone()
                    except psycopg.errors.UndefinedTable:
                        continue
                    total += int(got[0]) if got else 0
            try:
                got = conn.execute("SELECT count(*) FROM public.exhausted_events").fetchone()
                exhausted = int(got[0]) if got else 0
            except psycopg.errors.UndefinedTable:
                exhausted = 0
        return total, exhausted

    # -- waiting

    async def consumers_idle(self, nc: Client) -> bool:
        js = nc.jetstream()
        for stream, durable in self.consumers():
            info = await js.consumer_info(stream, durable)
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    async def wait_settled(
        self, nc: Client, tracker: AckTracker, keys: set[tuple[str, int]], timeout: float
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child is not None and self.child.poll() is not None:
                raise RunError(
                    f"consumer exited with code {self.child.poll()}:\n{self.child.log_tail()}"
                )
            if keys.issubset(tracker.final.keys()) and await self.consumers_idle(nc):
                return True
            await asyncio.sleep(0.1)
        return False

    # -- the run

    def server_cpu(self) -> tuple[float | None, float | None]:
        """CPU seconds so far of (PostgreSQL, nats-server), where they are ours."""
        pg, nats_pid = self.pids.postgres, self.pids.nats
        return (
            None if pg is None else procs.tree_cpu_seconds(pg),
            None if nats_pid is None else procs.cpu_seconds(nats_pid),
        )

    async def execute(self) -> dict[str, Any]:
        spec, opts = self.spec, self.opts
        wl = WORKLOADS[spec.workload]
        n = wl.count(opts.messages)
        result: dict[str, Any] = {
            "config": spec.config_key,
            "workload": spec.workload,
            "path": spec.path,
            "mode": spec.mode,
            "workers": spec.workers,
            "fetch_batch": spec.fetch_batch,
            "repeat": spec.repeat,
            "preloaded": 0,
            "settled": 0,
            "error": None,
            "log": str(self.log_path),
        }
        phases: dict[str, float] = {}
        result["phase_seconds"] = phases
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[name] = round(now - mark, 2)
            mark = now

        items = wl.items(spec.path, n, opts.seed, self.dlq_subject)
        sizes = list(iter_sizes(items))
        result["body_bytes_mean"] = round(statistics.fmean(sizes))
        self.create_db()
        phase("generate_and_create_db")
        nc = await nats.connect(self.nats_url, name="bench", connect_timeout=10)
        tracker = AckTracker()
        try:
            await self.create_topology()
            await tracker.subscribe(nc, [self.dlq_stream, self.rt_stream, self.hist_stream])
            pub = await publish(nc, items)
            if pub.failed:
                raise RunError(f"{pub.failed} preload publishes failed")
            preload = set(pub.sent)
            result["preloaded"] = len(preload)
            phase("preload")
            await self._start()
            assert self.child is not None
            ready_at = await asyncio.to_thread(self.child.wait_ready, 120.0)
            cpu0 = self.child.ready_cpu
            servers0 = self.server_cpu()
            phase("start_to_ready")
            ok = await self.wait_settled(nc, tracker, preload, opts.settle_timeout)
            cpu1 = self.child.cpu()
            servers1 = self.server_cpu()
            phase("backlog")
            result["settled"] = sum(1 for k in preload if k in tracker.final)
            if not ok:
                raise RunError(
                    f"not settled within {opts.settle_timeout:g}s:"
                    f" {result['settled']}/{len(preload)} preloaded messages"
                )
            drained_at = max(tracker.final.values())
            seconds = max(drained_at - ready_at, 1e-6)
            rows, exhausted = await asyncio.to_thread(self.count_rows)
            settled = result["settled"]
            result.update(
                seconds=round(seconds, 3),
                msgs_per_s=round(settled / seconds, 1),
                rows=rows,
                rows_per_s=round(rows / seconds, 1),
                exhausted=exhausted,
                naks=tracker.naks,
                terms=tracker.terms,
                latency_backlog_ms=percentiles([tracker.final[k] - pub.sent[k] for k in preload]),
                cpu={
                    "supervisor_s": round(cpu1[0] - cpu0[0], 3),
                    "workers_s": round(cpu1[1] - cpu0[1], 3),
                    "supervisor_ms_per_msg": round((cpu1[0] - cpu0[0]) * 1000 / settled, 4),
                    "workers_ms_per_msg": round((cpu1[1] - cpu0[1]) * 1000 / settled, 4),
                    "total_ms_per_msg": round(
                        (cpu1[0] + cpu1[1] - cpu0[0] - cpu0[1]) * 1000 / settled, 4
                    ),
                    # The servers share the cores: what each message costs them.
                    "postgres_ms_per_msg": _per_msg(servers0[0], servers1[0], settled),
                    # Per row in the tables (an upsert of an existing key counts once).
                    "postgres_us_per_row": _per_msg(servers0[0], servers1[0], max(rows, 1) / 1000),
                    # How much of the backlog window PostgreSQL was busy: the rest
                    # it sat idle, waiting for rows (overlap, bench/README.md).
                    "postgres_busy": None
                    if servers0[0] is None or servers1[0] is None
                    else round((servers1[0] - servers0[0]) / seconds, 3),
                    "nats_ms_per_msg": _per_msg(servers0[1], servers1[1], settled),
                },
            )
            result["steady"] = await self._steady(nc, tracker, settled / seconds)
            phase("steady")
            sup_rss, workers_rss = self.child.rss()
            result["rss_mb"] = {
                "supervisor": round(sup_rss, 1),
                "worker_max": round(max(workers_rss), 1) if workers_rss else None,
                "workers": [round(w, 1) for w in workers_rss],
            }
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            if self.child is not None:
                code = await asyncio.to_thread(self.child.stop, 30.0)
                result["exit_code"] = code
                result["worker_restarts"] = self.child.log_text().count('"worker lost')
                phase("stop")
            await tracker.close()
            await self.delete_topology(nc)
            with contextlib.suppress(Exception):
                await nc.close()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.drop_db)
            phase("cleanup")
        return result

    async def _start(self) -> None:
        if self.spec.mode == "baseline_a":
            argv = procs.python_argv("-m", "bench.baseline")
        elif self.spec.mode == "baseline_c":
            argv = procs.python_argv("-m", "bench.baseline", "--batched")
        else:
            argv = procs.python_argv("-m", "dlqproc", "run")
        self.child = procs.Child(argv, self.env, self.log_path, procs.READY_LINE).start()

    async def _steady(self, nc: Client, tracker: AckTracker, throughput: float) -> dict[str, Any]:
        """Publish at ~50% of the measured throughput for a few seconds; latency to final ACK."""
        wl = WORKLOADS[self.spec.workload]
        rate = max(1.0, 0.5 * throughput)
        count = max(self.opts.steady_min, round(rate * self.opts.steady_seconds))
        items = wl.items(self.spec.path, count, self.opts.seed + 1, self.dlq_subject)
        pub = await publish(nc, items, rate=rate)
        keys = set(pub.sent)
        timeout = max(60.0, self.opts.settle_timeout / 2)
        ok = await self.wait_settled(nc, tracker, keys, timeout)
        done = [k for k in keys if k in tracker.final]
        out: dict[str, Any] = {
            "rate": round(rate, 1),
            "published": len(keys),
            "settled": len(done),
            "latency_ms": percentiles([tracker.final[k] - pub.sent[k] for k in done]),
        }
        if not ok or pub.failed:
            out["error"] = f"steady phase: {len(done)}/{len(keys)} settled, {pub.failed} failed"
        return out


def run_all(
    opts: Options,
    progress: Any = sys.stderr,
    after_each: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every planned run against one pair of servers; each run's result, in order."""
    specs = plan(opts)
    results: list[dict[str, Any]] = []
    logs = opts.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with servers(opts) as (url, dsn, pids):
        for i, spec in enumerate(specs, 1):
            started = time.monotonic()
            run = Run(spec, opts, url, dsn, logs, pids)
            result = asyncio.run(run.execute())
            results.append(result)
            if after_each is not None:
                after_each(results)
            wall = time.monotonic() - started
            if result["error"]:
                line = f"ERROR {result['error'][:300]}"
            else:
                steady = result["steady"]["latency_ms"]["p99"]
                line = (
                    f"{result['msgs_per_s']:>9.1f} msg/s {result['rows_per_s']:>9.1f} rows/s"
                    f"  steady p99 {steady} ms"
                )
            print(
                f"[{i}/{len(specs)}] {spec.config_key} r{spec.repeat}: {line} ({wall:.1f}s)",
                file=progress,
                flush=True,
            )
    return results
