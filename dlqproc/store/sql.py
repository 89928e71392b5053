"""The store's pure parts: SQL rendered from row shapes, and what a database error means.

Nothing here talks to a server, so all of it is unit-tested without one.
Identifiers only ever reach SQL through psycopg.sql.Identifier, and a tenant id
only once it is valid (`schema_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.pq import ConnStatus
from psycopg.types.json import Jsonb

from dlqproc.envelope import tenant_schema, valid_tenant
from dlqproc.model import FailureKind, Reason, Rows
from dlqproc.rows import Shape, payload, shape
from dlqproc.store.results import Failure, ItemFailed

ErrorClass = Literal["outage", "data", "resource", "bug"]

# SQLSTATEs (PostgreSQL appendix A) that end or refuse the session itself:
# admin_shutdown, crash_shutdown, cannot_connect_now, database_dropped,
# idle_session_timeout. The rest of class 57 (query_canceled by a statement
# timeout, operator_intervention) is about one statement.
_SESSION_ENDED = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05"})
# Data exceptions, integrity violations, syntax/undefined objects and program
# limits are about the rows a handler produced: retrying cannot help.
_DATA_CLASSES = frozenset({"22", "23", "42", "54"})
_MAX_MESSAGE = 4000  # characters of an error kept in a Failure


def classify(exc: BaseException, conn_ok: bool) -> ErrorClass:
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


def usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    return not conn.closed and not conn.broken and conn.info.status == ConnStatus.OK


def is_outage(exc: BaseException, conn: psycopg.AsyncConnection[Any]) -> bool:
    return classify(exc, usable(conn)) == "outage"


# libpq reports a refused login as text only (no SQLSTATE reaches the client).
_REFUSED_LOGIN = ("password authentication failed", "no password supplied")


def credentials_refused(message: str) -> bool:
    """Whether a connection error says the server refused who we are."""
    return any(text in message for text in _REFUSED_LOGIN)


def brief(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def internal_error(exc: BaseException) -> str:
    """The message of a bug's item failure: "internal error: <Type>: <msg>"."""
    return brief(f"internal error: {type(exc).__name__}: {exc}")


def item_failure(exc: BaseException) -> Failure:
    """The failure of one item's write, for an exception that is not an outage."""
    if isinstance(exc, ItemFailed):
        return exc.failure
    match classify(exc, conn_ok=True):
        case "data":
            return Failure(FailureKind.PERMANENT, Reason.VALIDATION, brief(str(exc)))
        case "bug":
            return Failure(FailureKind.TRANSIENT, Reason.HANDLER_ERROR, internal_error(exc))
        case _:
            return Failure(FailureKind.TRANSIENT, Reason.DATABASE, brief(str(exc)))


def prepare_failure(tenant: str, exc: BaseException) -> Failure:
    """A tenant whose schema or tables cannot be made: transient, its items fail."""
    if classify(exc, conn_ok=True) == "bug":
        return Failure(FailureKind.TRANSIENT, Reason.HANDLER_ERROR, internal_error(exc))
    schema = tenant_schema(tenant)
    return Failure(FailureKind.TRANSIENT, Reason.DATABASE, brief(f"preparing {schema}: {exc}"))


def not_found(block: Rows) -> Failure:
    # Transient: the upsert that creates the row may still be on its way.
    return Failure(
        FailureKind.TRANSIENT,
        Reason.NOT_FOUND,
        f"{block.table} row {block.keys[0].decode()} not found",
    )


def schema_name(tenant: str) -> str:
    """The tenant's schema (envelope.tenant_schema), or ItemFailed for an invalid tenant."""
    if not valid_tenant(tenant):
        raise ItemFailed(FailureKind.PERMANENT, Reason.INVALID_TENANT, f"invalid tenant {tenant!r}")
    return tenant_schema(tenant)


def block_sql(schema: str, block: Rows) -> bytes:
    """The statement that writes `block` into `schema`; its parameters are `params`."""
    return statement(schema, shape(block), block.shared_columns)


def params(block: Rows, rows: Sequence[bytes]) -> tuple[Jsonb, ...]:
    """`block_sql`'s parameters for a round of its rows: [the shared values,] the rows."""
    if block.shared_columns:
        return (Jsonb(block.shared, dumps=_already_json), jsonb(rows))
    return (jsonb(rows),)


def assignment(
    target: sql.Identifier, col: str, source: str, monotonic: Sequence[str]
) -> sql.Composable:
    """`col = source.col`; a monotonic column takes the greater (GREATEST ignores NULL)."""
    ident = sql.Identifier(col)
    value = sql.SQL("{}.{}").format(sql.Identifier(source), ident)
    if col in monotonic:
        return sql.SQL("{} = GREATEST({}.{}, {})").format(ident, target, ident, value)
    return sql.SQL("{} = {}").format(ident, value)


@lru_cache(maxsize=1024)
def statement(schema: str, block_shape: Shape, shared: tuple[str, ...] = ()) -> bytes:
    """SQL for one block shape; its parameter is the rows as a jsonb array.

    jsonb_populate_recordset types every value by the table's own row type, so
    one statement writes a whole block whatever its size. With `shared`
    columns, a first parameter holds their one value as a jsonb object, read
    once by jsonb_populate_record and joined to every row. Identifiers are
    always quoted by psycopg; rendered to bytes once per shape.
    """
    op, table, key, columns, monotonic, insert_only = block_shape
    target = sql.Identifier(schema, table)
    recordset = sql.SQL("jsonb_populate_recordset(NULL::{}, %s)").format(target)
    every = columns + shared

    def assign(col: str, source: str) -> sql.Composable:
        return assignment(target, col, source, monotonic)

    if op == "upsert":
        updates = [assign(c, "excluded") for c in every if c not in key and c not in insert_only]
        updates.append(sql.SQL("updated_at = now()"))
        cols = sql.SQL(", ").join(map(sql.Identifier, every))
        if shared:
            values = sql.SQL(", ").join(
                [sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns]
                + [sql.SQL("s.{}").format(sql.Identifier(c)) for c in shared]
            )
            source = sql.SQL("jsonb_populate_record(NULL::{}, %s) AS s, {} AS r").format(
                target, recordset
            )
        else:
            values, source = cols, recordset
        return (
            sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT ({}) DO UPDATE SET {}")
            .format(
                target,
                cols,
                values,
                source,
                sql.SQL(", ").join(map(sql.Identifier, key)),
                sql.SQL(", ").join(updates),
            )
            .as_bytes(None)
        )
    sets = [assign(c, "r") for c in columns if c not in key]
    sets += [assign(c, "s") for c in shared]
    sets.append(sql.SQL("updated_at = now()"))
    matches = sql.SQL(" AND ").join(
        sql.SQL("{}.{} = r.{}").format(target, sql.Identifier(k), sql.Identifier(k)) for k in key
    )
    rows = sql.SQL("{} AS r").format(recordset)
    if shared:
        rows = sql.SQL("jsonb_populate_record(NULL::{}, %s) AS s, {}").format(target, rows)
    return (
        sql.SQL("UPDATE {} SET {} FROM {} WHERE {}")
        .format(target, sql.SQL(", ").join(sets), rows, matches)
        .as_bytes(None)
    )


def _already_json(data: bytes) -> bytes:
    return data  # the rows were encoded by the worker


def jsonb(rows: Sequence[bytes]) -> Jsonb:
    """A round's rows as the one jsonb parameter of its statement, never re-encoded."""
    return Jsonb(payload(rows), dumps=_already_json)
