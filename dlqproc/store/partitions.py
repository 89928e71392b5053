"""Month partitions of range-partitioned tenant tables, created on first use.

Only months from 2009-01 to the month of now + the partition horizon get a
partition, and one commit group creates at most a budget of them: a hostile
timestamp must not create partitions by the thousand (each costs locks in every
later statement on the table). Rows of other months wait in the default
partition and move out of it when their month's partition is created by a later
write (PostgreSQL refuses to attach a partition whose rows the default holds).
A partition that cannot be created is logged and leaves its rows in the default.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from typing import Any

import psycopg
from psycopg import sql

from dlqproc.store.sql import brief, is_outage

log = logging.getLogger("dlqproc.store")

_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
_PARTITION_INFO = """
SELECT a.attname, dn.nspname, dc.relname
FROM pg_partitioned_table p
JOIN pg_class c ON c.oid = p.partrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = p.partrelid AND a.attnum = p.partattrs[0]
LEFT JOIN pg_class dc ON dc.oid = p.partdefid
LEFT JOIN pg_namespace dn ON dn.oid = dc.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""
_EXISTS = (
    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %s AND c.relname = %s"
)
# WhatsApp launched in 2009: no message is older, so no partition is either.
_FIRST_MONTH = (2009, 1)
# The last month whose end dt.date can represent: 9999-12 ends in year 10000.
_LAST_INSTANT = dt.datetime(9999, 11, 30, tzinfo=dt.UTC).timestamp()


def month_bounds(month: str) -> tuple[dt.date, dt.date] | None:
    """[first day, first day of the next month) for "YYYY-MM"; None for anything else.

    Never raises: None also for a month whose end is not a date (9999-12).
    """
    match = _MONTH.fullmatch(month) if isinstance(month, str) else None
    if match is None:
        return None
    year, mon = int(match.group(1)), int(match.group(2))
    if not (1 <= year <= 9999 and 1 <= mon <= 12) or (year, mon) == (9999, 12):
        return None
    start = dt.date(year, mon, 1)
    end = dt.date(year + 1, 1, 1) if mon == 12 else dt.date(year, mon + 1, 1)
    return start, end


def last_month(horizon: float, now: float | None = None) -> tuple[int, int]:
    """(year, month) of now + horizon seconds, clamped to what dates can hold."""
    instant = (time.time() if now is None else now) + horizon
    if not 0.0 <= instant <= _LAST_INSTANT:  # also NaN
        instant = 0.0 if instant < 0.0 else _LAST_INSTANT
    last = dt.datetime.fromtimestamp(instant, dt.UTC)
    return last.year, last.month


class PartitionBudget:
    """What one commit group may still do about partitions: how many to create, up to when."""

    def __init__(self, left: int, last_month: tuple[int, int]) -> None:
        self.left = left
        self.last_month = last_month

    def admits(self, start: dt.date) -> bool:
        return _FIRST_MONTH <= (start.year, start.month) <= self.last_month


class Partitions:
    """The partitions this process knows exist, and how new ones are made.

    horizon: how far ahead of now (seconds) a month may lie for its partition
    to be created; max_new: how many one commit group may create.
    """

    def __init__(self, horizon: float, max_new: int) -> None:
        self._horizon = horizon
        self._max_new = max_new
        self._known: set[tuple[str, str, str]] = set()

    def budget(self) -> PartitionBudget:
        """A fresh budget for one commit group."""
        return PartitionBudget(self._max_new, last_month(self._horizon))

    async def ensure(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        table: str,
        month: str,
        budget: PartitionBudget,
    ) -> None:
        """Create the month's partition of schema.table if it is due and within budget.

        Never raises but for an outage; a failure leaves rows in the default.
        """
        key = (schema, table, month)
        if key in self._known or budget.left <= 0:
            return
        bounds = month_bounds(month)
        if bounds is None or not budget.admits(bounds[0]):
            return
        start, end = bounds
        part = f"{table}_{start.year:04d}_{start.month:02d}"
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{schema}.{table}",)
                )
                cur = await conn.execute(_EXISTS, (schema, part))
                if await cur.fetchone() is None:
                    cur = await conn.execute(_PARTITION_INFO, (schema, table))
                    info = await cur.fetchone()
                    if info is not None:
                        budget.left -= 1  # spent by the attempt: a failing one costs too
                        await _create(conn, schema, table, part, info, start, end)
        except Exception as exc:
            if is_outage(exc, conn):
                raise
            log.warning(
                "could not create partition",
                extra={"schema": schema, "partition": part, "error": brief(str(exc))},
            )
            return
        self._known.add(key)


async def _create(
    conn: psycopg.AsyncConnection[Any],
    schema: str,
    table: str,
    part: str,
    info: tuple[Any, ...],
    start: dt.date,
    end: dt.date,
) -> None:
    """Create the partition, move its rows out of the default one, attach it."""
    column, default_schema, default_table = info
    parent, target = sql.Identifier(schema, table), sql.Identifier(schema, part)
    col = sql.Identifier(column)
    await conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            target, parent
        )
    )
    if default_table is not None:
        default = sql.Identifier(default_schema, default_table)
        where = sql.SQL("{} >= {} AND {} < {}").format(
            col, sql.Literal(start), col, sql.Literal(end)
        )
        await conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE {}").format(target, default, where)
        )
        await conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(default, where))
    await conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            parent, target, sql.Literal(start), sql.Literal(end)
        )
    )
