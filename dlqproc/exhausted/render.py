"""Exhausted rows, jobs and stats as text for a terminal, or as JSON lines.

Pure. Every value shown came from NATS and is hostile: control characters
(terminal escape sequences included) are shown escaped, never written raw.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from dlqproc.store.exhausted_ops import AuditEntry, Detail, Job, Row, Stats

_ERROR_WIDTH = 60
_SUBJECT_WIDTH = 40


def safe(text: str | None, limit: int | None = None) -> str:
    """`text` with every control or unprintable character escaped, optionally cut."""
    if text is None:
        return ""
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def age(seconds: float) -> str:
    """A short age: 45s, 12m, 3h20m, 4d2h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def first_line(text: str | None) -> str:
    return (text or "").strip().split("\n", 1)[0]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def rows_table(rows: Sequence[Row], now: datetime) -> list[str]:
    return table(
        ("ID", "AGE", "TENANT", "SUBJECT", "REASON", "RETRIES", "REPLAYS", "ERROR"),
        [
            (
                str(r.id) + ("*" if r.resolved else ""),
                age((now - r.created_at).total_seconds()),
                safe(r.company_id, 24),
                safe(r.source_subject, _SUBJECT_WIDTH),
                safe(r.reason or "unknown"),
                str(r.retry_count if r.retry_count is not None else ""),
                str(r.replay_count),
                safe(first_line(r.last_error), _ERROR_WIDTH),
            )
            for r in rows
        ],
    )


def row_json(r: Row) -> str:
    return msgspec.json.encode(r).decode()


def _pretty_json(text: str) -> str:
    return msgspec.json.format(text.encode(), indent=2).decode()


def detail(
    d: Detail,
    history: Sequence[AuditEntry],
    chain: Sequence[Row],
    now: datetime,
) -> list[str]:
    r = d.row
    out = [f"exhausted event {r.id}", ""]
    fields: list[tuple[str, Any]] = [
        (
            "created_at",
            f"{r.created_at.isoformat()} ({age((now - r.created_at).total_seconds())} ago)",
        ),
        ("company_id", r.company_id),
        ("source_subject", r.source_subject),
        ("reason", r.reason),
        ("retry_count", r.retry_count),
        ("event_timestamp", d.event_timestamp.isoformat() if d.event_timestamp else None),
        ("resolved", r.resolved),
        ("resolved_at", d.resolved_at.isoformat() if d.resolved_at else None),
        ("replay_count", r.replay_count),
        ("replayed_at", r.replayed_at.isoformat() if r.replayed_at else None),
        ("replay_of", r.replay_of),
        ("dlq_stream", d.dlq_stream),
        ("dlq_sequence", d.dlq_sequence),
        ("dlq_subject", d.dlq_subject),
        ("payload_digest", d.payload_digest),
    ]
    width = max(len(k) for k, _ in fields)
    out += [f"  {k:<{width}}  {safe(str(v)) if v is not None else '-'}" for k, v in fields]
    out += ["", "last_error:"]
    out += ["  " + safe(line) for line in (r.last_error or "-").split("\n")]
    out += ["", "notes:"]
    out += ["  " + safe(line) for line in (d.notes or "-").split("\n")]
    out += ["", "original payload:"]
    if d.original_payload is not None:
        out += ["  " + safe(line) for line in _pretty_json(d.original_payload).split("\n")]
    elif d.raw_payload is not None:
        raw = d.raw_payload
        out.append(f"  not JSON, {len(raw)} bytes, shown escaped:")
        out.append("  " + safe(repr(raw)[2:-1], 4000))
    else:
        out.append("  (none stored)")
    out += ["", "DLQ envelope metadata:"]
    try:
        envelope = msgspec.json.decode(d.dlq_payload)
    except msgspec.DecodeError:
        envelope = None
    if isinstance(envelope, dict):
        for k, v in envelope.items():
            if k != "original_payload":
                out.append(f"  {safe(str(k), 40)}: {safe(msgspec.json.encode(v).decode(), 300)}")
    out += ["", "history:"]
    if not history:
        out.append("  (no actions)")
    for h in history:
        job = f" job {h.job_id}" if h.job_id is not None else ""
        note = f": {safe(h.note, 200)}" if h.note else ""
        out.append(f"  {h.at.isoformat()}  {h.action:<9} by {safe(h.actor, 40)}{job}{note}")
    out += ["", "replay chain:"]
    if len(chain) <= 1:
        out.append("  (not part of a replay chain)")
    for c in chain:
        mark = "→" if c.id == r.id else " "
        of = f" replays {c.replay_of}" if c.replay_of else ""
        out.append(
            f"  {mark} {c.id}{of}  {c.created_at.isoformat()}  {safe(c.reason or '')}"
            f"  {'resolved' if c.resolved else 'unresolved'}"
            f"  {safe(first_line(c.last_error), _ERROR_WIDTH)}"
        )
    return out


def detail_json(d: Detail, history: Sequence[AuditEntry], chain: Sequence[Row]) -> str:
    data: dict[str, Any] = msgspec.to_builtins(d.row)
    data.update(
        event_timestamp=d.event_timestamp,
        resolved_at=d.resolved_at,
        notes=d.notes,
        dlq_stream=d.dlq_stream,
        dlq_sequence=d.dlq_sequence,
        dlq_subject=d.dlq_subject,
        payload_digest=d.payload_digest,
        dlq_payload=msgspec.Raw(d.dlq_payload.encode()),
        original_payload=(
            msgspec.Raw(d.original_payload.encode()) if d.original_payload is not None else None
        ),
        raw_payload_base64=(
            base64.b64encode(d.raw_payload).decode() if d.raw_payload is not None else None
        ),
        history=history,
        chain=chain,
    )
    return msgspec.json.encode(data).decode()


def stats_lines(s: Stats, now: datetime) -> list[str]:
    out = ["unresolved by tenant and reason:"]
    out += [
        "  " + line
        for line in table(
            ("TENANT", "REASON", "COUNT"),
            [(safe(t, 40), safe(r), str(n)) for t, r, n in s.by_tenant_reason],
        )
    ]
    out += ["", "oldest unresolved per tenant:"]
    out += [
        "  " + line
        for line in table(("TENANT", "OLDEST"), [(safe(t, 40), age(a)) for t, a in s.oldest])
    ]
    out += ["", "exhausted per hour, last 24 hours:"]
    peak = max((n for _, n in s.hourly), default=0) or 1
    for hour, n in s.hourly:
        bar = "#" * round(40 * n / peak)
        out.append(f"  {hour.strftime('%m-%d %H:00')}  {n:>7}  {bar}")
    return out


def jobs_table(jobs: Sequence[Job], now: datetime) -> list[str]:
    return table(
        (
            "JOB",
            "STATE",
            "AGE",
            "ACTOR",
            "TARGET",
            "PUBLISHED",
            "REFUSED",
            "FAILED",
            "SKIPPED",
            "UNCERTAIN",
            "FILTER",
        ),
        [
            (
                str(j.id),
                j.state
                if j.alive or j.state not in ("running", "paused")
                else f"{j.state} (no process: --resume {j.id})",
                age((now - j.created_at).total_seconds()),
                safe(j.actor, 20),
                j.target,
                str(j.published),
                str(j.refused),
                str(j.failed),
                str(j.skipped),
                str(j.uncertain),
                safe(j.filter.describe(), 80),
            )
            for j in jobs
        ],
    )


def job_json(j: Job) -> str:
    return msgspec.json.encode(j).decode()
