"""The bench's COPY write path (bench/copypath.py) leaves the tables the store leaves.

`python -m bench writepath` compares it with the store's jsonb statement; the
comparison means something only if both write the same rows. One commit group
goes through the store into one tenant's schema and through bench's COPY path
into another's, twice (the rows new, then the DO UPDATE path), on real
PostgreSQL; the tables must then hold the same rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg

from bench import copypath
from bench.writepath import heavy_blocks, setup
from dlqproc.handlers.whatsapp import TENANT_DDL
from dlqproc.model import RowOp, Rows
from dlqproc.rows import encode
from dlqproc.store import Store, Write, Written

DDL = (
    """CREATE TABLE IF NOT EXISTS {schema}.t (
        k bigint PRIMARY KEY,
        s text,
        n bigint,
        first text,
        j jsonb,
        b boolean,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS {schema}.p (
        k bigint NOT NULL,
        d date NOT NULL,
        s text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (k, d)) PARTITION BY RANGE (d)""",
    "CREATE TABLE IF NOT EXISTS {schema}.p_default PARTITION OF {schema}.p DEFAULT",
)


def tables(dsn: str, schema: str) -> dict[str, list[str]]:
    """Each table's rows (partitions read through their parent), without the timestamps."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
            (schema,),
        ).fetchall()
        out: dict[str, list[str]] = {}
        for (name,) in names:
            cur = conn.execute(
                psycopg.sql.SQL(
                    "SELECT (to_jsonb(x) - 'created_at' - 'updated_at')::text FROM {} x"
                ).format(psycopg.sql.Identifier(schema, name))
            )
            out[name] = sorted(str(r[0]) for r in cur.fetchall())
        return out


def through_both(dsn: str, ddl: Sequence[str], group: list[list[RowOp]]) -> None:
    items = [encode(ops) for ops in group]

    async def via_store() -> None:
        store = Store(dsn, statement_timeout=10.0, tenant_ddl=ddl)
        try:
            await store.migrate()
            for _ in range(2):
                results = await store.write([Write(tenant="viajsonb", rows=b) for b in items])
                assert all(isinstance(r, Written) for r in results), results
        finally:
            await store.close()

    async def via_copy() -> None:
        await setup(dsn, "daisi_viacopy", ddl)
        copy_items: list[tuple[Rows, ...]] = [tuple(map(copypath.as_copy, b)) for b in items]
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for _ in range(2):
                updated = await copypath.write_group(conn, "daisi_viacopy", copy_items)
                assert 0 not in updated  # every update found its row, as in the store

    asyncio.run(via_store())
    asyncio.run(via_copy())
    by_store = tables(dsn, "daisi_viajsonb")
    by_copy = tables(dsn, "daisi_viacopy")
    assert by_store.keys() == by_copy.keys()
    assert any(by_store.values()), "the group wrote nothing"
    assert by_copy == by_store


def test_a_heavy_group_of_the_benchmark_leaves_the_same_tables(dsn: str) -> None:
    """The blocks `bench writepath` writes: WhatsApp history batches, their tables."""
    through_both(dsn, TENANT_DDL, heavy_blocks(3, 20, seed=7))


def test_escapes_unicode_jsonb_duplicates_monotonic_and_insert_only(dsn: str) -> None:
    t: dict[str, Any] = {
        "op": "upsert",
        "table": "t",
        "key": ("k",),
        "monotonic": ("n",),
        "insert_only": ("first",),
    }
    group = [
        [
            RowOp(**t, values={"k": 1, "s": "a\tb\\c\nd\re", "n": 5, "first": "one", "b": True}),
            # The same key again in the group: a second round, written after the first.
            RowOp(**t, values={"k": 1, "s": "é😀 \\N", "n": 3, "first": "two", "j": {"x": [1]}}),
        ],
        [
            RowOp(
                op="upsert",
                table="p",
                key=("k", "d"),
                values={"k": 1, "d": "2024-02-03", "s": None},
                partition="2024-02",
            )
        ],
        [RowOp(**t, values={"k": 2, "j": [{"v": "\\N\x01\t"}, None, 1.5], "b": None})],
        [
            RowOp(
                op="update",
                table="t",
                key=("k",),
                values={"k": 1, "s": "updated", "n": 4},
                monotonic=("n",),
            )
        ],
    ]
    through_both(dsn, DDL, group)
    # The monotonic column kept its highest value, the insert-only one its first.
    [row] = [r for r in map(msgspec.json.decode, tables(dsn, "daisi_viacopy")["t"]) if r["k"] == 1]
    assert (row["s"], row["n"], row["first"]) == ("updated", 5, "one")
