"""The COPY write path, kept in the bench to be measured, not in the service.

Issue 13 tried writing rows through COPY instead of the store's
`jsonb_populate_recordset` statement. On the service's heavy blocks it cost
PostgreSQL as much CPU per row and took more round trips (bench/README.md,
"Write paths"), so dlqproc keeps the jsonb path only and this module keeps the
alternative for `python -m bench writepath` to compare against it.

A block's rows become lines of PostgreSQL's COPY text format (`line`): values
in column order, tab-separated, NULL as \\N, backslash, newline, carriage
return and tab escaped; each value the text the column's input function reads,
which is what jsonb_populate_recordset made of its JSON form. `as_copy` makes
them from the JSON rows dlqproc.rows.encode produces, so both paths write the
same blocks. A round of a block is then sent as `COPY <stage> FROM STDIN` and
one statement that empties the stage into the target:

    WITH s AS (DELETE FROM <stage> RETURNING <columns>)
    INSERT INTO <target> (<columns>) SELECT <columns> FROM s
    ON CONFLICT (<key>) DO UPDATE SET ...        -- or UPDATE <target> ... FROM s

with the store's assignments (dlqproc.store.sql.statement): monotonic columns
through GREATEST, insert-only columns left out of the update. A stage is a
temporary table typed like the target's columns (CREATE TABLE AS ... WITH NO
DATA), made by `prepare` in a transaction of its own and emptied at commit.

`write_group` writes a commit group as the store's fast path does (one
transaction, dlqproc.rows.plan), without its per-item fallback:
tests/test_bench_copypath.py checks it leaves the store's tables.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from dlqproc.model import Rows
from dlqproc.rows import plan
from dlqproc.store.sql import assignment

# --- Rows as COPY text lines ---


def _refuse(value: Any) -> Any:
    raise TypeError(f"cannot store a {type(value).__name__} value")


_json = msgspec.json.Encoder(enc_hook=_refuse)
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_SPECIAL = frozenset("\\\n\r\t")
NULL = "\\N"


def _escape(text: str) -> str:
    # Most values need no escape; scanning is cheaper than translating.
    if _SPECIAL.isdisjoint(text):
        return text
    return text.translate(_ESCAPES)


def field(value: Any) -> str:
    """One value as a COPY text field (escaped)."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if value is None:
        return NULL
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    encoded = _json.encode(value)
    if kind is dict or kind is list or kind is tuple:
        return _escape(encoded.decode())
    if encoded == b"null":  # a NaN or infinite float: JSON has no such number
        return NULL
    if encoded[:1] == b'"':  # dates, datetimes, UUIDs, decimals: their text form
        return _escape(msgspec.json.decode(encoded, type=str))
    return encoded.decode()  # floats and int subclasses


def line(values: Iterable[Any]) -> bytes:
    """One row as a COPY text line. Raises TypeError or ValueError for a value
    no column can hold (UnicodeEncodeError for a lone surrogate)."""
    return ("\t".join(map(field, values)) + "\n").encode("utf-8")


def as_copy(block: Rows) -> Rows:
    """The block with each JSON row as a COPY text line (same keys, same plan).

    A JSON row's object keeps the block's column order, and a value read back
    from JSON has the text form the original had (dates, UUIDs and decimals
    were already strings), so the line is the one the values would give.
    """
    # Values a block's rows share (Rows.shared) go back into every line.
    common = list(msgspec.json.decode(block.shared).values()) if block.shared_columns else []
    rows = tuple(line([*msgspec.json.decode(r).values(), *common]) for r in block.rows)
    return msgspec.structs.replace(
        block,
        columns=block.columns + block.shared_columns,
        rows=rows,
        shared_columns=(),
        shared=b"",
    )


# --- Staging tables and the statements that empty them ---

_COLUMN_TYPES = """
SELECT a.attname, a.atttypid::int, a.atttypmod
FROM pg_attribute a
WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
  AND a.attnum > 0 AND NOT a.attisdropped
"""


class _Stages:
    """What one connection has: column types of target tables, stages made."""

    def __init__(self) -> None:
        self.types: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
        self.names: dict[tuple[str, str, tuple[str, ...]], str] = {}


_by_connection: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], _Stages] = (
    weakref.WeakKeyDictionary()
)


def _stages(conn: psycopg.AsyncConnection[Any]) -> _Stages:
    stages = _by_connection.get(conn)
    if stages is None:
        stages = _by_connection[conn] = _Stages()
    return stages


def stage_name(table: str, columns: Sequence[str], types: Sequence[tuple[int, int]]) -> str:
    """A stage's name: the same for every table with these columns and types."""
    digest = hashlib.sha256(repr((table, tuple(columns), tuple(types))).encode()).hexdigest()
    return f"bench_stage_{digest[:32]}"


def stage_of(conn: psycopg.AsyncConnection[Any], schema: str, block: Rows) -> str:
    """The stage `prepare` made for this block's table and columns."""
    name = _stages(conn).names.get((schema, block.table, block.columns))
    if name is None:
        raise psycopg.DataError(f"no stage for {schema}.{block.table} {block.columns}")
    return name


async def prepare(conn: psycopg.AsyncConnection[Any], schema: str, blocks: Sequence[Rows]) -> None:
    """Make the stages these blocks need, in a transaction of their own (a
    stage made inside a write's transaction would vanish with its rollback)."""
    stages = _stages(conn)
    wanted = {(schema, b.table, b.columns) for b in blocks} - stages.names.keys()
    if not wanted:
        return
    made: dict[tuple[str, str, tuple[str, ...]], str] = {}
    async with conn.transaction():
        for key in sorted(wanted):
            _, table, columns = key
            types = stages.types.get((schema, table))
            if types is None:
                cur = await conn.execute(_COLUMN_TYPES, (schema, table))
                types = {str(r[0]): (int(r[1]), int(r[2])) for r in await cur.fetchall()}
                if not types:
                    continue  # no such table: writing the block fails
                stages.types[(schema, table)] = types
            if any(c not in types for c in columns):
                continue
            name = stage_name(table, columns, [types[c] for c in columns])
            await conn.execute(
                sql.SQL(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS"
                    " AS SELECT {} FROM {} WITH NO DATA"
                ).format(
                    sql.Identifier(name),
                    sql.SQL(", ").join(map(sql.Identifier, columns)),
                    sql.Identifier(schema, table),
                )
            )
            made[key] = name
    stages.names.update(made)


@lru_cache(maxsize=1024)
def copy_sql(name: str, columns: tuple[str, ...]) -> bytes:
    """`COPY <name> (<columns>) FROM STDIN`."""
    return (
        sql.SQL("COPY {} ({}) FROM STDIN")
        .format(sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns)))
        .as_bytes(None)
    )


@lru_cache(maxsize=1024)
def _statement(
    schema: str,
    name: str,
    op: str,
    table: str,
    key: tuple[str, ...],
    columns: tuple[str, ...],
    monotonic: tuple[str, ...],
    insert_only: tuple[str, ...],
) -> bytes:
    """The statement that moves a stage's rows into the target (see the module doc)."""
    target = sql.Identifier(schema, table)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    staged = sql.SQL("WITH s AS (DELETE FROM {} RETURNING {}) ").format(sql.Identifier(name), cols)

    def assign(col: str, source: str) -> sql.Composable:
        return assignment(target, col, source, monotonic)

    if op == "upsert":
        updates = [assign(c, "excluded") for c in columns if c not in key and c not in insert_only]
        updates.append(sql.SQL("updated_at = now()"))
        stmt = staged + sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM s ON CONFLICT ({}) DO UPDATE SET {}"
        ).format(
            target,
            cols,
            cols,
            sql.SQL(", ").join(map(sql.Identifier, key)),
            sql.SQL(", ").join(updates),
        )
    else:
        sets = [assign(c, "s") for c in columns if c not in key]
        sets.append(sql.SQL("updated_at = now()"))
        stmt = staged + sql.SQL("UPDATE {} SET {} FROM s WHERE {}").format(
            target,
            sql.SQL(", ").join(sets),
            sql.SQL(" AND ").join(
                sql.SQL("{}.{} = s.{}").format(target, sql.Identifier(k), sql.Identifier(k))
                for k in key
            ),
        )
    return stmt.as_bytes(None)


async def write_round(
    conn: psycopg.AsyncConnection[Any], schema: str, block: Rows, rows: Sequence[bytes]
) -> int:
    """Write one round of a block (COPY lines with distinct keys); the rows affected.

    The stage must have been made by `prepare`.
    """
    name = stage_of(conn, schema, block)
    async with conn.cursor() as cur:
        async with cur.copy(copy_sql(name, block.columns)) as copy:
            await copy.write(b"".join(rows))
        await cur.execute(
            _statement(
                schema,
                name,
                block.op,
                block.table,
                block.key,
                block.columns,
                block.monotonic,
                block.insert_only,
            )
        )
        return cur.rowcount


async def write_group(
    conn: psycopg.AsyncConnection[Any], schema: str, items: Sequence[Sequence[Rows]]
) -> list[int]:
    """A commit group's items (blocks in COPY form) in one transaction, as the
    store's fast path plans them; the rows each update round affected.

    No per-item fallback: any failure rolls the whole group back and raises.
    """
    await prepare(conn, schema, [b for item in items for b in item])
    updated: list[int] = []
    async with conn.transaction():
        for step in plan(items):
            for rows in step.rounds:
                count = await write_round(conn, schema, step.block, rows)
                if step.block.op == "update":
                    updated.append(count)
    return updated
