"""Which exhausted rows can be replayed, and the message a replay publishes.

Pure. A row is refused with a reason rather than published when replaying it
cannot help or would publish something dlqproc never accepted: a body that
was not JSON, a subject no consumer reads, a tenant id that is not valid, or
a row already resolved (unless the operator includes resolved rows).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import msgspec

from dlqproc import envelope
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

Target = Literal["source", "dlq"]
KNOWN_BASES = frozenset((*REALTIME_BASES, *HISTORY_BASES))

# Headers of a replay's message. Nats-Msg-Id makes JetStream drop a second
# publish of the same (job, row) within the stream's duplicate window.
REPLAY_OF = "Dlqproc-Replay-Of"
REPLAY_JOB = "Dlqproc-Replay-Job"


class ReplayRow(msgspec.Struct, frozen=True):
    """What the engine needs of an exhausted row."""

    id: int
    company_id: str
    source_subject: str
    reason: str | None
    resolved: bool
    original: bytes | None  # original_payload as JSON text (jsonb's own form)
    raw_size: int | None  # bytes of raw_payload, when the body was kept raw
    last_error: str | None = None


class Publish(msgspec.Struct, frozen=True):
    subject: str
    body: bytes
    headers: dict[str, str]


def msg_id(job_id: int, row_id: int) -> str:
    """Deterministic: a retried or resumed publish of a row by a job is the same message."""
    return f"replay-{job_id}-{row_id}"


def refusal(row: ReplayRow, include_resolved: bool) -> str | None:
    """Why `row` is not replayed, or None."""
    if row.resolved and not include_resolved:
        return "already resolved (use --include-resolved)"
    if row.original is None:
        if row.raw_size is not None:
            return f"body is not JSON ({row.raw_size} bytes kept raw)"
        return "no original payload stored (reason: " + (row.reason or "unknown") + ")"
    if not envelope.valid_tenant(row.company_id):
        return f"invalid tenant {row.company_id[:80]!r}"
    base, _, tenant = row.source_subject.rpartition(".")
    if tenant != row.company_id:
        return f"subject {row.source_subject[:200]!r} does not end with its tenant"
    if base not in KNOWN_BASES:
        return f"unknown subject {row.source_subject[:200]!r}"
    return None


def build(row: ReplayRow, job_id: int, target: Target, dlq_subject: str) -> Publish:
    """The message replaying `row` (refusal() must have said None)."""
    assert row.original is not None
    headers = {
        "Nats-Msg-Id": msg_id(job_id, row.id),
        REPLAY_OF: str(row.id),
        REPLAY_JOB: str(job_id),
    }
    if target == "source":
        return Publish(row.source_subject, row.original, headers)
    body = envelope.build(
        source_subject=row.source_subject,
        company=row.company_id,
        original_json=row.original,
        raw=row.original,
        error=f"replay of exhausted event {row.id}: {row.last_error or ''}"[:4000],
        fatal=False,
        retry_count=0,
        max_retry=0,
        ts=datetime.now(UTC).isoformat(),
    )
    return Publish(f"{dlq_subject}.{row.company_id}", body, headers)
