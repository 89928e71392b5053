"""Exhausted events: the one row a message leaves behind once dlqproc gives up on it.

Its message cannot leave the stream until this row is stored, so storing it
never fails for an item reason. Values are normalised first (timestamps
PostgreSQL cannot hold become NULL, text loses NUL and lone surrogates, indexed
text is cut at a character boundary); if PostgreSQL still refuses the row, a
body jsonb cannot hold is stored as a stand-in with its raw bytes; and if that
is refused too, a minimal row with the same key. The key is the DLQ message
(stream, sequence, md5 of its body), so a redelivery inserts nothing twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg

from dlqproc.envelope import tenant_or_invalid
from dlqproc.store.results import ExhaustedRow
from dlqproc.store.sql import brief, is_outage

log = logging.getLogger("dlqproc.store")

# source_subject is indexed: an index entry must fit a third of a btree page
# (~2.7 kB), and dlq_subject is held to the same limit.
_MAX_SUBJECT_BYTES = 1024
_MAX_COMPANY_BYTES = 256  # indexed too; a valid tenant has at most 57 characters
_MAX_ERROR_BYTES = 16 * 1024
_MINIMAL_SUBJECT_BYTES = 256
_MINIMAL_REFUSED_CHARS = 500
_INT4 = (-(2**31), 2**31 - 1)

INSERT = """
INSERT INTO public.exhausted_events (
    company_id, source_subject, last_error, retry_count, event_timestamp,
    dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, dlq_subject,
    payload_digest, raw_payload)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s, %s)
ON CONFLICT (dlq_stream, dlq_sequence, payload_digest) DO NOTHING
RETURNING id
"""

STATS = (
    "SELECT company_id, count(*), extract(epoch FROM now() - min(created_at))"
    " FROM public.exhausted_events WHERE NOT resolved GROUP BY company_id"
)

# Kept by the replay jobs (migration 003), read for dlq_replays_total.
REPLAY_TOTALS = "SELECT company_id, result, n FROM public.exhausted_replay_totals"


def text(value: str) -> str:
    """A string PostgreSQL's text type accepts: no NUL, no lone surrogates."""
    if "\x00" in value:
        value = value.replace("\x00", "\\u0000")
    return value.encode("utf-8", "replace").decode("utf-8")


def cut(value: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes of a text() string, cut at a character boundary."""
    data = value.encode("utf-8")
    return value if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def _ascii(value: str, limit: int) -> str:
    """Printable ASCII (Python escapes for the rest), at most `limit` bytes."""
    return value.encode("unicode_escape")[:limit].decode("ascii")


def timestamp(value: str | None) -> dt.datetime | None:
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


def _digest(row: ExhaustedRow) -> str:
    # The idempotency key's body part: always the DLQ message body as received.
    return hashlib.md5(row.raw, usedforsecurity=False).hexdigest()


def _full_row(
    row: ExhaustedRow, dlq_payload: str, original: str | None, raw: bytes | None
) -> tuple[Any, ...]:
    """The parameters of INSERT for the full row, values normalised."""
    return (
        cut(text(row.company_id), _MAX_COMPANY_BYTES),
        cut(text(row.source_subject), _MAX_SUBJECT_BYTES),
        cut(text(row.last_error), _MAX_ERROR_BYTES),
        _int4(row.retry_count),
        timestamp(row.event_timestamp),
        dlq_payload,
        original,
        text(row.reason),
        row.dlq_stream,
        row.dlq_sequence,
        cut(text(row.dlq_subject), _MAX_SUBJECT_BYTES),
        _digest(row),
        raw,
    )


def as_jsonb(row: ExhaustedRow, envelope: bytes) -> tuple[Any, ...]:
    """The full row with the envelope and original payload as jsonb."""
    original = row.original_json.decode() if row.original_json else None
    return _full_row(row, envelope.decode(), original, row.original_raw)


def as_stand_in(row: ExhaustedRow) -> tuple[Any, ...]:
    """The full row for a body jsonb cannot hold: its bytes, and a description."""
    stand_in = {
        "undecodable": True,
        "dlq_subject": cut(text(row.dlq_subject), _MAX_SUBJECT_BYTES),
        "error": cut(text(row.last_error), _MAX_ERROR_BYTES),
        "size": len(row.raw),
    }
    raw = row.original_raw if row.original_raw is not None else row.raw
    return _full_row(row, msgspec.json.encode(stand_in).decode(), None, raw)


def minimal_row(row: ExhaustedRow, refused: BaseException) -> tuple[Any, ...]:
    """A row PostgreSQL always accepts, with the full row's key.

    Short ASCII or tenant-shaped text, no timestamp, no original payload, a
    small JSON dlq_payload; raw_payload is the DLQ message body as received,
    the one complete record left (its md5 is payload_digest).
    """
    why = text(f"{type(refused).__name__}: {refused}".strip())[:_MINIMAL_REFUSED_CHARS]
    note = f"\n[dlqproc: the full exhausted row was refused ({why}); stored a minimal row]"
    room = max(_MAX_ERROR_BYTES - len(note.encode("utf-8")), 0)
    dlq_subject = _ascii(row.dlq_subject, _MINIMAL_SUBJECT_BYTES)
    payload = {"minimal": True, "refused": why, "dlq_subject": dlq_subject, "size": len(row.raw)}
    return (
        tenant_or_invalid(row.company_id),
        _ascii(row.source_subject, _MINIMAL_SUBJECT_BYTES),
        cut(text(row.last_error), room) + note,
        _int4(row.retry_count),
        None,
        msgspec.json.encode(payload).decode(),
        None,
        text(row.reason),
        row.dlq_stream,
        row.dlq_sequence,
        dlq_subject,
        _digest(row),
        row.raw,
    )


async def insert_exhausted(conn: psycopg.AsyncConnection[Any], row: ExhaustedRow) -> bool:
    """Store an exhausted row; True if inserted, False if the message's row was there.

    Must run inside a transaction. Tried in turn, each under its own savepoint:
    the envelope as jsonb; a stand-in describing a body jsonb refuses (e.g.
    \\u0000, too deep) with its bytes in raw_payload; a minimal row with the
    same key. Only an outage propagates (or a minimal row refused, which
    PostgreSQL's own limits cannot cause).
    """
    envelope = row.envelope_json
    if envelope is not None:
        try:
            return await _insert(conn, lambda: as_jsonb(row, envelope))
        except Exception as exc:
            if is_outage(exc, conn):
                raise
            log.warning(
                "exhausted row refused with its payload as jsonb, keeping raw bytes",
                extra={"error": brief(str(exc))[:200]},
            )
    try:
        return await _insert(conn, lambda: as_stand_in(row))
    except Exception as exc:
        if is_outage(exc, conn):
            raise
        refused = exc
    log.warning(
        "exhausted row refused, stored minimal row",
        extra={"error": brief(f"{type(refused).__name__}: {refused}")[:500]},
    )
    return await _insert(conn, lambda: minimal_row(row, refused))


async def _insert(
    conn: psycopg.AsyncConnection[Any], params: Callable[[], tuple[Any, ...]]
) -> bool:
    # params is built inside the savepoint's try, so that a value that
    # cannot even be normalised falls back like a value PostgreSQL refuses.
    async with conn.transaction():
        cur = await conn.execute(INSERT, params())
        return cur.rowcount == 1
