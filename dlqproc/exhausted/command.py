"""`dlqproc exhausted ...`: the terminal front of the exhausted-events layer.

Only argument handling, confirmation (dry runs), progress and printing live
here; queries, jobs and the audit trail are dlqproc.exhausted's db and engine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TextIO

from dlqproc import redact
from dlqproc.config import Config
from dlqproc.exhausted import filters, progress, render
from dlqproc.exhausted.engine import Engine
from dlqproc.exhausted.filters import Filter, FilterError, State
from dlqproc.store.exhausted_ops import DBUnavailable, ExhaustedDB, Job, JobBusy

DEFAULT_RATE = 100.0  # events a second: modest next to the service's thousands
SAMPLE = 10


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "exhausted",
        help="find, inspect, replay and resolve exhausted events",
        description="Operate exhausted_events: list, show, stats, replay (one or in bulk,"
        " resumable), jobs, resolve, unresolve, annotate, purge. Every action is audited.",
    )
    ops = p.add_subparsers(dest="op", required=True)

    ls = ops.add_parser("list", help="rows matching the filters, newest first")
    _filter_args(ls, ids=False)
    ls.add_argument("--limit", type=_positive_int, default=50, help="rows per page (default 50)")
    ls.add_argument("--after", type=_positive_int, metavar="ID", help="the page after this id")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    show = ops.add_parser("show", help="every column of a row, its history and replay chain")
    show.add_argument("id", type=_positive_int)
    show.add_argument("--json", action="store_true")

    st = ops.add_parser("stats", help="unresolved counts, oldest ages, exhaustions per hour")
    st.add_argument("--json", action="store_true")

    rp = ops.add_parser("replay", help="publish rows again (ids, or a filter as a job)")
    _filter_args(rp, ids=True)
    rp.add_argument(
        "--to-dlq", action="store_true", help="publish a fresh DLQ envelope (a new retry budget)"
    )
    rp.add_argument("--resolve", action="store_true", help="resolve each row once acknowledged")
    rp.add_argument("--include-resolved", action="store_true", help="replay resolved rows too")
    rp.add_argument("--yes", action="store_true", help="run a filter replay (else a dry run)")
    rp.add_argument(
        "--rate",
        type=_positive_float,
        default=DEFAULT_RATE,
        help=f"publishes per second (default {DEFAULT_RATE:g})",
    )
    rp.add_argument("--unlimited", action="store_true", help="no rate limit (benchmarks)")
    rp.add_argument("--max", type=_positive_int, dest="max_rows", help="replay at most N rows")
    rp.add_argument("--resume", type=_positive_int, metavar="JOB", help="continue a job")
    rp.add_argument("--note", help="recorded with each replay in the audit trail")
    _actor_arg(rp)
    rp.add_argument("--quiet", action="store_true", help="no progress bar or lines")

    jobs = ops.add_parser("jobs", help="replay jobs, newest first")
    jobs.add_argument("--limit", type=_positive_int, default=20)
    jobs.add_argument("--json", action="store_true")

    for name, what in (
        ("resolve", "mark rows resolved (a note is required)"),
        ("unresolve", "mark rows unresolved again"),
        ("annotate", "add a note to rows"),
    ):
        a = ops.add_parser(name, help=what)
        _filter_args(a, ids=True)
        a.add_argument("--note", required=name != "unresolve", help="the note (audited)")
        a.add_argument("--yes", action="store_true", help="act on a filter (else a dry run)")
        _actor_arg(a)

    pg = ops.add_parser("purge", help="delete old resolved rows, in batches, audited")
    pg.add_argument(
        "--resolved", action="store_true", required=True, help="required: only resolved rows"
    )
    pg.add_argument("--older-than", required=True, help="resolved longer ago than this (90d)")
    pg.add_argument("--tenant")
    pg.add_argument("--yes", action="store_true", help="delete (else a dry run)")
    pg.add_argument("--note")
    _actor_arg(pg)


def _filter_args(p: argparse.ArgumentParser, ids: bool) -> None:
    if ids:
        p.add_argument("ids", nargs="*", metavar="ID", help="row ids (else the filters)")
    p.add_argument("--tenant", help="company_id, exactly")
    p.add_argument("--subject", help="source subject pattern (NATS: * one token, > the rest)")
    p.add_argument("--reason", action="append", help="classified reason (repeatable)")
    p.add_argument("--error", metavar="TEXT", help="case-insensitive substring of last_error")
    p.add_argument("--since", help="exhausted since: a duration (2h, 7d) or an ISO time")
    p.add_argument("--until", help="exhausted before: a duration or an ISO time")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--unresolved", dest="state", action="store_const", const="unresolved")
    state.add_argument("--resolved", dest="state", action="store_const", const="resolved")
    state.add_argument("--all", dest="state", action="store_const", const="all")
    replayed = p.add_mutually_exclusive_group()
    replayed.add_argument("--replayed", dest="replayed", action="store_const", const=True)
    replayed.add_argument("--never-replayed", dest="replayed", action="store_const", const=False)
    p.add_argument(
        "--hide-superseded",
        action="store_true",
        help="leave out rows whose replay failed again (the newer row stands for them)",
    )


def _actor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--actor", help="who acts, for the audit trail (default: the OS user)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def os_user() -> str:
    # From the password database, not the environment (config alone reads it).
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid:{os.getuid()}"


def build_filter(args: argparse.Namespace, now: datetime, default_state: State) -> Filter:
    ids = list(getattr(args, "ids", None) or [])
    state: State = args.state or ("all" if ids else default_state)
    return filters.make(
        now=now,
        ids=ids,
        tenant=args.tenant,
        subject=args.subject,
        reasons=args.reason,
        error=args.error,
        since=args.since,
        until=args.until,
        state=state,
        replayed=args.replayed,
        hide_superseded=args.hide_superseded,
    )


def run(args: argparse.Namespace, cfg: Config, secrets: redact.Secrets) -> int:
    out = sys.stdout

    def fail(message: str, code: int = 2) -> int:
        print(f"dlqproc exhausted {args.op}: {secrets.scrub(message)}", file=sys.stderr)
        return code

    problem = redact.dsn_problem(cfg.postgres.dsn)
    if problem is not None:
        return fail(f"invalid config postgres.dsn: {problem}")
    try:
        import uvloop

        return uvloop.run(_run(args, cfg, out))
    except FilterError as exc:
        return fail(str(exc))
    except DBUnavailable as exc:
        return fail(str(exc), 1)
    except JobBusy as exc:
        return fail(str(exc), 1)
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, cfg: Config, out: TextIO) -> int:
    now = filters.utcnow()
    db = ExhaustedDB(cfg.postgres.dsn)
    try:
        if not await db.ready():
            print(
                "dlqproc exhausted: the database lacks migration 003; run `dlqproc migrate`",
                file=sys.stderr,
            )
            return 1
        handler: Callable[[], Awaitable[int]] = {
            "list": lambda: _list(db, args, now, out),
            "show": lambda: _show(db, args, now, out),
            "stats": lambda: _stats(db, args, now, out),
            "jobs": lambda: _jobs(db, args, now, out),
            "replay": lambda: _replay(db, args, cfg, now, out),
            "resolve": lambda: _act(db, args, now, out),
            "unresolve": lambda: _act(db, args, now, out),
            "annotate": lambda: _act(db, args, now, out),
            "purge": lambda: _purge(db, args, now, out),
        }[args.op]
        return await handler()
    finally:
        await db.close()


def _lines(out: TextIO, lines: list[str]) -> None:
    out.write("".join(line + "\n" for line in lines))


async def _list(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    f = build_filter(args, now, "unresolved")
    rows = await db.list_rows(f, args.limit, args.after)
    total = await db.count(f)
    if args.json:
        _lines(out, [render.row_json(r) for r in rows])
        print(f'{{"total": {total}}}', file=out)
        return 0
    if rows:
        _lines(out, render.rows_table(rows, now))
    more = f"; next page: --after {rows[-1].id}" if len(rows) == args.limit else ""
    print(f"{len(rows)} shown of {total} matching{more}", file=out)
    return 0


async def _show(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    d = await db.get(args.id)
    if d is None:
        print(f"dlqproc exhausted show: no row {args.id}", file=sys.stderr)
        return 1
    history = await db.history(args.id)
    chain = await db.chain(args.id)
    if args.json:
        print(render.detail_json(d, history, chain), file=out)
    else:
        _lines(out, render.detail(d, history, chain, now))
    return 0


async def _stats(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    s = await db.stats(now)
    if args.json:
        import msgspec

        print(msgspec.json.encode(s).decode(), file=out)
    else:
        _lines(out, render.stats_lines(s, now))
    return 0


async def _jobs(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    jobs = await db.jobs(args.limit)
    if args.json:
        _lines(out, [render.job_json(j) for j in jobs])
    else:
        _lines(out, render.jobs_table(jobs, now))
    return 0


async def _dry_run(db: ExhaustedDB, f: Filter, now: datetime, out: TextIO, what: str) -> int:
    total = await db.count(f)
    sample = await db.list_rows(f, SAMPLE)
    print(f"dry run: {what} would apply to {total} rows ({f.describe() or 'no filter'})", file=out)
    if sample:
        _lines(out, render.rows_table(sample, now))
    print("run again with --yes to do it", file=out)
    return 0


async def _act(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    defaults: dict[str, State] = {"resolve": "unresolved", "unresolve": "resolved"}
    default = defaults.get(args.op, "all")
    f = build_filter(args, now, default)
    if not f.ids and not args.yes:
        return await _dry_run(db, f, now, out, args.op)
    note = filters.parse_note(args.note) if args.note is not None else None
    n = await db.act(args.op, f, args.actor or os_user(), note)
    print(f"{args.op}: {n} rows", file=out)
    return 0


async def _purge(db: ExhaustedDB, args: argparse.Namespace, now: datetime, out: TextIO) -> int:
    age = filters.parse_duration("--older-than", args.older_than)
    f = filters.make(now=now, tenant=args.tenant, state="resolved")
    if not args.yes:
        n = await db.purge_count(f, age)
        print(
            f"dry run: purge would delete {n} resolved rows older than {args.older_than}", file=out
        )
        print("run again with --yes to do it", file=out)
        return 0
    note = filters.parse_note(args.note) if args.note is not None else None
    n = await db.purge(f, age, args.actor or os_user(), note)
    print(f"purged {n} rows", file=out)
    return 0


async def _replay(
    db: ExhaustedDB, args: argparse.Namespace, cfg: Config, now: datetime, out: TextIO
) -> int:
    from dlqproc.broker import Broker

    actor = args.actor or os_user()
    if args.resume is not None:
        job = await db.job(args.resume)
        if job is None:
            print(f"dlqproc exhausted replay: no job {args.resume}", file=sys.stderr)
            return 1
        if job.state in ("done", "failed"):
            print(f"job {job.id} is already {job.state}", file=out)
            return 0
        await db.lock_job(job.id)
    else:
        f = build_filter(args, now, "all" if args.include_resolved else "unresolved")
        if not f.ids and not args.yes:
            return await _dry_run(db, f, now, out, "replay")
        note = filters.parse_note(args.note) if args.note is not None else None
        job = await db.create_job(
            f,
            actor=actor,
            target="dlq" if args.to_dlq else "source",
            resolve=args.resolve,
            include_resolved=args.include_resolved,
            rate=None if args.unlimited else args.rate,
            max_rows=args.max_rows,
            note=note,
        )
    total = await db.count(job.filter)
    if job.max_rows is not None:
        total = min(total, job.max_rows)
    print(
        f"replay job {job.id}: {total} rows match ({job.filter.describe() or 'no filter'}),"
        f" target {job.target}, rate {f'{job.rate:g}/s' if job.rate else 'unlimited'}",
        file=sys.stderr,
    )
    bar = None if args.quiet else progress.for_stream(sys.stderr, job.id, total)
    broker = await Broker.connect(cfg.nats.url, name="dlqproc-replay", timeout=30.0)
    engine = Engine(db, broker, dlq_subject=cfg.nats.dlq_subject, on_progress=bar)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, engine.stop)
    try:
        final = await engine.run(job)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await broker.close()
        if bar is not None:
            bar.end()
    _summary(final, out)
    refused = await db.job_items(final.id, "refused")
    for row_id, _, why in refused[:SAMPLE]:
        print(f"  refused {row_id}: {render.safe(why, 200)}", file=out)
    if len(refused) > SAMPLE:
        print(f"  ... and {len(refused) - SAMPLE} more refused", file=out)
    if final.state == "stopped":
        print(f"stopped; continue with: dlqproc exhausted replay --resume {final.id}", file=out)
        return 130
    return 0 if final.failed == 0 and final.uncertain == 0 else 1


def _summary(job: Job, out: TextIO) -> None:
    print(
        f"job {job.id} {job.state}: published {job.published}, refused {job.refused},"
        f" failed {job.failed}, skipped {job.skipped}, uncertain {job.uncertain}",
        file=out,
    )
