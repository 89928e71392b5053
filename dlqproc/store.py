"""PostgreSQL: migrations, tenant schemas, batch writes and exhausted events.

The only module that imports psycopg. The supervisor is its only caller, and
every write it makes is idempotent (upserts keyed on the event's identity, an
exhausted row keyed on the DLQ message), so a redelivery rewrites the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.resources
import logging
import re
from collections.abc import Callable, Coroutine, Sequence
from functools import lru_cache
from typing import Any, Concatenate, ParamSpec, TypeVar

import msgspec
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from dlqproc.envelope import valid_tenant
from dlqproc.model import FailureKind, Reason, Rows
from dlqproc.rows import Shape, payload, plan, rounds, shape

log = logging.getLogger("dlqproc.store")

_MIGRATION_FILE = re.compile(r"^(\d+)_[a-z0-9_]+\.sql$")
# Arbitrary constant: serialises migrations of concurrently starting replicas.
_MIGRATION_LOCK = 0x646C7170


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialized(
    method: Callable[Concatenate[Store, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Store, _P], Coroutine[Any, Any, _R]]:
    """One operation at a time on the store's single connection.

    Probes and the commit loop share it; interleaved, a ping would open a
    savepoint inside a batch's transaction instead of a transaction of its own.
    """

    async def serialized(store: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with store._lock:
            return await method(store, *args, **kwargs)

    serialized.__doc__ = method.__doc__
    return serialized


class _SomeItemFailed(Exception):
    """The fast path cannot tell which item failed: fall back to one by one."""


class StoreUnavailable(Exception):
    """The database cannot be reached or the transaction failed as a whole."""


class ItemFailed(Exception):
    def __init__(self, kind: FailureKind, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.kind, self.reason = kind, reason


class ExhaustedRow(msgspec.Struct, frozen=True):
    company_id: str
    source_subject: str
    last_error: str
    retry_count: int
    reason: str
    event_timestamp: str | None
    envelope_json: bytes | None  # the envelope, when it decoded
    original_json: bytes | None
    raw: bytes  # the body as received
    dlq_stream: str
    dlq_sequence: int
    dlq_subject: str


class Write(msgspec.Struct, frozen=True):
    """What one message needs written: rows for its tenant, or an exhausted row."""

    tenant: str = ""
    rows: tuple[Rows, ...] = ()
    exhausted: ExhaustedRow | None = None


class Written(msgspec.Struct, frozen=True):
    """The result for one Write: failed (with its classification) or done."""

    failure: ItemFailed | None = None
    inserted: bool = False  # an exhausted row was inserted (not already there)


# SQLSTATE classes (PostgreSQL appendix A). Data exceptions, integrity
# violations, syntax/undefined objects and program limits are about the rows a
# handler produced; connection and operator-intervention classes are about the
# database as a whole.
_DATA_CLASSES = frozenset({"22", "23", "42", "54"})
_CONNECTION_CLASSES = frozenset({"08", "53", "57", "58", "XX"})
_QUERY_CANCELED = "57014"  # statement_timeout: this item was slow, not the database down


def data_problem(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:  # raised client-side, e.g. a NUL character in a string
        return isinstance(exc, psycopg.DataError)
    return state[:2] in _DATA_CLASSES


def connection_lost(exc: psycopg.Error) -> bool:
    state = exc.sqlstate
    if state is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return state[:2] in _CONNECTION_CLASSES and state != _QUERY_CANCELED


def schema_name(tenant: str) -> str:
    if not valid_tenant(tenant):
        raise ItemFailed(FailureKind.PERMANENT, Reason.INVALID_TENANT, f"invalid tenant {tenant!r}")
    return "daisi_" + tenant.lower()


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in schema/, in order."""
    found = []
    for entry in importlib.resources.files("dlqproc.schema").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def _sql(schema: str, block: Rows) -> bytes:
    return _statement(schema, shape(block))


@lru_cache(maxsize=1024)
def _statement(schema: str, block_shape: Shape) -> bytes:
    """SQL for one block shape; its one parameter is the rows as a jsonb array.

    jsonb_populate_recordset types every value by the table's own row type, so
    one statement writes a whole block whatever its size. Identifiers are
    always quoted by psycopg; rendered to bytes once per shape.
    """
    op, table, key, columns, monotonic, insert_only = block_shape
    target = sql.Identifier(schema, table)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    rows = sql.SQL("jsonb_populate_recordset(NULL::{}, %s)").format(target)

    def assign(col: str, source: str) -> sql.Composable:
        ident = sql.Identifier(col)
        value = sql.SQL("{}.{}").format(sql.Identifier(source), ident)
        if col in monotonic:
            return sql.SQL("{} = GREATEST({}.{}, {})").format(ident, target, ident, value)
        return sql.SQL("{} = {}").format(ident, value)

    if op == "upsert":
        updates = [assign(c, "excluded") for c in columns if c not in key and c not in insert_only]
        updates.append(sql.SQL("updated_at = now()"))
        stmt = sql.SQL(
            "INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO UPDATE SET {}"
        ).format(
            target,
            cols,
            cols,
            rows,
            sql.SQL(", ").join(map(sql.Identifier, key)),
            sql.SQL(", ").join(updates),
        )
    else:
        sets = [assign(c, "r") for c in columns if c not in key]
        sets.append(sql.SQL("updated_at = now()"))
        stmt = sql.SQL("UPDATE {} SET {} FROM {} AS r WHERE {}").format(
            target,
            sql.SQL(", ").join(sets),
            rows,
            sql.SQL(" AND ").join(
                sql.SQL("{}.{} = r.{}").format(target, sql.Identifier(k), sql.Identifier(k))
                for k in key
            ),
        )
    return stmt.as_bytes(None)


def _not_found(block: Rows) -> ItemFailed:
    # Transient: the upsert that creates the row may still be on its way.
    return ItemFailed(
        FailureKind.TRANSIENT,
        Reason.NOT_FOUND,
        f"{block.table} row {block.keys[0].decode()} not found",
    )


def _already_json(data: bytes) -> bytes:
    return data  # the rows were encoded by the worker


def _jsonb(rows: Sequence[bytes]) -> Jsonb:
    return Jsonb(payload(rows), dumps=_already_json)


_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
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


def month_bounds(month: str) -> tuple[dt.date, dt.date] | None:
    """[first day, first day of the next month) for "YYYY-MM", or None if malformed."""
    match = _MONTH.match(month)
    if not match:
        return None
    year, mon = int(match.group(1)), int(match.group(2))
    if not (1 <= year <= 9999 and 1 <= mon <= 12):
        return None
    start = dt.date(year, mon, 1)
    end = dt.date(year + 1, 1, 1) if mon == 12 else dt.date(year, mon + 1, 1)
    return start, end


_MAX_INDEXED_TEXT = 1024


def _text(value: str) -> str:
    """A string PostgreSQL's text type accepts: no NUL, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    return value.encode("utf-8", "replace").decode("utf-8")


_INSERT_EXHAUSTED = """
INSERT INTO public.exhausted_events (
    company_id, source_subject, last_error, retry_count, event_timestamp,
    dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, dlq_subject,
    payload_digest, raw_payload)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s)
ON CONFLICT (dlq_stream, dlq_sequence, payload_digest) DO NOTHING
RETURNING id
"""


class Store:
    """One connection owned by the supervisor; reconnected when it breaks."""

    def __init__(self, dsn: str, statement_timeout: float, tenant_ddl: Sequence[str]) -> None:
        self._dsn = dsn
        self._timeout_ms = int(statement_timeout * 1000)
        self._tenant_ddl = tuple(tenant_ddl)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._tenants: set[str] = set()
        self._lock = asyncio.Lock()
        self._partitions: set[tuple[str, str, str]] = set()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if (
            conn is not None
            and not conn.broken
            and (conn.info.transaction_status == TransactionStatus.IDLE)
        ):
            return conn
        # Broken, or left inside a transaction by a failure: never reuse it, or
        # a later write could land in a transaction that is never committed.
        await self._discard()
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                connect_timeout=5,
                options=f"-c statement_timeout={self._timeout_ms}",
                application_name="dlqproc",
            )
        except psycopg.Error as exc:
            self._conn = None
            raise StoreUnavailable(f"cannot connect to Postgres: {exc}") from exc
        return self._conn

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def close(self) -> None:
        await self._discard()

    @_serialized
    async def ping(self) -> bool:
        try:
            conn = await self._connection()
            async with conn.transaction():
                await conn.execute("SELECT 1")
        except StoreUnavailable:
            return False
        except psycopg.Error:
            await self._discard()
            return False
        return True

    @_serialized
    async def migrate(self) -> list[str]:
        """Apply the schema/ migrations not yet applied; return their names."""
        conn = await self._connection()
        applied: list[str] = []
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS public.dlqproc_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM public.dlqproc_migrations")
            done = {row[0] for row in await cur.fetchall()}
            for version, name, text in migrations():
                if version in done:
                    continue
                await conn.execute(text.encode())
                await conn.execute(
                    "INSERT INTO public.dlqproc_migrations (version, name) VALUES (%s, %s)",
                    (version, name),
                )
                applied.append(name)
        return applied

    async def _ensure_tenant(self, conn: psycopg.AsyncConnection[Any], schema: str) -> None:
        if schema in self._tenants:
            return
        async with conn.transaction():
            # Concurrent replicas may create the same schema; the lock orders them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
            ident = sql.Identifier(schema)
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            for ddl in self._tenant_ddl:
                await conn.execute(sql.SQL(ddl).format(schema=ident))
        self._tenants.add(schema)

    async def _ensure_partition(
        self, conn: psycopg.AsyncConnection[Any], schema: str, table: str, month: str
    ) -> None:
        """Create the month's partition of a range-partitioned table on first use.

        Rows of that month already in the default partition move into the new
        one in the same transaction, since PostgreSQL refuses to attach a
        partition whose rows the default partition holds.
        """
        key = (schema, table, month)
        bounds = month_bounds(month)
        if key in self._partitions or bounds is None:
            return
        start, end = bounds
        part = f"{table}_{start.year:04d}_{start.month:02d}"
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"{schema}.{table}",)
                )
                cur = await conn.execute(
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = %s AND c.relname = %s",
                    (schema, part),
                )
                if await cur.fetchone() is None:
                    cur = await conn.execute(_PARTITION_INFO, (schema, table))
                    info = await cur.fetchone()
                    if info is not None:
                        await self._create_partition(conn, schema, table, part, info, start, end)
        except psycopg.Error as exc:
            if connection_lost(exc):
                raise
            # Rows still land in the default partition; retried on the next write.
            log.warning(
                "could not create partition",
                extra={"schema": schema, "partition": part, "error": str(exc).strip()},
            )
            return
        self._partitions.add(key)

    @staticmethod
    async def _create_partition(
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        table: str,
        part: str,
        info: tuple[Any, ...],
        start: dt.date,
        end: dt.date,
    ) -> None:
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

    @_serialized
    async def write(self, writes: Sequence[Write]) -> list[Written]:
        """Write a batch in one transaction; one item's failure never fails the others.

        The common case (nothing fails) costs one transaction without savepoints.
        When an item fails, the batch is rolled back and written again with a
        savepoint around each item, so only the failing items are left out.
        Raises StoreUnavailable when the database itself fails.
        """
        try:
            conn = await self._connection()
            # A tenant whose schema cannot be prepared fails its own items only.
            unready: dict[str, ItemFailed] = {}
            for w in writes:
                if w.rows and valid_tenant(w.tenant) and w.tenant not in unready:
                    try:
                        await self._prepare(conn, w)
                    except ItemFailed as failed:
                        unready[w.tenant] = failed
            fast = await self._write_pipelined(conn, writes, unready)
            if fast is not None:
                return fast
            results = []
            async with conn.transaction():
                for w in writes:
                    try:
                        async with conn.transaction():
                            results.append(await self._write_one(conn, w, unready))
                    except ItemFailed as failed:
                        results.append(Written(failure=failed))
            return results
        except psycopg.Error as exc:
            # Not attributable to an item: the connection or the commit failed.
            await self._discard()
            raise StoreUnavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc

    async def _write_pipelined(
        self,
        conn: psycopg.AsyncConnection[Any],
        writes: Sequence[Write],
        unready: dict[str, ItemFailed],
    ) -> list[Written] | None:
        """Every row of the batch in one transaction and one pipelined round trip.

        None when an item failed in a way that needs a rollback: the caller
        then writes item by item, to find out which. An item that is a single
        update whose row is missing wrote nothing, so it fails alone and the
        rest of the batch commits (updates that overtake their upserts are
        common: rolling the batch back for each would write it twice).
        """
        if any(w.rows and w.tenant in unready for w in writes):
            return None
        # One plan per tenant schema: a step writes into one schema's table.
        by_schema: dict[str, list[tuple[Rows, ...]]] = {}
        owner: dict[int, list[int]] = {}  # id(update block) -> the writes holding it
        try:
            for i, w in enumerate(writes):
                if w.rows:
                    by_schema.setdefault(schema_name(w.tenant), []).append(w.rows)
                    for b in w.rows:
                        if b.op == "update":
                            owner.setdefault(id(b), []).append(i)
            async with conn.transaction():
                updates: list[tuple[psycopg.AsyncCursor[Any], Rows]] = []
                async with conn.pipeline():
                    for schema, items in by_schema.items():
                        for step in plan(items):
                            stmt = _sql(schema, step.block)
                            for rows in step.rounds:
                                cur = conn.cursor()
                                await cur.execute(stmt, (_jsonb(rows),))
                                if step.block.op == "update":
                                    updates.append((cur, step.block))
                missing: dict[int, ItemFailed] = {}
                for cur, block in updates:
                    if cur.rowcount == 0:
                        held_by = owner[id(block)]
                        if len(held_by) > 1 or len(writes[held_by[0]].rows) > 1:
                            raise _SomeItemFailed  # other rows of its item must not commit
                        missing[held_by[0]] = _not_found(block)
                results = []
                for i, w in enumerate(writes):
                    if i in missing:
                        results.append(Written(failure=missing[i]))
                    elif w.exhausted is not None:
                        inserted = await self._insert_exhausted(conn, w.exhausted)
                        results.append(Written(inserted=inserted))
                    else:
                        results.append(Written())
                return results
        except (_SomeItemFailed, ItemFailed):
            return None
        except psycopg.Error as exc:
            if connection_lost(exc):
                raise
            return None

    async def _prepare(self, conn: psycopg.AsyncConnection[Any], w: Write) -> None:
        """Create the tenant's schema, tables and partitions this write needs."""
        schema = schema_name(w.tenant)
        try:
            await self._ensure_tenant(conn, schema)
            for block in w.rows:
                for month in block.partitions:
                    await self._ensure_partition(conn, schema, block.table, month)
        except psycopg.Error as exc:
            if connection_lost(exc):
                raise
            raise ItemFailed(
                FailureKind.TRANSIENT, Reason.DATABASE, f"preparing {schema}: {exc}".strip()
            ) from exc

    async def _write_one(
        self, conn: psycopg.AsyncConnection[Any], w: Write, unready: dict[str, ItemFailed]
    ) -> Written:
        if w.tenant in unready and w.rows:
            raise unready[w.tenant]
        try:
            if w.exhausted is not None:
                return Written(inserted=await self._insert_exhausted(conn, w.exhausted))
            schema = schema_name(w.tenant)
            for block in w.rows:
                stmt = _sql(schema, block)
                for rows in rounds((block,)):
                    cur = await conn.execute(stmt, (_jsonb(rows),))
                    if block.op == "update" and cur.rowcount == 0:
                        raise _not_found(block)
            return Written()
        except psycopg.Error as exc:
            if connection_lost(exc):
                raise
            if data_problem(exc):
                # The rows themselves are unacceptable: retrying cannot help.
                raise ItemFailed(
                    FailureKind.PERMANENT, Reason.VALIDATION, str(exc).strip()
                ) from exc
            raise ItemFailed(FailureKind.TRANSIENT, Reason.DATABASE, str(exc).strip()) from exc

    async def _insert_exhausted(
        self, conn: psycopg.AsyncConnection[Any], row: ExhaustedRow
    ) -> bool:
        # Text columns cannot hold NUL: the row must always be storable, or its
        # message could never leave the stream. raw_payload keeps the exact bytes.
        row = msgspec.structs.replace(
            row,
            company_id=_text(row.company_id),
            source_subject=_text(row.source_subject),
            last_error=_text(row.last_error),
            reason=_text(row.reason),
            dlq_subject=_text(row.dlq_subject),
            event_timestamp=row.event_timestamp and _text(row.event_timestamp),
        )
        digest = hashlib.md5(row.raw, usedforsecurity=False).hexdigest()

        async def insert(envelope: str, original: str | None, raw: bytes | None) -> bool:
            cur = await conn.execute(
                _INSERT_EXHAUSTED,
                (
                    row.company_id,
                    # Indexed columns: an index entry must fit a btree page.
                    row.source_subject[:_MAX_INDEXED_TEXT],
                    row.last_error,
                    row.retry_count,
                    row.event_timestamp,
                    envelope,
                    original,
                    row.reason,
                    row.dlq_stream,
                    row.dlq_sequence,
                    row.dlq_subject,
                    digest,
                    raw,
                ),
            )
            return cur.rowcount == 1

        if row.envelope_json is not None:
            try:
                async with conn.transaction():
                    return await insert(
                        row.envelope_json.decode(),
                        row.original_json.decode() if row.original_json else None,
                        None,
                    )
            except (psycopg.errors.DataError, UnicodeDecodeError) as exc:
                # JSON that jsonb refuses (e.g. \u0000, too deep): keep the raw bytes.
                log.warning(
                    "exhausted payload not storable as jsonb, keeping raw bytes",
                    extra={"error": str(exc).strip()[:200]},
                )
        # The body is not storable as JSON: keep it byte for byte, and describe it.
        stand_in = msgspec.json.encode(
            {
                "undecodable": True,
                "dlq_subject": row.dlq_subject,
                "error": row.last_error,
                "size": len(row.raw),
            }
        ).decode()
        return await insert(stand_in, None, row.raw)

    @_serialized
    async def exhausted_stats(self) -> dict[str, tuple[int, float]]:
        """Per tenant: unresolved exhausted events, and the oldest one's age in seconds."""
        conn = await self._connection()
        try:
            async with conn.transaction():
                cur = await conn.execute(
                    "SELECT company_id, count(*), extract(epoch FROM now() - min(created_at))"
                    " FROM public.exhausted_events WHERE NOT resolved GROUP BY company_id"
                )
                return {str(r[0]): (int(r[1]), float(r[2])) for r in await cur.fetchall()}
        except psycopg.Error as exc:
            await self._discard()
            raise StoreUnavailable(str(exc).strip()) from exc
