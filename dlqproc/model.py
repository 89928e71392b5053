"""The data that crosses module and process boundaries.

Everything here is a frozen msgspec Struct (or an exception handlers raise), so
it is cheap to send between the supervisor and the worker processes and it
cannot be changed behind a reader's back. Handlers import this module and
nothing else of dlqproc.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Literal, TypeAlias

import msgspec


class FailureKind(enum.Enum):
    """How a failure is retried: transient ones with backoff, permanent ones never."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Reason(enum.Enum):
    """Classified cause of a failure; stored in exhausted_events and logged."""

    # Bad input (permanent): the message can never succeed as it is.
    NOT_JSON = "not_json"
    TOO_BIG = "too_big"
    TOO_DEEP = "too_deep"
    BAD_ENVELOPE = "bad_envelope"
    UNKNOWN_SUBJECT = "unknown_subject"
    INVALID_TENANT = "invalid_tenant"
    # A valid tenant that tenants.allow does not list.
    TENANT_REFUSED = "tenant_refused"
    VALIDATION = "validation"
    # Transient: may succeed on a later delivery.
    NOT_FOUND = "not_found"
    HANDLER_ERROR = "handler_error"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    DATABASE = "database"  # one write failed (counts against the retry budget)
    STORE_UNAVAILABLE = "store_unavailable"  # the database as a whole (does not)
    # A new tenant past tenants.maxNewPerHour: admitted once the hour's count drops.
    TENANT_LIMIT = "tenant_limit"
    # Budget spent: a transient failure reached nats.dlqMaxRetries deliveries.
    RETRIES_EXHAUSTED = "retries_exhausted"


class HandlerError(Exception):
    """Raised by a handler to classify its failure."""

    kind = FailureKind.TRANSIENT
    reason = Reason.HANDLER_ERROR

    def __init__(self, message: str, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class PermanentError(HandlerError):
    """The event can never succeed (bad payload, failed validation)."""

    kind = FailureKind.PERMANENT
    reason = Reason.VALIDATION


class TransientError(HandlerError):
    """The event may succeed later (a row it updates does not exist yet)."""

    kind = FailureKind.TRANSIENT
    reason = Reason.HANDLER_ERROR


class Meta(msgspec.Struct, frozen=True, array_like=True):
    """Where the message carrying an event came from (for `last_metadata`)."""

    stream: str = ""
    consumer: str = ""
    stream_seq: int = 0
    consumer_seq: int = 0
    msg_id: str = ""  # the Nats-Msg-Id header, if any
    received_at: str = ""  # RFC 3339, when dlqproc fetched the message


class Lane(enum.Enum):
    """Which consumer a delivery came from; decides how the worker reads it."""

    DLQ = "dlq"  # body is a DLQ envelope wrapping the event
    REALTIME = "realtime"  # body is the event itself
    HISTORICAL = "historical"


class Event(msgspec.Struct, frozen=True):
    """One business event as a handler sees it."""

    subject: str  # full subject, e.g. "v1.messages.upsert.acme"
    base: str  # subject without the tenant token, e.g. "v1.messages.upsert"
    tenant: str  # validated tenant id
    payload: bytes  # raw JSON of the event body
    attempt: int  # JetStream num_delivered of the message carrying it
    meta: Meta = Meta()
    # Unix seconds: the latest time an event may carry (the worker's clock plus
    # a horizon), so a millisecond or far-future timestamp fails validation
    # instead of reaching storage. 0: no bound.
    not_after: int = 0


class RowOp(msgspec.Struct, frozen=True):
    """One idempotent write into the tenant's schema.

    upsert: insert, or on a conflict on `key` overwrite the other columns.
    update: update the row matched by `key`; no such row is a transient
    not_found failure (the upsert may still be on its way).
    Values are JSON values (dicts and lists go to jsonb columns); dates,
    datetimes, UUIDs and decimals are written in their ISO/text forms.
    """

    op: Literal["upsert", "update"]
    table: str
    key: tuple[str, ...]
    values: dict[str, Any]
    # Columns that only move forward on upsert/update (e.g. timestamps), so a
    # late redelivery of an older event cannot move them back.
    monotonic: tuple[str, ...] = ()
    # Columns an upsert sets only when it inserts the row: another event type
    # owns them afterwards (e.g. a message's status belongs to its updates).
    insert_only: tuple[str, ...] = ()
    # "YYYY-MM": the table is range-partitioned by month and the row belongs to
    # that month; the store creates the partition on first use.
    partition: str = ""


class Rows(msgspec.Struct, frozen=True, array_like=True):
    """RowOps of one shape, encoded by the worker (see dlqproc.rows)."""

    op: Literal["upsert", "update"]
    table: str
    key: tuple[str, ...]
    columns: tuple[str, ...]
    monotonic: tuple[str, ...]
    insert_only: tuple[str, ...]
    partitions: tuple[str, ...]  # the months ("YYYY-MM") the rows belong to
    keys: tuple[bytes, ...]  # each row's key values, as JSON
    rows: tuple[bytes, ...]  # each row, a JSON object
    # Blocks of one message in the same segment may be written in any order;
    # segments must be written in order.
    segment: int = 0
    # Columns whose value is the same on every row (a history batch's
    # last_metadata, company_id, agent_id): left out of `columns` and `rows`
    # and sent once, as the JSON object `shared`, so PostgreSQL parses them
    # once per statement instead of once per row.
    shared_columns: tuple[str, ...] = ()
    shared: bytes = b""


class Delivery(msgspec.Struct, frozen=True, array_like=True):
    """What the supervisor sends a worker for one message."""

    token: int  # supervisor's handle for the message
    subject: str  # e.g. "v1.dlq.acme" or "v1.chats.upsert.acme"
    data: bytes
    num_delivered: int
    lane: Lane = Lane.DLQ
    meta: Meta = Meta()


class Envelope(msgspec.Struct, frozen=True):
    """The DLQ envelope (contract section 2). `company` is the tenant id."""

    source_subject: str
    company: str
    original_payload: msgspec.Raw
    error: str = ""
    error_type: str = ""
    retry_count: int = 0
    max_retry: int = 0
    next_retry_at: str | None = None
    ts: str | None = None


class Stored(msgspec.Struct, frozen=True, array_like=True):
    """What exhausted_events needs to know about a message (decoded or not)."""

    company_id: str
    source_subject: str
    event_timestamp: str | None
    # The envelope as JSON, when the body decoded as one; None otherwise.
    envelope_json: bytes | None
    # The original payload as JSON, when there was one.
    original_json: bytes | None
    # The failed event's own bytes when they are not JSON (a main-lane body that
    # failed classify_json) or came wrapped as {"base64": ...} in a DLQ envelope:
    # what exhausted_events.raw_payload keeps. Last, with a default: array_like.
    original_raw: bytes | None = None


# Characters of an error text an outcome keeps (logs, exhausted_events.last_error).
ERROR_CHARS = 2000


class Ok(msgspec.Struct, frozen=True, array_like=True, tag="ok"):
    """A delivery its handler turned into rows to write.

    `stored` describes the message for exhausted_events all the same: a write
    that fails may still exhaust it.
    """

    token: int
    stored: Stored
    rows: tuple[Rows, ...] = ()
    handler_seconds: float = 0.0
    base: str = ""
    ok: ClassVar[bool] = True
    # Read-only constants, not fields: a success cannot be built with a failure.
    kind: ClassVar[None] = None
    reason: ClassVar[None] = None
    error: ClassVar[str] = ""


class Failed(msgspec.Struct, frozen=True, array_like=True, tag="failed"):
    """A delivery that failed, classified; built by `failure` alone."""

    token: int
    stored: Stored
    kind: FailureKind
    reason: Reason
    error: str
    base: str = ""
    ok: ClassVar[bool] = False
    # Read-only constants, not fields: a failure writes nothing.
    rows: ClassVar[tuple[Rows, ...]] = ()
    handler_seconds: ClassVar[float] = 0.0


# A worker's verdict on one delivery: rows, or a classified failure. The
# supervisor decides whether to exhaust only after the retry policy saw it.
Outcome: TypeAlias = Ok | Failed


def failure(
    token: int, stored: Stored, kind: FailureKind, reason: Reason, error: str, base: str = ""
) -> Failed:
    """The one way to build a failed outcome: its error text is bounded here."""
    return Failed(token, stored, kind, reason, error[:ERROR_CHARS], base)
