"""PostgreSQL: migrations, tenant schemas, batch writes and exhausted events.

The only module that imports psycopg. The supervisor is its only caller, and
every write it makes is idempotent (upserts keyed on the event's identity, an
exhausted row keyed on the DLQ message), so a redelivery rewrites the same rows.

It also owns what a database failure means (`classify`). `Store.write` raises
StoreUnavailable for an outage only: the database cannot be reached, the
connection broke, or the transaction as a whole failed to commit. Anything else,
a bug included, fails the writes involved (each gets its own ItemFailed) while
the others commit. An exhausted row never fails for an item reason: its values
are normalised first, and a row PostgreSQL still refuses is replaced by a
minimal one with the same key. Monthly partitions are created only inside a
window of months and at most `max_new_partitions` per write.

Tenancy: a tenant's schema is "daisi_" + its id verbatim (envelope.tenant_schema),
always quoted, so "acme" and "ACME" never share one (operators quote mixed-case
names: "daisi_ACME"). Before a schema is created the tenant is admitted
(`_ensure_tenant`): tenants.allow, when set, must list it, and a tenant new to
public.dlqproc_tenants is admitted only while fewer than
tenants.maxNewPerHour were recorded in the last hour. The count lives in
PostgreSQL, so every replica applies one limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.resources
import logging
import re
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import lru_cache
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import msgspec
import psycopg
from psycopg import sql
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg.types.json import Jsonb

from dlqproc import bulk
from dlqproc.envelope import refusal, tenant_or_invalid, tenant_schema, valid_tenant
from dlqproc.model import FailureKind, Reason, Rows
from dlqproc.rows import Form, Shape, payload, plan, rounds, shape

log = logging.getLogger("dlqproc.store")

_MIGRATION_FILE = re.compile(r"^(\d+)_[a-z0-9_]+\.sql$")
# Arbitrary constant: serialises migrations of concurrently starting replicas.
_MIGRATION_LOCK = 0x646C7170
# Another: serialises admitting new tenants across replicas, so the cap is exact.
_NEW_TENANT_LOCK = 0x646C7174


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
    """An outage: the database cannot be reached, the connection broke, or the
    transaction as a whole failed to commit. No item is to blame for it."""


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
    # The failed event's own bytes when they were not JSON: kept in raw_payload.
    original_raw: bytes | None = None


class Write(msgspec.Struct, frozen=True):
    """What one message needs written: rows for its tenant, or an exhausted row."""

    tenant: str = ""
    rows: tuple[Rows, ...] = ()
    exhausted: ExhaustedRow | None = None


class Written(msgspec.Struct, frozen=True):
    """The result for one Write: failed (with its classification) or done."""

    failure: ItemFailed | None = None
    inserted: bool = False  # an exhausted row was inserted (not already there)


Failure = Literal["outage", "data", "resource", "bug"]

# SQLSTATEs (PostgreSQL appendix A) that end or refuse the session itself:
# admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped,
# idle_session_timeout. The rest of class 57 (query_canceled by a statement
# timeout, operator_intervention) is about one statement.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
# Data exceptions, integrity violations, syntax/undefined objects and program
# limits are about the rows a handler produced: retrying cannot help.
_DATA_CLASSES = frozenset({"22", "23", "42", "54"})
_MAX_MESSAGE = 4000  # characters of an error kept in an ItemFailed


def classify(exc: BaseException, conn_ok: bool) -> Failure:
    """What an exception raised while writing means for the retry policy.

    `conn_ok` is the connection's state after the error (open, not broken,
    status OK). Only these are an "outage" (pause, spend no budget): a
    connection that is not ok, whatever raised; SQLSTATE class 08; 57P01..57P05.
    On a live connection:
    - "data": PostgreSQL refuses the values (classes 22, 23, 42, 54, or a
      client-side DataError such as a NUL in a string); permanent.
    - "resource": any other server error (53xxx out of memory, shared memory or
      disk, 57014 statement timeout, 55P03 lock not available, 40001/40P01
      serialization failure/deadlock, 58xxx, XX000, ...) or a client-side
      OperationalError; this write may succeed later, so it spends budget.
    - "bug": an exception that is not psycopg's (e.g. a ValueError from date
      arithmetic) or a client-side misuse of psycopg; transient, spends budget,
      and fails only the writes it happened in.
    """
    if not conn_ok:
        return "outage"
    if not isinstance(exc, psycopg.Error):
        return "bug"
    state = exc.sqlstate
    if state is None:  # raised client-side
        if isinstance(exc, psycopg.DataError):
            return "data"
        return "resource" if isinstance(exc, psycopg.OperationalError) else "bug"
    if state[:2] == "08" or state in _SESSION_ENDED:
        return "outage"
    return "data" if state[:2] in _DATA_CLASSES else "resource"


def internal_error(exc: BaseException) -> str:
    """The message of a bug's item failure: "internal error: <Type>: <msg>"."""
    return _brief(f"internal error: {type(exc).__name__}: {exc}")


def _brief(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _item_failure(exc: BaseException) -> ItemFailed:
    """The failure of one item's write, for an exception that is not an outage."""
    if isinstance(exc, ItemFailed):
        return exc
    match classify(exc, conn_ok=True):
        case "data":
            return ItemFailed(FailureKind.PERMANENT, Reason.VALIDATION, _brief(str(exc)))
        case "bug":
            return ItemFailed(FailureKind.TRANSIENT, Reason.HANDLER_ERROR, internal_error(exc))
        case _:
            return ItemFailed(FailureKind.TRANSIENT, Reason.DATABASE, _brief(str(exc)))


def _prepare_failure(tenant: str, exc: BaseException) -> ItemFailed:
    """A tenant whose schema or tables cannot be made: transient, its items fail."""
    if classify(exc, conn_ok=True) == "bug":
        return ItemFailed(FailureKind.TRANSIENT, Reason.HANDLER_ERROR, internal_error(exc))
    schema = tenant_schema(tenant)
    return ItemFailed(FailureKind.TRANSIENT, Reason.DATABASE, _brief(f"preparing {schema}: {exc}"))


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    return not conn.closed and not conn.broken and conn.info.status == ConnStatus.OK


def _outage(exc: BaseException, conn: psycopg.AsyncConnection[Any]) -> bool:
    return classify(exc, _usable(conn)) == "outage"


def schema_name(tenant: str) -> str:
    """The tenant's schema (envelope.tenant_schema), or ItemFailed for an invalid tenant."""
    if not valid_tenant(tenant):
        raise ItemFailed(FailureKind.PERMANENT, Reason.INVALID_TENANT, f"invalid tenant {tenant!r}")
    return tenant_schema(tenant)


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


def _last_month(horizon: float) -> tuple[int, int]:
    """(year, month) of now + horizon seconds, clamped to what dates can hold."""
    instant = time.time() + horizon
    if not 0.0 <= instant <= _LAST_INSTANT:  # also NaN
        instant = 0.0 if instant < 0.0 else _LAST_INSTANT
    last = dt.datetime.fromtimestamp(instant, dt.UTC)
    return last.year, last.month


class _PartitionBudget:
    """What one write() may still do about partitions: how many to create, up to when."""

    def __init__(self, left: int, last_month: tuple[int, int]) -> None:
        self.left = left
        self.last_month = last_month

    def admits(self, start: dt.date) -> bool:
        return _FIRST_MONTH <= (start.year, start.month) <= self.last_month


# source_subject is indexed: an index entry must fit a third of a btree page
# (~2.7 kB), and dlq_subject is held to the same limit.
_MAX_SUBJECT_BYTES = 1024
_MAX_COMPANY_BYTES = 256  # indexed too; a valid tenant has at most 57 characters
_MAX_ERROR_BYTES = 16 * 1024
_MINIMAL_SUBJECT_BYTES = 256
_MINIMAL_REFUSED_CHARS = 500
_INT4 = (-(2**31), 2**31 - 1)


def _text(value: str) -> str:
    """A string PostgreSQL's text type accepts: no NUL, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    return value.encode("utf-8", "replace").decode("utf-8")


def _cut(value: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of a _text() string, cut at a character boundary."""
    data = value.encode("utf-8")
    return value if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _ascii(value: str, limit: int) -> str:
    """Printable ASCII (Python escapes for the rest), at most `limit` bytes."""
    return value.encode("unicode_escape")[:limit].decode("ascii")


def _timestamp(value: str | None) -> dt.datetime | None:
    """An ISO 8601 timestamp as an aware UTC datetime (naive means UTC).

    None for anything else, including offsets PostgreSQL refuses (+20:00,
    +05:30:15.123456: handled here instead) and instants that overflow once in
    UTC. Every UTC datetime Python holds is within PostgreSQL's range. Only
    printable ASCII can be ISO 8601; fromisoformat would read a NUL as the end.
    """
    if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=dt.UTC)
        return parsed.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        return None


def _int4(value: int) -> int:
    return min(max(value, _INT4[0]), _INT4[1])


_RECORD_TENANT = (
    "INSERT INTO public.dlqproc_tenants (tenant, created_at) VALUES (%s, %s::timestamptz)"
    " ON CONFLICT (tenant) DO NOTHING"
)
_RECENT_TENANTS = (
    "SELECT count(*) FROM public.dlqproc_tenants WHERE created_at > now() - interval '1 hour'"
)

_INSERT_EXHAUSTED = """
INSERT INTO public.exhausted_events (
    company_id, source_subject, last_error, retry_count, event_timestamp,
    dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, dlq_subject,
    payload_digest, raw_payload)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s)
ON CONFLICT (dlq_stream, dlq_sequence, payload_digest) DO NOTHING
RETURNING id
"""


def _digest(row: ExhaustedRow) -> str:
    # The idempotency key's body part: always the DLQ message body as received.
    return hashlib.md5(row.raw, usedforsecurity=False).hexdigest()


def _full_row(
    row: ExhaustedRow, dlq_payload: str, original: str | None, raw: bytes | None
) -> tuple[Any, ...]:
    """The parameters of _INSERT_EXHAUSTED for the full row, values normalised."""
    return (
        _cut(_text(row.company_id), _MAX_COMPANY_BYTES),
        _cut(_text(row.source_subject), _MAX_SUBJECT_BYTES),
        _cut(_text(row.last_error), _MAX_ERROR_BYTES),
        _int4(row.retry_count),
        _timestamp(row.event_timestamp),
        dlq_payload,
        original,
        _text(row.reason),
        row.dlq_stream,
        row.dlq_sequence,
        _cut(_text(row.dlq_subject), _MAX_SUBJECT_BYTES),
        _digest(row),
        raw,
    )


def _as_jsonb(row: ExhaustedRow, envelope: bytes) -> tuple[Any, ...]:
    """The full row with the envelope and original payload as jsonb."""
    original = row.original_json.decode() if row.original_json else None
    return _full_row(row, envelope.decode(), original, row.original_raw)


def _as_stand_in(row: ExhaustedRow) -> tuple[Any, ...]:
    """The full row for a body jsonb cannot hold: its bytes, and a description."""
    stand_in = {
        "undecodable": True,
        "dlq_subject": _cut(_text(row.dlq_subject), _MAX_SUBJECT_BYTES),
        "error": _cut(_text(row.last_error), _MAX_ERROR_BYTES),
        "size": len(row.raw),
    }
    raw = row.original_raw if row.original_raw is not None else row.raw
    return _full_row(row, msgspec.json.encode(stand_in).decode(), None, raw)


def _minimal_row(row: ExhaustedRow, refused: BaseException) -> tuple[Any, ...]:
    """A row PostgreSQL always accepts, with the full row's key.

    Short ASCII or tenant-shaped text, no timestamp, no original payload, a
    small JSON dlq_payload; raw_payload is the DLQ message body as received,
    the one complete record left (its md5 is payload_digest).
    """
    why = _text(f"{type(refused).__name__}: {refused}".strip())[:_MINIMAL_REFUSED_CHARS]
    note = f"\n[dlqproc: the full exhausted row was refused ({why}); stored a minimal row]"
    room = max(_MAX_ERROR_BYTES - len(note.encode("utf-8")), 0)
    dlq_subject = _ascii(row.dlq_subject, _MINIMAL_SUBJECT_BYTES)
    payload = {"minimal": True, "refused": why, "dlq_subject": dlq_subject, "size": len(row.raw)}
    return (
        tenant_or_invalid(row.company_id),
        _ascii(row.source_subject, _MINIMAL_SUBJECT_BYTES),
        _cut(_text(row.last_error), room) + note,
        _int4(row.retry_count),
        None,
        msgspec.json.encode(payload).decode(),
        None,
        _text(row.reason),
        row.dlq_stream,
        row.dlq_sequence,
        dlq_subject,
        _digest(row),
        row.raw,
    )


class Store:
    """One connection owned by the supervisor; reconnected when it breaks.

    partition_horizon: how far ahead of now (seconds) a month may lie for its
    partition to be created; max_new_partitions: how many one write() may create.
    allow: the tenants that may be written (empty: any); max_new_tenants_per_hour:
    new tenants admitted per hour across replicas (0: no limit).
    rows_form: how the workers encode rows (dlqproc.rows.encode), so how they
    are written: "copy" (dlqproc.bulk) or "json" (the earlier jsonb path).
    """

    def __init__(
        self,
        dsn: str,
        statement_timeout: float,
        tenant_ddl: Sequence[str],
        *,
        partition_horizon: float = 7 * 86400,
        max_new_partitions: int = 12,
        allow: frozenset[str] = frozenset(),
        max_new_tenants_per_hour: int = 0,
        rows_form: Form = "json",
    ) -> None:
        self._rows_form: Form = rows_form
        self._dsn = dsn
        self._allow = allow
        self._max_new_tenants = max_new_tenants_per_hour
        self._horizon = partition_horizon
        self._max_new_partitions = max_new_partitions
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
        except Exception as exc:
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

    async def _ensure_tenant(self, conn: psycopg.AsyncConnection[Any], tenant: str) -> None:
        """Admit the tenant, then create its schema and tables on first use.

        ItemFailed PERMANENT tenant_refused when tenants.allow does not list it
        (checked on every write: the allow-list is the last word); TRANSIENT
        tenant_limit when it is new and the hour's cap is reached (see
        _record_tenant). Nothing is created for a tenant that is not admitted.
        """
        schema = schema_name(tenant)  # an invalid tenant fails as such first
        refused = refusal(tenant, self._allow)
        if refused is not None:
            raise ItemFailed(FailureKind.PERMANENT, Reason.TENANT_REFUSED, refused)
        if schema in self._tenants:
            return
        async with conn.transaction():
            # Concurrent replicas may create the same schema; the lock orders them.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
            await self._record_tenant(conn, tenant, schema)
            ident = sql.Identifier(schema)
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            for ddl in self._tenant_ddl:
                await conn.execute(sql.SQL(ddl).format(schema=ident))
        self._tenants.add(schema)

    async def _record_tenant(
        self, conn: psycopg.AsyncConnection[Any], tenant: str, schema: str
    ) -> None:
        """Record the tenant in public.dlqproc_tenants, or refuse it for now.

        A schema that exists already (made by an older dlqproc or an operator)
        is recorded with created_at -infinity: it costs nothing new, so it is
        never counted against the cap. A new one takes a lock shared by every
        replica, so two replicas cannot both admit the cap's last tenant.
        """
        cur = await conn.execute(
            "SELECT 1 FROM public.dlqproc_tenants WHERE tenant = %s", (tenant,)
        )
        if await cur.fetchone() is not None:
            return
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is not None:
            await conn.execute(_RECORD_TENANT, (tenant, "-infinity"))
            return
        cap = self._max_new_tenants
        if cap > 0:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_NEW_TENANT_LOCK,))
            cur = await conn.execute(_RECENT_TENANTS)
            row = await cur.fetchone()
            recent = int(row[0]) if row else 0
            if recent >= cap:
                raise ItemFailed(
                    FailureKind.TRANSIENT,
                    Reason.TENANT_LIMIT,
                    f"new tenant {tenant!r} not admitted yet: {recent} tenants were created"
                    f" in the last hour, tenants.maxNewPerHour is {cap}",
                )
        await conn.execute(_RECORD_TENANT, (tenant, "now"))

    @_serialized
    async def tenants_known(self) -> int:
        """How many tenants public.dlqproc_tenants records (admitted, or found existing)."""
        conn = await self._connection()
        try:
            async with conn.transaction():
                cur = await conn.execute("SELECT count(*) FROM public.dlqproc_tenants")
                row = await cur.fetchone()
                return int(row[0]) if row else 0
        except psycopg.Error as exc:
            await self._discard()
            raise StoreUnavailable(str(exc).strip()) from exc

    async def _ensure_partition(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        table: str,
        month: str,
        budget: _PartitionBudget,
    ) -> None:
        """Create the month's partition of a range-partitioned table on first use.

        Only for a month from 2009-01 to the month of now + partition_horizon,
        and while the write's budget lasts: a hostile timestamp must not create
        partitions by the thousand (each costs locks in every later statement on
        the table). Rows of other months land in the default partition, and
        move out of it when their month's partition is created by a later write:
        PostgreSQL refuses to attach a partition whose rows the default holds.
        Never raises but for an outage; a failure leaves rows in the default.
        """
        key = (schema, table, month)
        if key in self._partitions or budget.left <= 0:
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
                cur = await conn.execute(
                    "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = %s AND c.relname = %s",
                    (schema, part),
                )
                if await cur.fetchone() is None:
                    cur = await conn.execute(_PARTITION_INFO, (schema, table))
                    info = await cur.fetchone()
                    if info is not None:
                        budget.left -= 1  # spent by the attempt: a failing one costs too
                        await self._create_partition(conn, schema, table, part, info, start, end)
        except Exception as exc:
            if _outage(exc, conn):
                raise
            log.warning(
                "could not create partition",
                extra={"schema": schema, "partition": part, "error": _brief(str(exc))},
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
        Returns one Written per Write: an item's failure (data, resource or bug,
        see `classify`) is in its `failure`. Raises StoreUnavailable for an
        outage only: no connection, a broken one, or a transaction that failed
        as a whole (its BEGIN or COMMIT).
        """
        conn = await self._connection()
        try:
            budget = _PartitionBudget(self._max_new_partitions, _last_month(self._horizon))
            unready = await self._prepare_all(conn, writes, budget)
            fast = await self._write_pipelined(conn, writes, unready)
            if fast is not None:
                return fast
            async with conn.transaction():
                return [await self._write_isolated(conn, w, unready) for w in writes]
        except Exception as exc:
            # Item failures were all caught where they happened: what reaches
            # here is an outage, or the transaction itself failing.
            await self._discard()
            raise StoreUnavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc

    async def _prepare_all(
        self,
        conn: psycopg.AsyncConnection[Any],
        writes: Sequence[Write],
        budget: _PartitionBudget,
    ) -> dict[str, ItemFailed]:
        """Prepare every tenant the batch writes to; a failure fails that tenant's items only."""
        unready: dict[str, ItemFailed] = {}
        for w in writes:
            if not w.rows or w.tenant in unready:
                continue
            try:
                await self._prepare(conn, w, budget)
            except ItemFailed as failed:
                unready[w.tenant] = failed
            except Exception as exc:
                if _outage(exc, conn):
                    raise
                unready[w.tenant] = _prepare_failure(w.tenant, exc)
        return unready

    async def _prepare(
        self, conn: psycopg.AsyncConnection[Any], w: Write, budget: _PartitionBudget
    ) -> None:
        """Create the tenant's schema, tables and partitions this write needs."""
        await self._ensure_tenant(conn, w.tenant)
        schema = schema_name(w.tenant)
        for block in w.rows:
            for month in block.partitions:
                await self._ensure_partition(conn, schema, block.table, month, budget)
        if self._rows_form == "copy":
            await bulk.prepare(conn, schema, w.rows)

    async def _write_pipelined(
        self,
        conn: psycopg.AsyncConnection[Any],
        writes: Sequence[Write],
        unready: dict[str, ItemFailed],
    ) -> list[Written] | None:
        """Every row of the batch in one transaction and one pipelined round trip.

        None when an item failed in a way that needs a rollback, whatever the
        exception (but an outage, which propagates): the caller then writes item
        by item, to find out which. An item that is a single update whose row
        is missing wrote nothing, so it fails alone and the rest of the batch
        commits (updates that overtake their upserts are common: rolling the
        batch back for each would write it twice).
        """
        if any(w.rows and w.tenant in unready for w in writes):
            return None
        try:
            return await self._write_all(conn, writes)
        except Exception as exc:
            if _outage(exc, conn):
                raise
            return None

    async def _write_all(
        self, conn: psycopg.AsyncConnection[Any], writes: Sequence[Write]
    ) -> list[Written]:
        # One plan per tenant schema: a step writes into one schema's table.
        by_schema: dict[str, list[tuple[Rows, ...]]] = {}
        owner: dict[int, list[int]] = {}  # id(update block) -> the writes holding it
        for i, w in enumerate(writes):
            if w.rows:
                by_schema.setdefault(schema_name(w.tenant), []).append(w.rows)
                for b in w.rows:
                    if b.op == "update":
                        owner.setdefault(id(b), []).append(i)
        async with conn.transaction():
            updates = await self._write_steps(conn, by_schema)
            missing: dict[int, ItemFailed] = {}
            for count, block in updates:
                if count == 0:
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

    async def _write_isolated(
        self, conn: psycopg.AsyncConnection[Any], w: Write, unready: dict[str, ItemFailed]
    ) -> Written:
        """One item under its own savepoint: any exception but an outage is its failure."""
        try:
            async with conn.transaction():
                return await self._write_one(conn, w, unready)
        except Exception as exc:
            if _outage(exc, conn):
                raise
            return Written(failure=_item_failure(exc))

    async def _write_one(
        self, conn: psycopg.AsyncConnection[Any], w: Write, unready: dict[str, ItemFailed]
    ) -> Written:
        if w.tenant in unready and w.rows:
            raise unready[w.tenant]
        if w.exhausted is not None:
            return Written(inserted=await self._insert_exhausted(conn, w.exhausted))
        schema = schema_name(w.tenant)
        for block in w.rows:
            for rows in rounds((block,)):
                count = await self._write_round(conn, schema, block, rows)
                if block.op == "update" and count == 0:
                    raise _not_found(block)
        return Written()

    # --- Row statements: the hook between the write logic above and the two
    # ways of sending rows (issue 13). Everything form-specific is below. ---

    async def _write_steps(
        self, conn: psycopg.AsyncConnection[Any], by_schema: dict[str, list[tuple[Rows, ...]]]
    ) -> list[tuple[int, Rows]]:
        """Write every step of each schema's plan; (rows affected, block) of each update round."""
        updates: list[tuple[int, Rows]] = []
        if self._rows_form == "copy":
            # COPY cannot run in a pipeline: a round trip or two per round.
            for schema, items in by_schema.items():
                for step in plan(items):
                    for rows in step.rounds:
                        count = await bulk.write_round(conn, schema, step.block, rows)
                        if step.block.op == "update":
                            updates.append((count, step.block))
            return updates
        cursors: list[tuple[psycopg.AsyncCursor[Any], Rows]] = []
        async with conn.pipeline():
            for schema, items in by_schema.items():
                for step in plan(items):
                    stmt = _sql(schema, step.block)
                    for rows in step.rounds:
                        cur = conn.cursor()
                        await cur.execute(stmt, (_jsonb(rows),))
                        if step.block.op == "update":
                            cursors.append((cur, step.block))
        return [(cur.rowcount, block) for cur, block in cursors]

    async def _write_round(
        self, conn: psycopg.AsyncConnection[Any], schema: str, block: Rows, rows: Sequence[bytes]
    ) -> int:
        """One round of one block (distinct keys); the rows affected."""
        if self._rows_form == "copy":
            return await bulk.write_round(conn, schema, block, rows)
        cur = await conn.execute(_sql(schema, block), (_jsonb(rows),))
        return cur.rowcount

    async def _insert_exhausted(
        self, conn: psycopg.AsyncConnection[Any], row: ExhaustedRow
    ) -> bool:
        """Store an exhausted row; True if inserted, False if the message's row was there.

        Its message cannot leave the stream until this succeeds, so it never
        fails for an item reason. Tried in turn, each under its own savepoint:
        the envelope as jsonb; a stand-in describing a body jsonb refuses (e.g.
        \\u0000, too deep) with its bytes in raw_payload; a minimal row with the
        same key. Only an outage propagates (or a minimal row refused, which
        PostgreSQL's own limits cannot cause).
        """
        if row.envelope_json is not None:
            try:
                return await self._insert(conn, lambda: _as_jsonb(row, row.envelope_json or b""))
            except Exception as exc:
                if _outage(exc, conn):
                    raise
                log.warning(
                    "exhausted row refused with its payload as jsonb, keeping raw bytes",
                    extra={"error": _brief(str(exc))[:200]},
                )
        try:
            return await self._insert(conn, lambda: _as_stand_in(row))
        except Exception as exc:
            if _outage(exc, conn):
                raise
            refused = exc
        log.warning(
            "exhausted row refused, stored minimal row",
            extra={"error": _brief(f"{type(refused).__name__}: {refused}")[:500]},
        )
        return await self._insert(conn, lambda: _minimal_row(row, refused))

    @staticmethod
    async def _insert(
        conn: psycopg.AsyncConnection[Any], params: Callable[[], tuple[Any, ...]]
    ) -> bool:
        # params is built inside the savepoint's try, so that a value that
        # cannot even be normalised falls back like a value PostgreSQL refuses.
        async with conn.transaction():
            cur = await conn.execute(_INSERT_EXHAUSTED, params())
            return cur.rowcount == 1

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
