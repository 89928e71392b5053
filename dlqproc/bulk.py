"""The COPY write path: a block's rows streamed into a staging table, then one upsert.

Rows arrive as COPY text lines encoded by the workers (dlqproc.copyrows). For
a round of a block this sends `COPY <stage> (<columns>) FROM STDIN` with the
lines as they are, then one statement that empties the stage into the target:

    WITH s AS (DELETE FROM <stage> RETURNING <columns>)
    INSERT INTO <target> (<columns>) SELECT <columns> FROM s
    ON CONFLICT (<key>) DO UPDATE SET ...        -- or UPDATE <target> ... FROM s

with the same assignments as the jsonb statement (dlqproc.store._statement):
monotonic columns through GREATEST, insert-only columns left out of the
update. PostgreSQL parses every value with the column's own input function,
and the supervisor never reads a value.

A stage is a temporary table with the block's columns typed as the target's
(CREATE TABLE AS ... WITH NO DATA: no constraints, so a NOT NULL column the
block leaves out is the target's business, as before). One stage serves every
tenant whose table has the same column types, and is made by `prepare` in a
transaction of its own: one made inside a write's transaction would vanish
with its rollback. Stages delete their rows at commit (no dead rows pile up in
a table autovacuum never visits); the statement above deletes them within the
transaction, so the next round or block of the shape starts empty.

Part of the store: only dlqproc.store calls it, on the store's connection,
when the store's rows_form is "copy". Not the default: on the service's heavy
blocks it costs PostgreSQL as much CPU per row as the jsonb statement and
needs more round trips (bench/README.md, "Write paths").
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import sql

from dlqproc.model import Rows

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
    return f"dlqproc_stage_{digest[:32]}"


async def prepare(conn: psycopg.AsyncConnection[Any], schema: str, blocks: Sequence[Rows]) -> None:
    """Make the stages these blocks need, in a transaction of their own.

    A block naming a table or column the schema lacks gets no stage: writing
    it fails as a data error, as the jsonb statement does.
    """
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
                    continue  # no such table (yet): nothing is cached
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
def _copy(name: str, columns: tuple[str, ...]) -> bytes:
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
        ident = sql.Identifier(col)
        value = sql.SQL("{}.{}").format(sql.Identifier(source), ident)
        if col in monotonic:
            return sql.SQL("{} = GREATEST({}.{}, {})").format(ident, target, ident, value)
        return sql.SQL("{} = {}").format(ident, value)

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
    """Write one round of a block's shape (rows with distinct keys); the rows affected.

    The stage must have been made by `prepare`. Raises psycopg's errors as the
    statement does; a block with no stage (a table or column the schema lacks)
    raises psycopg.DataError.
    """
    stages = _stages(conn)
    name = stages.names.get((schema, block.table, block.columns))
    if name is None:
        types = stages.types.get((schema, block.table))
        if types is None:
            raise psycopg.DataError(f'relation "{schema}.{block.table}" does not exist')
        lacking = ", ".join(c for c in block.columns if c not in types)
        raise psycopg.DataError(f'column(s) {lacking} of "{schema}.{block.table}" do not exist')
    async with conn.cursor() as cur:
        async with cur.copy(_copy(name, block.columns)) as copy:
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
