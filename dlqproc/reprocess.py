"""Reprocessing one DLQ delivery into an Outcome: the pure work of a worker process.

Bytes in (the DLQ message), Outcome out. Nothing here raises: every failure,
from undecodable bytes to a handler bug, becomes a classified Outcome so one
bad message can never fail the batch it travels in.
"""

from __future__ import annotations

import time
from datetime import datetime

import msgspec

from dlqproc.envelope import BadInput, decode, split_source, tenant_of_subject
from dlqproc.handlers import Registry
from dlqproc.model import Delivery, Event, FailureKind, HandlerError, Outcome, Reason, Stored


class Limits(msgspec.Struct, frozen=True):
    dlq_subject: str  # e.g. "v1.dlq"
    max_payload_bytes: int


def _failure(
    delivery: Delivery,
    stored: Stored,
    kind: FailureKind,
    reason: Reason,
    error: str,
    base: str = "",
) -> Outcome:
    return Outcome(
        token=delivery.token,
        ok=False,
        stored=stored,
        kind=kind,
        reason=reason,
        error=error[:2000],
        base=base,
    )


def bare_stored(delivery: Delivery, limits: Limits, as_json: bool = False) -> Stored:
    """What can be stored of a message whose envelope was not (or could not be) read.

    as_json: offer the body to the store as the envelope JSON; the store keeps
    the raw bytes instead when PostgreSQL refuses it.
    """
    tenant = tenant_of_subject(delivery.subject, limits.dlq_subject)
    return Stored(
        company_id=tenant or "unknown",
        source_subject=delivery.subject,
        event_timestamp=None,
        envelope_json=delivery.data if as_json else None,
        original_json=None,
    )


def _timestamp(value: str | None) -> str | None:
    """The envelope's ts if it is a real RFC 3339 time, else None (never an error)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).isoformat()
    except ValueError:
        return None


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
    event = Event(
        subject=envelope.source_subject,
        base=base,
        tenant=envelope.company,
        payload=stored.original_json or b"null",
        attempt=delivery.num_delivered,
    )
    started = time.perf_counter()
    try:
        rows = tuple(handler(event))
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
    return Outcome(
        token=delivery.token,
        ok=True,
        stored=stored,
        rows=rows,
        handler_seconds=time.perf_counter() - started,
        base=base,
    )
