"""Micro-benchmark of the ways to write a heavy block into PostgreSQL.

    python -m bench writepath [--blocks 40] [--rows 350] [--repeats 3] [--out DIR]

A heavy block is a v1.history.messages batch of --rows items, turned into rows
by the WhatsApp handler (so the same columns, jsonb values and partitions as
the service writes). Each block is written in its own transaction by:

- jsonb: the store's statement (dlqproc.store.sql) as it was before blocks
  shared values: every row whole, the block one jsonb array read by
  jsonb_populate_recordset;
- copy:  COPY text lines into a temporary staging table, then one
  INSERT ... SELECT ... ON CONFLICT DO UPDATE emptying it (bench/copypath.py);
- unnest: one text[] parameter per column, cast to the column type and
  unnested (the client builds the arrays, so it touches every value; a
  sketch of the statement: it leaves out GREATEST on monotonic columns);
- shared: the service's write path: the store's statement for the blocks the
  workers encode, the columns whose value is the same on every row
  (last_metadata, company_id, agent_id for a history batch) sent once as a
  second jsonb parameter read by jsonb_populate_record (dlqproc.rows);
- shared_jsonb: the same with only the jsonb ones shared (last_metadata),
  the text ones back in the rows.

copy and unnest live in bench/ only: neither lowered PostgreSQL's CPU per
row (bench/README.md, "Write paths"), so the service does not carry them.

Twice each: the rows new (inserts), then the same keys again (conflicts, the
DO UPDATE path). Reported: wall ms per block and PostgreSQL backend CPU µs per
row (utime+stime of the connection's backend from /proc, embedded server).
Methods are interleaved within each repeat, so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from bench import copypath
from dlqproc.embedded import PostgresServer
from dlqproc.envelope import tenant_schema
from dlqproc.generate import Generator
from dlqproc.handlers.whatsapp import HANDLERS, TENANT_DDL
from dlqproc.model import Event, Meta, RowOp, Rows
from dlqproc.rows import encode
from dlqproc.store.sql import block_sql, jsonb, params

_TICK = os.sysconf("SC_CLK_TCK")
TENANT = "bench"
METHODS = ("jsonb", "copy", "unnest", "shared", "shared_jsonb")
# Parts of the two main methods, to see where PostgreSQL's time goes: parsing
# the values alone (COPY into the stage; jsonb_populate_recordset selected,
# not inserted) and COPY straight into the table (the floor: no upsert).
PARTS = ("copy_stage_only", "jsonb_select_only", "copy_direct")


def cpu_seconds(pid: int) -> float:
    """utime+stime of a process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def heavy_blocks(count: int, rows: int, seed: int) -> list[list[RowOp]]:
    gen = Generator(seed, (TENANT,), ("v1.history.messages",), history_batch=rows)
    out = []
    for n, ev in enumerate(gen.events(count)):
        base = ev.subject.rsplit(".", 1)[0]
        # What the DLQ lane hands a handler, so last_metadata is its real size.
        meta = Meta(
            stream="dlq_stream",
            consumer="dlq_worker",
            stream_seq=1_000_000 + n,
            consumer_seq=1_000_000 + n,
            msg_id=f"dlq-wa_history_events_stream-{2_000_000 + n}",
            received_at=f"2026-12-01T16:{n // 60 % 60:02d}:{n % 60:02d}.123456+00:00",
        )
        event = Event(
            subject=ev.subject, base=base, tenant=TENANT, payload=ev.body, attempt=1, meta=meta
        )
        out.append(list(HANDLERS[base](event)))
    return out


def shared_jsonb(block: Rows) -> Rows:
    """`block` sharing only the jsonb columns the store shares (the text ones back in the rows)."""
    if not block.shared_columns:
        return block
    common = msgspec.json.decode(block.shared)
    text = [c for c in block.shared_columns if not isinstance(common[c], dict | list)]
    keep = tuple(c for c in block.shared_columns if c not in text)
    back = {c: common[c] for c in text}
    rows = tuple(msgspec.json.encode({**msgspec.json.decode(r), **back}) for r in block.rows)
    return msgspec.structs.replace(
        block,
        columns=block.columns + tuple(text),
        rows=rows,
        shared_columns=keep,
        shared=msgspec.json.encode({c: common[c] for c in keep}),
    )


def _main_block(blocks: Sequence[Rows]) -> list[Rows]:
    return [b for b in blocks if b.op == "upsert"]


async def _unnest(
    conn: psycopg.AsyncConnection[Any], schema: str, ops: list[RowOp], types: dict[str, str]
) -> None:
    by_shape: dict[tuple[str, ...], list[RowOp]] = {}
    for op in ops:
        by_shape.setdefault(tuple(op.values), []).append(op)
    for columns, group in by_shape.items():
        head = group[0]
        arrays = [
            [
                None
                if (v := op.values[c]) is None
                else (msgspec.json.encode(v).decode() if isinstance(v, dict | list) else str(v))
                for op in group
            ]
            for c in columns
        ]
        cols = sql.SQL(", ").join(map(sql.Identifier, columns))
        target = sql.Identifier(schema, head.table)
        # Types come from the catalog; sql.SQL on them is safe for a benchmark only.
        selects = sql.SQL(", ").join(
            sql.SQL("u.{}::" + types[c]).format(sql.Identifier(c)) for c in columns
        )
        updates = [
            sql.SQL("{0} = excluded.{0}").format(sql.Identifier(c))
            for c in columns
            if c not in head.key and c not in head.insert_only
        ]
        stmt = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({})"
            " ON CONFLICT ({}) DO UPDATE SET {}, updated_at = now()"
        ).format(
            target,
            cols,
            selects,
            sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in columns),
            cols,
            sql.SQL(", ").join(map(sql.Identifier, head.key)),
            sql.SQL(", ").join(updates),
        )
        await conn.execute(stmt, arrays)


async def setup(dsn: str, schema: str, tenant_ddl: Sequence[str] = TENANT_DDL) -> None:
    """A tenant's schema and tables, as the store makes them (no month partitions:
    rows go to the default partition)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for ddl in tenant_ddl:
            await conn.execute(sql.SQL(ddl).format(schema=sql.Identifier(schema)))


async def _truncate(conn: psycopg.AsyncConnection[Any], schema: str) -> None:
    async with conn.transaction():
        for t in ("messages", "chats", "contacts"):
            await conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, t)))


async def measure(dsn: str, blocks: list[list[RowOp]], repeats: int) -> dict[str, Any]:
    schema = tenant_schema(TENANT)
    await setup(dsn, schema)
    # The rows as the store wrote them before it shared values (jsonb, copy),
    # and as the workers encode them now (shared).
    unshared = [_main_block(encode(b, shared_min_rows=sys.maxsize)) for b in blocks]
    now = [_main_block(encode(b)) for b in blocks]
    encoded = {
        "jsonb": unshared,
        "copy": [[copypath.as_copy(r) for r in b] for b in unshared],
        "shared": now,
        "shared_jsonb": [[shared_jsonb(r) for r in b] for b in now],
    }
    results: dict[str, dict[str, list[float]]] = {
        m: {"insert_ms": [], "update_ms": [], "insert_cpu_us_row": [], "update_cpu_us_row": []}
        for m in METHODS + PARTS
    }
    nrows = sum(len(b) for b in blocks)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        backend = int(row[0]) if row else 0
        cur = await conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (f"{schema}.messages",),
        )
        types = {str(r[0]): str(r[1]) for r in await cur.fetchall()}
        await conn.commit()
        for block in encoded["copy"]:
            await copypath.prepare(conn, schema, block)

        def store(name: str) -> Callable[[int], Awaitable[None]]:
            async def write(i: int) -> None:
                for b in encoded[name][i]:
                    await conn.execute(block_sql(schema, b), params(b, b.rows))

            return write

        async def copy(i: int) -> None:
            for b in encoded["copy"][i]:
                await copypath.write_round(conn, schema, b, b.rows)

        async def unnest(i: int) -> None:
            await _unnest(conn, schema, [o for o in blocks[i] if o.op == "upsert"], types)

        async def copy_stage_only(i: int) -> None:
            for b in encoded["copy"][i]:
                name = copypath.stage_of(conn, schema, b)
                async with conn.cursor() as cur, cur.copy(copypath.copy_sql(name, b.columns)) as cp:
                    await cp.write(b"".join(b.rows))

        async def jsonb_select_only(i: int) -> None:
            for b in encoded["jsonb"][i]:
                await conn.execute(
                    sql.SQL("SELECT count(*) FROM jsonb_populate_recordset(NULL::{}, %s)").format(
                        sql.Identifier(schema, b.table)
                    ),
                    (jsonb(b.rows),),
                )

        async def copy_direct(i: int) -> None:
            for b in encoded["copy"][i]:
                stmt = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(schema, b.table),
                    sql.SQL(", ").join(map(sql.Identifier, b.columns)),
                )
                async with conn.cursor() as cur, cur.copy(stmt) as cp:
                    await cp.write(b"".join(b.rows))

        run: dict[str, Callable[[int], Awaitable[None]]] = {
            "jsonb": store("jsonb"),
            "copy": copy,
            "unnest": unnest,
            "shared": store("shared"),
            "shared_jsonb": store("shared_jsonb"),
            "copy_stage_only": copy_stage_only,
            "jsonb_select_only": jsonb_select_only,
            "copy_direct": copy_direct,
        }
        for _ in range(repeats):
            for method in METHODS + PARTS:
                await _truncate(conn, schema)
                # A part that inserts plainly would conflict on a second pass.
                for phase in ("insert", "update") if method in METHODS else ("insert",):
                    cpu0, t0 = cpu_seconds(backend), time.perf_counter()
                    for i in range(len(blocks)):
                        async with conn.transaction():
                            await run[method](i)
                    wall, cpu = time.perf_counter() - t0, cpu_seconds(backend) - cpu0
                    results[method][f"{phase}_ms"].append(wall * 1000 / len(blocks))
                    results[method][f"{phase}_cpu_us_row"].append(cpu * 1e6 / nrows)
    summary = {m: {k: statistics.median(v) for k, v in r.items() if v} for m, r in results.items()}
    return {"rows_per_block": nrows / len(blocks), "runs": results, "median": summary}


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    med = result["median"]
    load = (result["load_average"]["before"][0], result["load_average"]["after"][0])
    lines = [
        "# Write paths for a heavy block",
        "",
        f"{args.blocks} v1.history.messages blocks of {args.rows} items"
        f" (~{result['rows_per_block']:.0f} rows each), one transaction each,"
        f" median of {args.repeats} repeats, embedded PostgreSQL (fsync off),"
        " a shared 2-core machine: compare within a column, not across days."
        f" Load average {load[0]:.1f} before, {load[1]:.1f} after.",
        "",
        "| method | insert ms/block | upsert-existing ms/block"
        " | PG CPU µs/row insert | PG CPU µs/row upsert | vs jsonb (upsert ms)"
        " | vs jsonb (PG CPU insert, upsert) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = med["jsonb"]
    for m in METHODS:
        r = med[m]
        lines.append(
            f"| {m} | {r['insert_ms']:.2f} | {r['update_ms']:.2f} | {r['insert_cpu_us_row']:.1f}"
            f" | {r['update_cpu_us_row']:.1f} | {r['update_ms'] / base['update_ms']:.2f}x"
            f" | {r['insert_cpu_us_row'] / base['insert_cpu_us_row']:.2f}x,"
            f" {r['update_cpu_us_row'] / base['update_cpu_us_row']:.2f}x |"
        )
    lines += [
        "",
        "Where PostgreSQL's time goes (rows new, one pass):",
        "",
        "| part | ms/block | PG CPU µs/row |",
        "|---|---|---|",
    ]
    for m in PARTS:
        r = med[m]
        lines.append(f"| {m} | {r['insert_ms']:.2f} | {r['insert_cpu_us_row']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench writepath", description=__doc__)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--rows", type=int, default=350)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench/results/writepath"))
    args = p.parse_args(argv)
    blocks = heavy_blocks(args.blocks, args.rows, args.seed)
    load_before = os.getloadavg()
    home = Path(tempfile.mkdtemp(prefix="dlqproc-bench-writepath-"))
    try:
        with PostgresServer(home / "data") as server:
            result = asyncio.run(measure(server.dsn, blocks, args.repeats))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result["when"] = dt.datetime.now(dt.UTC).isoformat()
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    (args.out / "writepath.json").write_text(json.dumps(result, indent=2))
    text = render(result, args)
    (args.out / "writepath.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
