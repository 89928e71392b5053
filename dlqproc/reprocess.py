"""Reprocessing one delivery into an Outcome: the pure work of a worker process.

Bytes in (a DLQ envelope, or a main lane's event), Outcome out. Nothing here
raises: every failure, from undecodable bytes to a handler bug, becomes a
classified Outcome so one bad message can never fail the batch it travels in.

A body that is not JSON keeps its reason across the DLQ: the main lane fails it
as not_json / too_deep before any handler sees it, the DLQ envelope carries its
bytes as {"base64": ...}, and the DLQ lane unwraps and classifies them again,
so it is exhausted with the same reason and its own bytes (Stored.original_raw).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from dlqproc.envelope import (
    INVALID_TENANT_ID,
    BadInput,
    classify_json,
    decode,
    refusal,
    split_source,
    tenant_of_subject,
    tenant_or_invalid,
    unwrap_base64,
    valid_tenant,
)
from dlqproc.handlers import Registry
from dlqproc.model import (
    Delivery,
    Envelope,
    Event,
    Failed,
    FailureKind,
    HandlerError,
    Lane,
    Ok,
    Outcome,
    Reason,
    RowOp,
    Stored,
    failure,
)
from dlqproc.rows import encode


class Limits(msgspec.Struct, frozen=True):
    dlq_subject: str  # e.g. "v1.dlq"
    max_payload_bytes: int
    # Seconds past the worker's clock that an event's timestamps may lie
    # (Event.not_after); clocks drift, producers queue.
    timestamp_horizon: float = 7 * 86400
    # tenants.allow (empty: every tenant). Checked here so a refused tenant
    # costs no handler work; the store checks it again before any schema.
    allow: frozenset[str] = frozenset()


def not_after(limits: Limits) -> int:
    """Event.not_after for an event handled now: unix seconds, 0 for no bound."""
    bound = time.time() + limits.timestamp_horizon
    # An infinite (or NaN) horizon is no bound at all, not an OverflowError.
    return int(bound) if math.isfinite(bound) else 0


def _failure(
    delivery: Delivery,
    stored: Stored,
    kind: FailureKind,
    reason: Reason,
    error: str,
    base: str = "",
) -> Failed:
    return failure(delivery.token, stored, kind, reason, error, base)


def bare_stored(delivery: Delivery, limits: Limits, as_json: bool = False) -> Stored:
    """What can be stored of a message whose envelope was not (or could not be) read.

    as_json: offer the body to the store as the envelope JSON; the store keeps
    the raw bytes instead when PostgreSQL refuses it.
    """
    tenant = _READERS[delivery.lane].tenant(delivery.subject, limits)
    return Stored(
        company_id=tenant or INVALID_TENANT_ID,
        source_subject=delivery.subject,
        event_timestamp=None,
        envelope_json=delivery.data if as_json else None,
        original_json=None,
    )


# Longer than any ISO 8601 time (with microseconds and a seconds offset, ~40):
# hostile strings are refused before the parser sees them.
MAX_TS_CHARS = 64


def _timestamp(value: str | None) -> str | None:
    """The envelope's ts as ISO 8601 in UTC ("+00:00"), or None. Never raises.

    PostgreSQL's timestamptz refuses offsets Python accepts (+20:00,
    +05:30:15.123456), so the offset is folded into the UTC time; a naive time
    is taken as UTC. A time whose UTC form leaves years 1..9999
    (OverflowError), garbage and over-long strings are None.
    """
    if not value or len(value) > MAX_TS_CHARS:
        return None
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC).isoformat()
    except (ValueError, OverflowError, TypeError):
        return None


def _unwrap(envelope: Envelope, stored: Stored) -> tuple[Stored, BadInput | None]:
    """`stored` with the event's own bytes when the main consumer wrapped them.

    A main-lane body that was not JSON travels as {"base64": ...}: it is
    unwrapped (raw bytes kept), then classified like the main lane did, so the
    failure keeps its reason and the main consumer's error. A wrapper that is
    not base64 is a bad envelope.
    """
    try:
        raw = unwrap_base64(stored.original_json or b"null")
    except BadInput as exc:
        return stored, exc
    if raw is None:
        return stored, None
    bad = classify_json(raw)
    if bad is not None and envelope.error:
        bad = BadInput(bad.reason, f"{bad}; main consumer: {envelope.error[:1000]}")
    unwrapped = msgspec.structs.replace(
        stored, original_json=None if bad else raw, original_raw=raw
    )
    return unwrapped, bad


def reprocess(delivery: Delivery, registry: Registry, limits: Limits) -> Outcome:
    dlq_tenant = tenant_of_subject(delivery.subject, limits.dlq_subject)
    bare = bare_stored(delivery, limits)
    try:
        envelope = decode(delivery.data, limits.max_payload_bytes)
    except BadInput as exc:
        return _failure(delivery, bare, FailureKind.PERMANENT, exc.reason, str(exc))
    stored = Stored(
        company_id=envelope.company,
        source_subject=envelope.source_subject,
        event_timestamp=_timestamp(envelope.ts),
        envelope_json=delivery.data,
        original_json=bytes(envelope.original_payload) or None,
    )
    try:
        if dlq_tenant != envelope.company:
            # The DLQ subject names the tenant the message was routed for; an
            # envelope claiming another tenant must not write there.
            raise BadInput(
                Reason.INVALID_TENANT,
                f"envelope company {envelope.company!r} differs from DLQ subject "
                f"{delivery.subject[:200]!r}",
            )
        base = split_source(envelope.source_subject, envelope.company)
    except BadInput as exc:
        return _failure(delivery, stored, FailureKind.PERMANENT, exc.reason, str(exc))
    refused = refusal(envelope.company, limits.allow)
    if refused is not None:
        return _failure(
            delivery, stored, FailureKind.PERMANENT, Reason.TENANT_REFUSED, refused, base
        )
    stored, bad = _unwrap(envelope, stored)
    if bad is not None:
        return _failure(delivery, stored, FailureKind.PERMANENT, bad.reason, str(bad), base)
    event = Event(
        subject=envelope.source_subject,
        base=base,
        tenant=envelope.company,
        payload=stored.original_json or b"null",
        attempt=delivery.num_delivered,
        meta=delivery.meta,
        not_after=not_after(limits),
    )
    return _handle(delivery, registry, event, stored)


def process_event(delivery: Delivery, registry: Registry, limits: Limits) -> Outcome:
    """A message of a main consumer: the body is the event, the subject `<base>.<tenant>`."""
    base, _, tenant = delivery.subject.rpartition(".")
    valid = valid_tenant(tenant)
    stored = Stored(
        company_id=tenant_or_invalid(tenant),
        source_subject=delivery.subject,
        event_timestamp=None,
        envelope_json=None,
        original_json=None,
    )
    if len(delivery.data) > limits.max_payload_bytes:
        return _failure(
            delivery,
            stored,
            FailureKind.PERMANENT,
            Reason.TOO_BIG,
            f"body of {len(delivery.data)} bytes exceeds {limits.max_payload_bytes}",
            base,
        )
    if not valid:
        return _failure(
            delivery,
            stored,
            FailureKind.PERMANENT,
            Reason.INVALID_TENANT,
            f"invalid tenant {tenant[:80]!r}",
            base,
        )
    refused = refusal(tenant, limits.allow)
    if refused is not None:
        return _failure(
            delivery, stored, FailureKind.PERMANENT, Reason.TENANT_REFUSED, refused, base
        )
    bad = classify_json(delivery.data)
    if bad is not None:
        # Before any handler, which would only see "invalid payload".
        stored = msgspec.structs.replace(stored, original_raw=delivery.data)
        return _failure(delivery, stored, FailureKind.PERMANENT, bad.reason, str(bad), base)
    event = Event(
        subject=delivery.subject,
        base=base,
        tenant=tenant,
        payload=delivery.data,
        attempt=delivery.num_delivered,
        meta=delivery.meta,
        not_after=not_after(limits),
    )
    return _handle(delivery, registry, event, stored)


def _foreign_company(rows: tuple[RowOp, ...], tenant: str) -> str | None:
    """Why a row would carry another tenant's company_id into this tenant's schema."""
    for row in rows:
        company = row.values.get("company_id", tenant)
        if company != tenant:
            return (
                f"{row.table} row has company_id {str(company)[:80]!r},"
                f" not its schema's tenant {tenant!r}"
            )
    return None


def _check_rows(rows: tuple[RowOp, ...]) -> None:
    """A handler bug must fail its event here, not the batch in the supervisor."""
    for row in rows:
        if not isinstance(row, RowOp) or row.op not in ("upsert", "update"):
            raise TypeError(f"handler returned {row!r}, not an upsert or update RowOp")
        if not row.key or not all(isinstance(c, str) for c in row.values):
            raise TypeError(f"RowOp for {row.table!r} needs a key and string column names")
        if any(k not in row.values for k in row.key):
            raise TypeError(f"RowOp for {row.table!r} lacks a value for its key {row.key}")


def _dlq_tenant(subject: str, limits: Limits) -> str:
    return tenant_of_subject(subject, limits.dlq_subject)


def _event_tenant(subject: str, limits: Limits) -> str:
    tenant = subject.rpartition(".")[2]  # an event's subject is <base>.<tenant>
    return tenant if valid_tenant(tenant) else ""


class _Reader(NamedTuple):
    """How a worker reads a lane's messages (the supervisor's side: dlqproc.lanes)."""

    process: Callable[[Delivery, Registry, Limits], Outcome]
    tenant: Callable[[str, Limits], str]  # of a subject; "" when it names none


# The DLQ lane's body is an envelope wrapping the event; the events lanes'
# body is the event itself.
_EVENTS = _Reader(process_event, _event_tenant)
_READERS = {
    Lane.DLQ: _Reader(reprocess, _dlq_tenant),
    Lane.REALTIME: _EVENTS,
    Lane.HISTORICAL: _EVENTS,
}


def handle(delivery: Delivery, registry: Registry, limits: Limits) -> Outcome:
    """The Outcome of one delivery of any lane."""
    return _READERS[delivery.lane].process(delivery, registry, limits)


def _handle(delivery: Delivery, registry: Registry, event: Event, stored: Stored) -> Outcome:
    base = event.base
    handler = registry.handlers.get(base)
    if handler is None:
        return _failure(
            delivery,
            stored,
            FailureKind.PERMANENT,
            Reason.UNKNOWN_SUBJECT,
            f"no handler for subject base {base!r}",
            base,
        )
    started = time.perf_counter()
    try:
        rows = tuple(handler(event))
        _check_rows(rows)
        foreign = _foreign_company(rows, event.tenant)
    except HandlerError as exc:
        return _failure(delivery, stored, exc.kind, exc.reason, str(exc), base)
    except RecursionError:
        return _failure(
            delivery,
            stored,
            FailureKind.PERMANENT,
            Reason.TOO_DEEP,
            "payload nests too deeply",
            base,
        )
    except Exception as exc:  # a handler bug: retry, then exhaust, never crash the batch
        return _failure(
            delivery,
            stored,
            FailureKind.TRANSIENT,
            Reason.HANDLER_ERROR,
            f"{type(exc).__name__}: {exc}",
            base,
        )
    if foreign is not None:
        # Rows' company_id always equals their schema's tenant, whatever the handler.
        return _failure(
            delivery, stored, FailureKind.PERMANENT, Reason.INVALID_TENANT, foreign, base
        )
    try:
        blocks = encode(rows)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        # A value no column can hold: the same rows would fail every retry.
        return _failure(
            delivery,
            stored,
            FailureKind.PERMANENT,
            Reason.VALIDATION,
            f"{type(exc).__name__}: {exc}",
            base,
        )
    return Ok(
        token=delivery.token,
        stored=stored,
        rows=blocks,
        handler_seconds=time.perf_counter() - started,
        base=base,
    )
