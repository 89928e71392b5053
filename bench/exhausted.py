"""python -m bench exhausted: `dlqproc exhausted` on a big table.

Measures, on embedded PostgreSQL and nats-server (or --postgres-dsn/--nats-url):
- the first page of `list` (50 rows) with no filter and with each single
  filter, and the total count shown under it, on --rows rows (1,000,000);
- the unthrottled bulk replay rate: a job over --replay rows published to a
  JetStream stream, each waiting for its PubAck, settled and audited;
  --replay-repeats jobs, each over rows of its own (never replayed before).

The queries are the ones the command runs (dlqproc.store.exhausted_ops), timed in
process so that Python's start-up is not counted. Figures go to the README;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import psycopg
import uvloop

from dlqproc.broker import Broker
from dlqproc.embedded import NatsServer, PostgresServer
from dlqproc.exhausted import filters
from dlqproc.exhausted.engine import Engine
from dlqproc.store import Store
from dlqproc.store.exhausted_ops import ExhaustedDB

BASES = (
    "v1.chats.upsert",
    "v1.chats.update",
    "v1.messages.upsert",
    "v1.messages.update",
    "v1.contacts.upsert",
    "v1.history.messages",
)
REASONS = ("retries_exhausted", "validation", "not_found", "invalid_tenant", "not_json")


# Server processes whose CPU time a replay is charged with (embedded ones only).
_PIDS: dict[str, int] = {}


def _cpu_seconds(pid: int) -> float | None:
    """CPU time of `pid` and its children, exited ones included (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError, ValueError):
        return None
    for child in children:
        total += round((_cpu_seconds(int(child)) or 0.0) * tick)
    return total / tick


def _cpu() -> dict[str, float | None]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "python": usage.ru_utime + usage.ru_stime,
        **{name: _cpu_seconds(pid) for name, pid in _PIDS.items()},
    }


@contextlib.contextmanager
def _servers(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    homes: list[Path] = []
    with contextlib.ExitStack() as stack:
        dsn, url = args.postgres_dsn, args.nats_url
        if not dsn:
            home = Path(tempfile.mkdtemp(prefix="dlqproc-bench-pg-"))
            homes.append(home)
            pg = stack.enter_context(PostgresServer(home / "data"))
            dsn = pg.dsn
            if pg.pid is not None:
                _PIDS["postgres"] = pg.pid
        if not url:
            home = Path(tempfile.mkdtemp(prefix="dlqproc-bench-nats-"))
            homes.append(home)
            ns = stack.enter_context(NatsServer(home))
            url = ns.url
            if ns.pid is not None:
                _PIDS["nats"] = ns.pid
        try:
            yield dsn, url
        finally:
            stack.close()
            for h in homes:
                shutil.rmtree(h, ignore_errors=True)


async def _migrate(dsn: str) -> None:
    store = Store(dsn, 600.0, ())
    try:
        await store.migrate()
    finally:
        await store.close()


def _fill(dsn: str, rows: int, replay_rows: int, jobs: int = 1) -> None:
    """`rows` rows over 200 tenants, six subjects, five reasons and 30 days; 10% resolved,
    5% replayed; then `replay_rows` more for each of the tenants `bench0`, `bench1`, ...
    (one a replay job)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute(
            "INSERT INTO exhausted_events (created_at, company_id, source_subject, last_error,"
            " retry_count, dlq_payload, original_payload, reason, dlq_stream, dlq_sequence,"
            " payload_digest, resolved, resolved_at, replay_count, replayed_at)"
            " SELECT now() - (g::float8 * 2592000 / %(n)s) * interval '1 second',"
            "  't' || (g %% 200),"
            "  (%(bases)s::text[])[1 + g %% 6] || '.t' || (g %% 200),"
            "  CASE WHEN g %% 1000 = 7 THEN 'upstream timeout while writing row ' || g"
            "       ELSE 'messages row [\"m' || g || '\"] not found' END,"
            "  5, '{}'::jsonb, jsonb_build_object('message_id', 'm' || g, 'status', 'read'),"
            "  (%(reasons)s::text[])[1 + g %% 5], 'bench', g, md5(g::text),"
            "  g %% 10 = 0, CASE WHEN g %% 10 = 0 THEN now() END,"
            "  (g %% 20 = 0)::int, CASE WHEN g %% 20 = 0 THEN now() END"
            " FROM generate_series(1, %(n)s) g",
            {"bases": list(BASES), "reasons": list(REASONS), "n": rows},
        )
        for job in range(jobs):
            conn.execute(
                "INSERT INTO exhausted_events (company_id, source_subject, last_error,"
                " retry_count, dlq_payload, original_payload, reason, dlq_stream, dlq_sequence,"
                " payload_digest)"
                " SELECT %(t)s, 'v1.chats.upsert.' || %(t)s, 'failed', 5, '{}'::jsonb,"
                "  jsonb_build_object('chat_id', 'c' || g, 'agent_id', 'ag1'),"
                "  'retries_exhausted', 'bench-replay', %(n)s * %(job)s + g, md5(g::text)"
                " FROM generate_series(1, %(n)s) g",
                {"n": replay_rows, "t": f"bench{job}", "job": job},
            )
        conn.execute("VACUUM ANALYZE exhausted_events")
        # The fill's dirty pages are written now, not during the timed replays.
        conn.execute("CHECKPOINT")


CASES: dict[str, dict[str, Any]] = {
    "no filter (unresolved)": {},
    "--tenant t42": {"tenant": "t42"},
    "--subject 'v1.messages.*.t42'": {"subject": "v1.messages.*.t42"},
    "--subject 'v1.history.>'": {"subject": "v1.history.>"},
    "--reason validation": {"reasons": ["validation"]},
    "--error timeout": {"error": "timeout"},
    "--since 2h": {"since": "2h"},
    "--until 29d": {"until": "29d"},
    "--resolved": {"state": "resolved"},
    "--all --replayed": {"state": "all", "replayed": True},
    "--never-replayed": {"replayed": False},
    "--tenant t42 --reason not_found --since 7d": {
        "tenant": "t42",
        "reasons": ["not_found"],
        "since": "7d",
    },
}


async def _time(fn: Any, repeats: int) -> tuple[float, Any]:
    took, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = await fn()
        took.append((time.perf_counter() - start) * 1000)
    return statistics.median(took), result


async def _lists(dsn: str, repeats: int) -> list[dict[str, Any]]:
    db = ExhaustedDB(dsn, statement_timeout=600)
    out = []
    try:
        for name, kwargs in CASES.items():
            f = filters.make(now=datetime.now(UTC), **kwargs)
            page_ms, rows = await _time(lambda f=f: db.list_rows(f, 50), repeats)
            count_ms, total = await _time(lambda f=f: db.count(f), repeats)
            out.append(
                {
                    "filter": name,
                    "page_ms": page_ms,
                    "rows": len(rows),
                    "count_ms": count_ms,
                    "total": total,
                }
            )
            print(f"{name:45} page {page_ms:8.1f} ms  count {count_ms:8.1f} ms ({total})")
    finally:
        await db.close()
    return out


async def _replays(dsn: str, url: str, jobs: int) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name="BENCH_EVENTS", subjects=["v1.chats.upsert.*"])
    finally:
        await nc.close()
    return [await _replay(dsn, url, f"bench{job}") for job in range(jobs)]


async def _replay(dsn: str, url: str, tenant: str) -> dict[str, Any]:
    db = ExhaustedDB(dsn, statement_timeout=600)
    broker = await Broker.connect(url, name="bench-replay")
    try:
        f = filters.make(now=datetime.now(UTC), tenant=tenant)
        job = await db.create_job(
            f, actor="bench", target="source", resolve=False, include_resolved=False,
            rate=None, max_rows=None, note=None,
        )  # fmt: skip
        engine = Engine(db, broker, dlq_subject="v1.dlq")
        cpu_before = _cpu()
        start = time.perf_counter()
        final = await engine.run(job)
        seconds = time.perf_counter() - start
        cpu_after = _cpu()
    finally:
        await broker.close()
        await db.close()
    rate = final.published / seconds
    # The machine may be shared: its load says how much of it the job had, and
    # the CPU time per event is what the job cost whatever the load.
    load = os.getloadavg()[0]
    per_event = {
        name: round((after - before) * 1e6 / max(final.published, 1))
        for name, after in cpu_after.items()
        if after is not None and (before := cpu_before.get(name)) is not None
    }
    print(
        f"replay: {final.published} published in {seconds:.1f} s = {rate:,.0f} events/s"
        f" (load average {load:.1f}; CPU µs/event {per_event})"
    )
    return {
        "published": final.published,
        "seconds": seconds,
        "events_per_s": rate,
        "load_average_1m": load,
        "cpu_us_per_event": per_event,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench exhausted", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--replay", type=int, default=50_000, help="rows a replay job publishes")
    p.add_argument("--replay-repeats", type=int, default=3, help="replay jobs, one after another")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--postgres-dsn", default="")
    p.add_argument("--nats-url", default="")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    with _servers(args) as (dsn, url):
        asyncio.run(_migrate(dsn))
        start = time.perf_counter()
        _fill(dsn, args.rows, args.replay, args.replay_repeats)
        filled = args.rows + args.replay * args.replay_repeats
        print(f"filled {filled} rows in {time.perf_counter() - start:.0f} s")
        lists = asyncio.run(_lists(dsn, args.repeats))
        replays = uvloop.run(_replays(dsn, url, args.replay_repeats))
    rates = [r["events_per_s"] for r in replays]
    print(f"replay: median {statistics.median(rates):,.0f} events/s of {len(rates)} jobs")
    results = {
        "rows": args.rows,
        "list": lists,
        "replay": replays,
        "replay_median_events_per_s": statistics.median(rates),
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
