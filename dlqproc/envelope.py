"""Decoding a DLQ message body into an Envelope, or a classified BadInput.

This runs in the worker processes on untrusted bytes, so it must never raise
anything but BadInput: not JSON, too big, too deep, wrong shape, unknown or
malformed subject, bad tenant.

"JSON" here means what PostgreSQL's jsonb and every later decode accept: one
value, UTF-8, no NaN/Infinity, no lone UTF-16 surrogate escapes, nesting
within msgspec's limit (about 1,000 levels, less the caller's stack depth).
`classify_json` says which of these a body breaks; both lanes use it, and
`build` relies on it so a DLQ envelope is always such JSON.
"""

from __future__ import annotations

import base64
import binascii
import re

import msgspec

from dlqproc.model import Envelope, Reason

# A tenant id becomes part of a schema name (tenant_schema), so it is held to a
# strict pattern: ASCII letters, digits, "_" and "-" (UUIDs), starting with a
# letter or digit, at most 57 characters so the schema name stays within
# PostgreSQL's 63-byte identifier limit.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,56}")
SCHEMA_PREFIX = "daisi_"
# The company_id (exhausted rows) and metrics label of a message whose tenant is
# not valid, and the DLQ subject token it is dead-lettered on. A valid tenant
# starts with a letter or digit, so no tenant can be mistaken for it.
INVALID_TENANT_ID = "_invalid"

_decoder = msgspec.json.Decoder(Envelope)


class BadInput(Exception):
    """The body cannot be processed as it is; `reason` says why."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def valid_tenant(tenant: str) -> bool:
    return TENANT_PATTERN.fullmatch(tenant) is not None


def tenant_schema(tenant: str) -> str:
    """The schema of a valid tenant: "daisi_" + the tenant id, verbatim.

    One-to-one: tenant ids differing only in case ("acme", "ACME") get schemas
    of their own, because the name is always quoted (psycopg.sql.Identifier)
    and PostgreSQL's quoted identifiers are case-sensitive. Lower-casing here
    would let two tenants write into one schema. Operators must quote a
    mixed-case name too: SELECT ... FROM "daisi_ACME".chats.
    """
    return SCHEMA_PREFIX + tenant


def refusal(tenant: str, allow: frozenset[str]) -> str | None:
    """Why tenants.allow refuses `tenant`, or None (an empty allow-list admits all)."""
    if not allow or tenant in allow:
        return None
    return f"tenant {tenant[:80]!r} is not in tenants.allow"


def tenant_or_invalid(tenant: str) -> str:
    """The tenant itself when valid, else INVALID_TENANT_ID (for rows and labels)."""
    return tenant if valid_tenant(tenant) else INVALID_TENANT_ID


def tenant_of_subject(subject: str, prefix: str) -> str:
    """The valid tenant token of `<prefix>.<tenant>`, or "" for any other subject."""
    head, _, tenant = subject.rpartition(".")
    return tenant if head == prefix and valid_tenant(tenant) else ""


def decode(data: bytes, max_bytes: int) -> Envelope:
    """The envelope in `data`, or BadInput. Never raises anything else."""
    if len(data) > max_bytes:
        raise BadInput(Reason.TOO_BIG, f"body of {len(data)} bytes exceeds {max_bytes}")
    # msgspec leaves original_payload (a Raw) unchecked for UTF-8.
    utf8_error = _utf8_error(data)
    if utf8_error is not None:
        raise utf8_error
    try:
        envelope = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadInput(Reason.BAD_ENVELOPE, f"not a DLQ envelope: {exc}") from None
    except msgspec.DecodeError as exc:
        raise _syntax_error(data, exc) from None
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
# Validates the syntax (and string escapes) without building any objects.
_json_check = msgspec.json.Decoder(msgspec.Raw)

# From the start of the body: everything but a lone surrogate escape, then one.
# Possessive, so it runs in linear time on hostile input; only used to explain
# a failure that msgspec reports less clearly ("Input data was truncated"), and
# only over the first MiB (~25 ms at worst) so a flood of big bodies stays cheap.
_LONE_SURROGATE = re.compile(
    rb"(?:[^\\]++"
    rb"|\\[^u]"
    rb"|\\u(?![dD][89a-fA-F])[0-9a-fA-F]{4}"
    rb"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb")*+(\\u[dD][89a-fA-F][0-9a-fA-F]{2})",
    re.DOTALL,
)
_EXPLAINED_BYTES = 1 << 20
# msgspec ends a syntax error with the offset it failed at.
_ERROR_OFFSET = re.compile(r"\(byte (\d+)\)$")
# What JavaScript and Python's json write for non-finite floats; not JSON.
_NON_FINITE = (b"NaN", b"Infinity")


def _utf8_error(data: bytes) -> BadInput | None:
    """Why `data` is not UTF-8, or None. isascii() spares most bodies the decode."""
    if data.isascii():
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadInput(
            Reason.NOT_JSON,
            f"body is not JSON: invalid UTF-8 at byte {exc.start} ({exc.reason})",
        )
    return None


def _lone_surrogate(data: bytes) -> str | None:
    lone = _LONE_SURROGATE.match(data, 0, _EXPLAINED_BYTES)
    if lone is None:
        return None
    return f"lone UTF-16 surrogate escape {lone[1].decode()} at byte {lone.start(1)}"


def _non_finite(data: bytes, error: str) -> str | None:
    offset = _ERROR_OFFSET.search(error)
    if offset is None or not data.startswith(_NON_FINITE, int(offset[1])):
        return None
    literal = "NaN" if data.startswith(b"N", int(offset[1])) else "Infinity"
    return f"{literal} at byte {offset[1]} is not a JSON number"


def _syntax_error(data: bytes, exc: msgspec.DecodeError) -> BadInput:
    """msgspec's verdict, said plainly for the cases it words obscurely."""
    detail = (
        ("it is empty" if not data.strip() else None)
        or _lone_surrogate(data)
        or _non_finite(data, str(exc))
        or str(exc)
    )
    return BadInput(Reason.NOT_JSON, f"body is not JSON: {detail}")


def classify_json(data: bytes) -> BadInput | None:
    """Why `data` is not one JSON value dlqproc can pass on (see above), or None.

    Cheap enough for every event: one syntax pass that builds nothing, and a
    UTF-8 check that only non-ASCII bodies pay for. msgspec's syntax pass
    already refuses NaN/Infinity, trailing garbage and lone surrogate escapes,
    but not invalid UTF-8 inside strings. Never raises.
    """
    try:
        _json_check.decode(data)
    except msgspec.DecodeError as exc:
        return _syntax_error(data, exc)
    except RecursionError:
        # msgspec counts nesting against Python's recursion limit.
        return BadInput(Reason.TOO_DEEP, "body nests too deeply (limit about 1000 levels)")
    return _utf8_error(data)


# build() wraps a body that is not JSON as {"base64": ...}; the DLQ lane unwraps it.
BASE64_KEY = "base64"


class _Wrapped(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Exactly {"base64": <string>}: any other key is refused.
    data: str = msgspec.field(name=BASE64_KEY)


_wrapped = msgspec.json.Decoder(_Wrapped)
# Spares ordinary payloads a failed decode (an exception, ~2 us) on every DLQ
# message; a wrapper whose key is spelt with escapes is not dlqproc's own.
_WRAPPER_START = re.compile(rb'\{[ \t\r\n]*"base64"[ \t\r\n]*:')


def unwrap_base64(original: bytes) -> bytes | None:
    """The bytes `build` wrapped in `original` ({"base64": <string>}), or None.

    None for any other JSON value; BadInput(BAD_ENVELOPE) when the string is not
    valid base64, since the bytes it stood for are then lost.
    """
    if _WRAPPER_START.match(original) is None:
        return None
    try:
        text = _wrapped.decode(original).data
    except (msgspec.DecodeError, RecursionError):
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII text
        raise BadInput(
            Reason.BAD_ENVELOPE, f"original_payload {{{BASE64_KEY!r}: ...}} is not base64: {exc}"
        ) from None


def is_json(data: bytes) -> bool:
    """Whether `data` is one JSON value dlqproc can pass on (see classify_json)."""
    return classify_json(data) is None


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
    """The DLQ envelope (model.Envelope, the old service's format) for a failed event.

    The event body is embedded as JSON when it is JSON (classify_json; an
    original_json that is not falls back to `raw` too); otherwise as
    {"base64": ...} so that nothing of it is lost and the envelope stays JSON.
    The DLQ lane unwraps that object again (see unwrap_base64).
    """
    candidate = raw if original_json is None else original_json
    original: msgspec.Raw | dict[str, str] = (
        msgspec.Raw(candidate)
        if is_json(candidate)
        else {BASE64_KEY: base64.b64encode(raw).decode()}
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
