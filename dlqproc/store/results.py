"""What the store is handed and what it answers: writes, their results, its errors.

Pure values, no database: a commit group is a list of Write, and `write` answers
one WriteResult per Write, a tagged union, so a result that is both written and
failed, or failed without a classification, cannot be built.
"""

from __future__ import annotations

import msgspec

from dlqproc.model import FailureKind, Reason, Rows


class Failure(msgspec.Struct, frozen=True):
    """Why one item's write failed, classified for the retry policy."""

    kind: FailureKind
    reason: Reason
    message: str

    def __str__(self) -> str:
        return self.message


class ItemFailed(Exception):
    """Raised inside the store when one item fails; its result carries `failure`."""

    def __init__(self, kind: FailureKind, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.failure = Failure(kind, reason, message)

    @classmethod
    def of(cls, failure: Failure) -> ItemFailed:
        return cls(failure.kind, failure.reason, failure.message)

    @property
    def kind(self) -> FailureKind:
        return self.failure.kind

    @property
    def reason(self) -> Reason:
        return self.failure.reason


class StoreUnavailable(Exception):
    """An outage: the database cannot be reached, the connection broke, or the
    transaction as a whole failed to commit. No item is to blame for it."""


class CredentialsRefused(StoreUnavailable):
    """The server refused the configured credentials: waiting will not help."""


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


class Written(msgspec.Struct, frozen=True, tag="written"):
    """The Write committed with its transaction."""

    inserted: bool = False  # an exhausted row was inserted (not already there)


class NotWritten(msgspec.Struct, frozen=True, tag="not_written"):
    """The Write left nothing behind; the others of its group may have committed."""

    failure: Failure


WriteResult = Written | NotWritten
