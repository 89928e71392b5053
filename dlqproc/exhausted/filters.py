"""Filters over exhausted_events: parsing the operator's values, and the WHERE clause.

Pure. Every value an operator types is hostile: it only ever becomes a query
parameter. The SQL text of a WHERE clause is built from constant fragments
chosen by which filters are set, never from a value; values travel as named
parameters (psycopg's `%(name)s`). Relative times (`--since 2h`) are resolved
to absolute instants when parsed, so a job stored with its filter selects the
same rows when it is resumed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec

from dlqproc.model import Reason

State = Literal["unresolved", "resolved", "all"]

# What `--reason` accepts: the classified reasons, and what a minimal or
# unclassified row may carry.
REASONS = tuple(sorted({r.value for r in Reason} | {"unknown"}))
MAX_TEXT = 64 * 1024  # characters of one filter value
MAX_IDS = 100_000

_DURATION = re.compile(r"(\d{1,9})\s*(s|m|h|d|w)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class FilterError(ValueError):
    """A filter value that cannot mean anything; the message names the option."""


class Filter(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Which exhausted rows an operation applies to; every set field must match."""

    ids: tuple[int, ...] = ()
    tenant: str | None = None
    subject: str | None = None  # a NATS pattern: tokens, `*` one token, `>` the rest
    reasons: tuple[str, ...] = ()
    error: str | None = None  # case-insensitive substring of last_error
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until
    state: State = "unresolved"
    replayed: bool | None = None  # True: replayed at least once; False: never
    hide_superseded: bool = False  # leave out rows a later replay failure replaced

    def describe(self) -> str:
        """One line for a terminal or a log: the filters that are set."""
        fields = msgspec.structs.asdict(self).items()
        return ", ".join(f"{k}={v!r}" for k, v in fields if v not in ((), None, False))


def _text(option: str, value: str) -> str:
    """A filter value PostgreSQL can hold as a text parameter, or FilterError."""
    if len(value) > MAX_TEXT:
        raise FilterError(f"{option}: longer than {MAX_TEXT} characters")
    if "\x00" in value:
        raise FilterError(f"{option}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FilterError(f"{option}: not valid Unicode text") from None
    return value


def parse_time(option: str, value: str, now: datetime) -> datetime:
    """`2h`, `7d`, `30m`, `90s`, `1w` before `now`, or an ISO 8601 instant (UTC if naive)."""
    value = _text(option, value).strip()
    match = _DURATION.fullmatch(value)
    if match:
        try:
            return now - timedelta(seconds=int(match[1]) * _UNITS[match[2]])
        except OverflowError:
            raise FilterError(f"{option}: {value[:40]!r} reaches before year 1") from None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise FilterError(
            f"{option}: {value[:40]!r} is neither a duration (2h, 7d) nor an ISO timestamp"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_duration(option: str, value: str) -> timedelta:
    """A duration such as `90d` or `12h`."""
    match = _DURATION.fullmatch(_text(option, value).strip())
    if not match:
        raise FilterError(f"{option}: {value[:40]!r} is not a duration (90d, 12h, 30m)")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def parse_subject(value: str) -> str:
    """A NATS subject pattern: non-empty tokens, `>` only as the last one."""
    value = _text("--subject", value)
    tokens = value.split(".")
    if any(t == "" for t in tokens):
        raise FilterError("--subject: empty token in the pattern")
    if ">" in tokens[:-1]:
        raise FilterError("--subject: '>' may only be the last token")
    return value


def parse_note(value: str) -> str:
    return _text("--note", value)


def parse_reason(value: str) -> str:
    if value not in REASONS:
        raise FilterError(f"--reason: {value[:40]!r} is not one of {', '.join(REASONS)}")
    return value


def parse_ids(values: list[str]) -> tuple[int, ...]:
    if len(values) > MAX_IDS:
        raise FilterError(f"at most {MAX_IDS} ids at once; use a filter")
    ids = []
    for value in values:
        if not value.isascii() or not value.isdigit() or len(value) > 18:
            raise FilterError(f"id {value[:40]!r} is not a row id")
        ids.append(int(value))
    return tuple(dict.fromkeys(ids))


def make(
    *,
    now: datetime,
    ids: list[str] | None = None,
    tenant: str | None = None,
    subject: str | None = None,
    reasons: list[str] | None = None,
    error: str | None = None,
    since: str | None = None,
    until: str | None = None,
    state: State = "unresolved",
    replayed: bool | None = None,
    hide_superseded: bool = False,
) -> Filter:
    """A Filter from the operator's values (as typed), or FilterError naming the option."""
    return Filter(
        ids=parse_ids(ids or []),
        tenant=None if tenant is None else _text("--tenant", tenant),
        subject=None if subject is None else parse_subject(subject),
        reasons=tuple(dict.fromkeys(parse_reason(r) for r in reasons or [])),
        error=None if error is None or error == "" else _text("--error", error),
        since=None if since is None else parse_time("--since", since, now),
        until=None if until is None else parse_time("--until", until, now),
        state=state,
        replayed=replayed,
        hide_superseded=hide_superseded,
    )


def like_escape(value: str) -> str:
    """`value` as a literal inside a LIKE pattern (escape character `\\`)."""
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _regex_escape(token: str) -> str:
    # In PostgreSQL's AREs a backslash before a non-alphanumeric is that
    # character itself; letters and digits (ASCII or not) must not get one,
    # and no non-ASCII character is special.
    return "".join("\\" + c if c.isascii() and not c.isalnum() else c for c in token)


def subject_sql(pattern: str) -> tuple[str, str, str]:
    """(LIKE prefix, LIKE prefix of the reversed subject, anchored regex) for a pattern.

    The literal tokens before the first wildcard narrow the rows through the
    text_pattern_ops index on the subject, those after the last wildcard
    through the one on its reverse (`v1.messages.*.acme` is mostly its
    tenant); the regex decides.
    """
    tokens = pattern.split(".")
    wild = [i for i, t in enumerate(tokens) if t in ("*", ">")]
    if not wild:
        return like_escape(pattern), like_escape(pattern[::-1]), "^" + _regex(tokens) + "$"
    head, tail = tokens[: wild[0]], tokens[wild[-1] + 1 :]
    prefix = ".".join(head) + "." if head else ""
    suffix = "." + ".".join(tail) if tail else ""
    return (
        like_escape(prefix) + "%",
        like_escape(suffix[::-1]) + "%",
        "^" + _regex(tokens) + "$",
    )


def _regex(tokens: list[str]) -> str:
    parts = []
    for t in tokens:
        if t == "*":
            parts.append(r"[^.]+")
        elif t == ">":
            parts.append(r".+")
        else:
            parts.append(_regex_escape(t))
    return r"\.".join(parts)


def where(f: Filter, alias: str = "e") -> tuple[str, dict[str, object]]:
    """The WHERE clause (without the keyword) for `f`, and its named parameters.

    Only constant fragments are joined; `alias` is one of ours, never the operator's.
    """
    if not alias.isidentifier():
        raise ValueError("alias must be an identifier")
    a = alias
    clauses: list[str] = []
    params: dict[str, object] = {}
    if f.ids:
        clauses.append(f"{a}.id = ANY(%(ids)s)")
        params["ids"] = list(f.ids)
    if f.tenant is not None:
        clauses.append(f"{a}.company_id = %(tenant)s")
        params["tenant"] = f.tenant
    if f.subject is not None:
        prefix, suffix, regex = subject_sql(f.subject)
        clauses.append(
            f"{a}.source_subject LIKE %(subject_prefix)s"
            f" AND reverse({a}.source_subject) LIKE %(subject_suffix)s"
            f" AND {a}.source_subject ~ %(subject_re)s"
        )
        params.update(subject_prefix=prefix, subject_suffix=suffix, subject_re=regex)
    if f.reasons:
        clauses.append(f"{a}.reason = ANY(%(reasons)s)")
        params["reasons"] = list(f.reasons)
    if f.error is not None:
        clauses.append(f"{a}.last_error ILIKE %(error)s")
        params["error"] = "%" + like_escape(f.error) + "%"
    if f.since is not None:
        clauses.append(f"{a}.created_at >= %(since)s")
        params["since"] = f.since
    if f.until is not None:
        clauses.append(f"{a}.created_at < %(until)s")
        params["until"] = f.until
    if f.state == "unresolved":
        clauses.append(f"NOT {a}.resolved")
    elif f.state == "resolved":
        clauses.append(f"{a}.resolved")
    if f.replayed is True:
        clauses.append(f"{a}.replay_count > 0")
    elif f.replayed is False:
        clauses.append(f"{a}.replay_count = 0")
    if f.hide_superseded:
        clauses.append(
            f"NOT EXISTS (SELECT 1 FROM public.exhausted_events s WHERE s.replay_of = {a}.id)"
        )
    return (" AND ".join(clauses) or "true"), params


def to_json(f: Filter) -> bytes:
    return msgspec.json.encode(f)


def from_json(data: bytes | str) -> Filter:
    return msgspec.json.decode(data, type=Filter)


def utcnow() -> datetime:
    return datetime.now(UTC)
