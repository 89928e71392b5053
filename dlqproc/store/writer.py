"""The batch write: one commit group in one transaction, one item's failure failing it alone.

`write_group` is the one entry. Its fast path writes every row of the group in
one pipelined round trip, one statement per table shape (see rows.plan), and
costs no savepoint. When an item fails in a way that needs a rollback, the fast
path raises, the group is rolled back, and the slow path writes it again one
item at a time, each under a savepoint, so only the failing items are left out.

The tenants' schemas and partitions are made before (Store.write); a tenant
that could not be prepared arrives in `unready` and its items fail without
being tried. Only an outage propagates out of here (see sql.classify).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from dlqproc.model import Rows
from dlqproc.rows import plan, rounds
from dlqproc.store.exhausted import insert_exhausted
from dlqproc.store.results import Failure, ItemFailed, NotWritten, Write, WriteResult, Written
from dlqproc.store.sql import block_sql, is_outage, item_failure, not_found, params, schema_name


class _NeedsIsolation(Exception):
    """The fast path cannot tell which item failed: write the group item by item."""


async def write_group(
    conn: psycopg.AsyncConnection[Any],
    writes: Sequence[Write],
    unready: Mapping[str, Failure],
) -> list[WriteResult]:
    """One result per Write, in order; the group commits in one transaction.

    `unready`: the failure of each tenant whose schema could not be prepared;
    its items with rows fail with it. Raises for an outage only (the
    connection broke, or the transaction as a whole could not commit).
    """
    try:
        return await _fast(conn, writes, unready)
    except Exception as exc:
        if is_outage(exc, conn):
            raise
    async with conn.transaction():
        return [await _isolated(conn, w, unready) for w in writes]


class _Plan:
    """A commit group as the fast path writes it: rows by schema, failures known beforehand."""

    def __init__(self, writes: Sequence[Write], unready: Mapping[str, Failure]) -> None:
        self.results: list[WriteResult | None] = [None] * len(writes)
        # One plan per tenant schema: a step writes into one schema's table.
        self.by_schema: dict[str, list[tuple[Rows, ...]]] = {}
        # The writes holding each update block, by value: a block equal to another
        # write's cannot be told apart from it, and sends the group item by item.
        self.updaters: dict[tuple[str, Rows], list[int]] = {}
        for i, w in enumerate(writes):
            if not w.rows:
                continue
            failure = unready.get(w.tenant)
            if failure is not None:
                self.results[i] = NotWritten(failure)
                continue
            schema = schema_name(w.tenant)
            self.by_schema.setdefault(schema, []).append(w.rows)
            for block in w.rows:
                if block.op == "update":
                    self.updaters.setdefault((schema, block), []).append(i)


async def _fast(
    conn: psycopg.AsyncConnection[Any],
    writes: Sequence[Write],
    unready: Mapping[str, Failure],
) -> list[WriteResult]:
    """Every row of the group in one transaction and one pipelined round trip.

    Raises on any failure that needs a rollback. An item that is a single
    update whose row is missing wrote nothing, so it fails alone and the rest
    of the group commits (updates that overtake their upserts are common:
    rolling the group back for each would write it twice).
    """
    group = _Plan(writes, unready)
    results = group.results
    async with conn.transaction():
        for cur, schema, block in await _pipelined(conn, group.by_schema):
            if cur.rowcount == 0:
                [held_by, *others] = group.updaters[(schema, block)]
                if others or len(writes[held_by].rows) > 1:
                    raise _NeedsIsolation  # other rows of its item must not commit
                results[held_by] = NotWritten(not_found(block))
        for i, w in enumerate(writes):
            if results[i] is None:
                results[i] = await _exhausted(conn, w)
    return [r for r in results if r is not None]


async def _pipelined(
    conn: psycopg.AsyncConnection[Any], by_schema: Mapping[str, Sequence[tuple[Rows, ...]]]
) -> list[tuple[psycopg.AsyncCursor[Any], str, Rows]]:
    """Send every step in one pipeline; the cursors of the update steps, to check."""
    updates: list[tuple[psycopg.AsyncCursor[Any], str, Rows]] = []
    async with conn.pipeline():
        for schema, items in by_schema.items():
            for step in plan(items):
                stmt = block_sql(schema, step.block)
                for rows in step.rounds:
                    cur = conn.cursor()
                    await cur.execute(stmt, params(step.block, rows))
                    if step.block.op == "update":
                        updates.append((cur, schema, step.block))
    return updates


async def _exhausted(conn: psycopg.AsyncConnection[Any], w: Write) -> Written:
    if w.exhausted is None:
        return Written()
    return Written(inserted=await insert_exhausted(conn, w.exhausted))


async def _isolated(
    conn: psycopg.AsyncConnection[Any], w: Write, unready: Mapping[str, Failure]
) -> WriteResult:
    """One item under its own savepoint: any exception but an outage is its failure."""
    if w.rows and w.tenant in unready:
        return NotWritten(unready[w.tenant])
    try:
        async with conn.transaction():
            return await _write_one(conn, w)
    except Exception as exc:
        if is_outage(exc, conn):
            raise
        return NotWritten(item_failure(exc))


async def _write_one(conn: psycopg.AsyncConnection[Any], w: Write) -> Written:
    """The item's rows, then its exhausted row, as the fast path writes them."""
    if w.rows:
        schema = schema_name(w.tenant)
        for block in w.rows:
            stmt = block_sql(schema, block)
            for rows in rounds((block,)):
                cur = await conn.execute(stmt, params(block, rows))
                if block.op == "update" and cur.rowcount == 0:
                    raise ItemFailed.of(not_found(block))
    return await _exhausted(conn, w)
