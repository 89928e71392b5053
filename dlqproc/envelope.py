"""Decoding a DLQ message body into an Envelope, or a classified BadInput.

This runs in the worker processes on untrusted bytes, so it must never raise
anything but BadInput: not JSON, too big, too deep, wrong shape, unknown or
malformed subject, bad tenant.
"""

from __future__ import annotations

import base64
import re

import msgspec

from dlqproc.model import Envelope, Reason

# A tenant id becomes part of a schema name (daisi_<lower(tenant)>), so it is
# held to a strict pattern: ASCII letters, digits, "_" and "-" (UUIDs), starting
# with a letter or digit, at most 57 characters so the schema name stays within
# PostgreSQL's 63-byte identifier limit.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,56}")

_decoder = msgspec.json.Decoder(Envelope)


class BadInput(Exception):
    """The body cannot be processed as it is; `reason` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def valid_tenant(tenant: str) -> bool:
    return TENANT_PATTERN.fullmatch(tenant) is not None


def tenant_of_subject(subject: str, prefix: str) -> str:
    """The valid tenant token of `<prefix>.<tenant>`, or "" for any other subject."""
    head, _, tenant = subject.rpartition(".")
    return tenant if head == prefix and valid_tenant(tenant) else ""


def decode(data: bytes, max_bytes: int) -> Envelope:
    """The envelope in `data`, or BadInput. Never raises anything else."""
    if len(data) > max_bytes:
        raise BadInput(Reason.TOO_BIG, f"body of {len(data)} bytes exceeds {max_bytes}")
    try:
        envelope = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadInput(Reason.BAD_ENVELOPE, f"not a DLQ envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadInput(Reason.NOT_JSON, f"body is not JSON: {exc}") from None
    except RecursionError:
        raise BadInput(Reason.TOO_DEEP, "body nests too deeply") from None
    if not valid_tenant(envelope.company):
        raise BadInput(Reason.INVALID_TENANT, f"invalid tenant {envelope.company[:80]!r}")
    return envelope


class _Outgoing(msgspec.Struct, frozen=True, omit_defaults=True):
    source_subject: str
    company: str
    original_payload: msgspec.Raw | dict[str, str]
    error: str
    error_type: str
    retry_count: int
    max_retry: int
    ts: str


_encoder = msgspec.json.Encoder()
_json_check = msgspec.json.Decoder(msgspec.Raw)


def is_json(data: bytes) -> bool:
    """Whether `data` is one well-formed JSON value (nesting within msgspec's limit)."""
    try:
        _json_check.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def build(
    *,
    source_subject: str,
    company: str,
    original_json: bytes | None,
    raw: bytes,
    error: str,
    fatal: bool,
    retry_count: int,
    max_retry: int,
    ts: str,
) -> bytes:
    """The DLQ envelope (contract section 2) for a failed event.

    The event body is embedded as JSON when it is JSON; otherwise as
    {"base64": ...} so that nothing of it is lost and the envelope stays JSON.
    """
    if original_json is None and is_json(raw):
        original_json = raw
    original: msgspec.Raw | dict[str, str] = (
        msgspec.Raw(original_json)
        if original_json is not None
        else {"base64": base64.b64encode(raw).decode()}
    )
    return _encoder.encode(
        _Outgoing(
            source_subject=source_subject,
            company=company,
            original_payload=original,
            error=error,
            error_type="fatal" if fatal else "retryable",
            retry_count=retry_count,
            max_retry=max_retry,
            ts=ts,
        )
    )


def split_source(subject: str, tenant: str) -> str:
    """The subject base of an event subject `<base>.<tenant>`, or BadInput."""
    base, _, last = subject.rpartition(".")
    if not base or last != tenant:
        raise BadInput(
            Reason.UNKNOWN_SUBJECT,
            f"source subject {subject[:200]!r} does not end with tenant {tenant!r}",
        )
    return base
