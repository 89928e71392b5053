"""Request values to a Filter and back, and what the templates show.

Pure. A request's values are hostile: each becomes a Filter through
dlqproc.exhausted.filters (which raises FilterError naming the field), and
links carry them back only as URL-encoded query values after a constant path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import msgspec

from dlqproc.exhausted import filters
from dlqproc.exhausted.filters import Filter, FilterError, State
from dlqproc.store.exhausted_ops import Detail, Stats

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
FIELDS = ("tenant", "subject", "error", "since", "until")
STATES: tuple[State, ...] = ("unresolved", "resolved", "all")
PAYLOAD_SHOWN = 256 * 1024  # characters of a payload a page shows


class Query(msgspec.Struct, frozen=True):
    """A list view: its filter, its page, and the values as the operator typed them."""

    filter: Filter
    limit: int
    after: int | None
    values: tuple[tuple[str, str], ...]  # the filter's fields as given (for links and the form)

    def value(self, name: str) -> str:
        return next((v for k, v in self.values if k == name), "")

    def reasons(self) -> list[str]:
        return [v for k, v in self.values if k == "reason"]

    def link(self, **page: str | int) -> str:
        """`/list?...` for this filter and the given page fields."""
        pairs = list(self.values) + [(k, str(v)) for k, v in page.items()]
        return "/list?" + urlencode(pairs) if pairs else "/list"

    def qs(self) -> str:
        return urlencode(self.values)


def _one(values: Mapping[str, Sequence[str]], name: str) -> str:
    got = values.get(name) or []
    if len(got) > 1:
        raise FilterError(f"{name}: given more than once")
    return got[0].strip() if got else ""


def parse(values: Mapping[str, Sequence[str]], now: datetime) -> Query:
    """A Query from a request's query string (or form), or FilterError."""
    kept: list[tuple[str, str]] = []
    given = {}
    for name in FIELDS:
        v = _one(values, name)
        given[name] = v or None
        if v:
            kept.append((name, v))
    reasons = [r for r in values.get("reason") or [] if r]
    kept += [("reason", r) for r in reasons]
    state = _one(values, "state") or "unresolved"
    if state not in STATES:
        raise FilterError(f"state: {state[:40]!r} is not one of {', '.join(STATES)}")
    if state != "unresolved":
        kept.append(("state", state))
    replayed_text = _one(values, "replayed")
    replayed = {"": None, "yes": True, "no": False}.get(replayed_text, "bad")
    if replayed == "bad":
        raise FilterError("replayed: expected yes, no or nothing")
    if replayed_text:
        kept.append(("replayed", replayed_text))
    hide = _one(values, "hide_superseded") in ("1", "on", "yes")
    if hide:
        kept.append(("hide_superseded", "1"))
    f = filters.make(
        now=now,
        tenant=given["tenant"],
        subject=given["subject"],
        reasons=reasons,
        error=given["error"],
        since=given["since"],
        until=given["until"],
        state=state,
        replayed=replayed,  # type: ignore[arg-type]  # None, True or False here
        hide_superseded=hide,
    )
    limit = _number(_one(values, "limit"), "limit") or DEFAULT_LIMIT
    if not 1 <= limit <= MAX_LIMIT:
        raise FilterError(f"limit: between 1 and {MAX_LIMIT}")
    after = _number(_one(values, "after"), "after")
    return Query(f, limit, after, tuple(kept))


def _number(text: str, name: str) -> int | None:
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise FilterError(f"{name}: not a number")
    return int(text)


def frozen_values(f: Filter) -> list[tuple[str, str]]:
    """A filter's fields as form values with relative times made absolute, so a
    confirmed bulk replay selects what its confirmation page counted."""
    out: list[tuple[str, str]] = []
    for name in ("tenant", "subject", "error"):
        v = getattr(f, name)
        if v is not None:
            out.append((name, v))
    if f.since is not None:
        out.append(("since", f.since.isoformat()))
    if f.until is not None:
        out.append(("until", f.until.isoformat()))
    out += [("reason", r) for r in f.reasons]
    out.append(("state", f.state))
    if f.replayed is not None:
        out.append(("replayed", "yes" if f.replayed else "no"))
    if f.hide_superseded:
        out.append(("hide_superseded", "1"))
    return out


def first_line(text: str | None, limit: int = 120) -> str:
    line = (text or "").strip().split("\n", 1)[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Bar(msgspec.Struct, frozen=True):
    x: int
    y: int
    height: int
    label: str
    n: int


CHART_W, CHART_H, BAR_W = 24 * 20, 120, 16


def chart(stats: Stats) -> list[Bar]:
    """The hourly exhaustions as SVG bars (attributes only: the CSP forbids inline styles)."""
    peak = max((n for _, n in stats.hourly), default=0) or 1
    bars = []
    for i, (hour, n) in enumerate(stats.hourly):
        h = round((CHART_H - 4) * n / peak) if n else 0
        bars.append(Bar(i * 20 + 2, CHART_H - h, h, hour.strftime("%m-%d %H:00"), n))
    return bars


def pivot(stats: Stats) -> tuple[list[str], list[tuple[str, list[int], int]]]:
    """Unresolved counts as (reasons, rows of (tenant, count per reason, total))."""
    reasons = sorted({r for _, r, _ in stats.by_tenant_reason})
    by: dict[str, dict[str, int]] = {}
    for t, r, n in stats.by_tenant_reason:
        by.setdefault(t, {})[r] = n
    rows = [
        (t, [counts.get(r, 0) for r in reasons], sum(counts.values()))
        for t, counts in sorted(by.items())
    ]
    return reasons, rows


def payload(d: Detail) -> tuple[str, str]:
    """(how it is shown, the text): pretty JSON, or escaped bytes with their size."""
    if d.original_payload is not None:
        text = msgspec.json.format(d.original_payload.encode(), indent=2).decode()
        return "JSON", _cut(text)
    if d.raw_payload is not None:
        raw = d.raw_payload
        return f"not JSON, {len(raw)} bytes, shown escaped", _cut(repr(raw)[2:-1])
    return "none stored", ""


def envelope(d: Detail) -> list[tuple[str, str]]:
    """The DLQ envelope's fields but the payload, values as compact JSON."""
    try:
        data: Any = msgspec.json.decode(d.dlq_payload)
    except msgspec.DecodeError:
        return []
    if not isinstance(data, dict):
        return []
    return [
        (str(k)[:80], _cut(msgspec.json.encode(v).decode(), 2000))
        for k, v in data.items()
        if k != "original_payload"
    ]


def _cut(text: str, limit: int = PAYLOAD_SHOWN) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters)"
