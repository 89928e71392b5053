"""The filter layer: pure parsing and WHERE clauses (hypothesis), and hostile
values through `dlqproc exhausted list` on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.exhausted import filters
from dlqproc.exhausted.db import ExhaustedDB
from dlqproc.exhausted.filters import FilterError
from support.exhausted import cli, exhausted_row, migrate, query, store_rows

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
HOSTILE = [
    "'; DROP TABLE exhausted_events; --",
    "%",
    "_",
    "\\",
    "ünïcödé ✓ 漢字 🙂",
    "x" * 10_000,
    "a'b\"c",
]


def _sql_shape(f: filters.Filter) -> str:
    return filters.where(f)[0]


@given(
    tenant=st.one_of(st.none(), st.text(max_size=200)),
    error=st.one_of(st.none(), st.text(max_size=200)),
    subject=st.one_of(st.none(), st.text(max_size=200)),
)
def test_values_never_reach_the_sql_text(
    tenant: str | None, error: str | None, subject: str | None
) -> None:
    try:
        f = filters.make(now=NOW, tenant=tenant, error=error, subject=subject)
    except FilterError:
        return
    text, params = filters.where(f)
    # The text depends only on which filters are set: any other values give the same.
    same = filters.make(
        now=NOW,
        tenant=None if f.tenant is None else "t",
        error=None if f.error is None else "e",
        subject=None if f.subject is None else "s",
    )
    assert text == _sql_shape(same)
    for value in (f.tenant, f.error):
        if value is not None:
            assert value in params.values() or f"%{filters.like_escape(value)}%" in params.values()
    # A job's stored filter reads back the same.
    assert filters.from_json(filters.to_json(f)) == f


@given(st.text(max_size=100))
def test_text_filters_refuse_only_what_postgres_cannot_hold(value: str) -> None:
    try:
        f = filters.make(now=NOW, tenant=value)
    except FilterError:
        assert "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    else:
        assert f.tenant == value


@given(
    st.lists(
        st.one_of(st.sampled_from(["*", "v1", "chats", "a.b", "x-y", "é", "(", "$", "^"])),
        min_size=1,
        max_size=5,
    ),
    st.booleans(),
    st.lists(st.text(alphabet="abc-é($^", min_size=1, max_size=6), min_size=1, max_size=6),
)
def test_subject_patterns_match_like_nats(
    tokens: list[str], tail: bool, subject_tokens: list[str]
) -> None:
    pattern = ".".join([*tokens, ">"] if tail else tokens)
    try:
        filters.parse_subject(pattern)
    except FilterError:
        return
    subject = ".".join(subject_tokens)
    prefix, suffix, regex = filters.subject_sql(pattern)

    def nats_match(p: list[str], s: list[str]) -> bool:
        if p and p[-1] == ">":
            return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
        return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))

    expected = nats_match(pattern.split("."), subject.split("."))
    # Python's re reads this escaped subset as PostgreSQL's AREs do.
    assert bool(re.fullmatch(regex, subject)) == expected
    literal = prefix[:-1].replace("\\%", "%").replace("\\_", "_").replace("\\\\", "\\")
    tail = suffix[:-1].replace("\\%", "%").replace("\\_", "_").replace("\\\\", "\\")
    if expected:
        assert subject.startswith(literal) and subject[::-1].startswith(tail)


def test_times_and_durations() -> None:
    assert filters.parse_time("--since", "2h", NOW) == NOW - timedelta(hours=2)
    assert filters.parse_time("--since", "7d", NOW) == NOW - timedelta(days=7)
    assert filters.parse_time("--since", "2026-11-30T10:00:00", NOW) == datetime(
        2026, 11, 30, 10, tzinfo=UTC
    )
    for bad in ("yesterday", "2x", "", "99999999999d"):
        with pytest.raises(FilterError):
            filters.parse_time("--since", bad, NOW)
    with pytest.raises(FilterError):
        filters.parse_reason("nope")
    with pytest.raises(FilterError):
        filters.parse_subject("v1.>.x")
    with pytest.raises(FilterError):
        filters.parse_ids(["1", "x"])


def test_hostile_values_are_plain_parameters(dsn: str) -> None:
    migrate(dsn)
    store_rows(
        dsn,
        [
            exhausted_row(1, "acme", "v1.chats.upsert", {"chat_id": "a"}, error="100% broken"),
            exhausted_row(2, "acme", "v1.chats.upsert", {"chat_id": "b"}, error="under_score"),
            exhausted_row(3, "acme", "v1.chats.upsert", {"chat_id": "c"}, error="plain"),
        ],
    )

    async def each() -> None:
        db = ExhaustedDB(dsn)
        try:
            for value in HOSTILE:
                for option in ("tenant", "error", "subject"):
                    try:
                        f = filters.make(now=NOW, **{option: value})
                    except FilterError:
                        assert option == "subject"
                        continue
                    rows = await db.list_rows(f, 50)
                    assert await db.count(f) == len(rows)
                    assert rows == [] or (option == "error" and value in ("%", "_"))
        finally:
            await db.close()

    asyncio.run(each())
    # Through the command too, once each.
    out = cli("list", "--tenant", HOSTILE[0], "--error", HOSTILE[5], "--json", dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {"total": 0}
    # LIKE's wildcards are literal characters.
    assert [json.loads(x)["last_error"] for x in _rows(dsn, "--error", "%")] == ["100% broken"]
    assert [json.loads(x)["last_error"] for x in _rows(dsn, "--error", "_")] == ["under_score"]
    assert [json.loads(x)["last_error"] for x in _rows(dsn, "--error", "BROKEN")] == ["100% broken"]
    assert query(dsn, "SELECT count(*) FROM exhausted_events") == [(3,)]


def _rows(dsn: str, *args: str) -> list[str]:
    out = cli("list", "--json", *args, dsn=dsn)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[:-1]


def test_list_filters_paging_and_table(dsn: str) -> None:
    migrate(dsn)
    ids = store_rows(
        dsn,
        [
            exhausted_row(i, tenant, base, {"n": i}, reason=reason, error=f"boom {i}\nsecond line")
            for i, (tenant, base, reason) in enumerate(
                [
                    ("acme", "v1.chats.upsert", "validation"),
                    ("acme", "v1.messages.update", "retries_exhausted"),
                    ("globex", "v1.history.messages", "validation"),
                    ("globex", "v1.chats.update", "not_found"),
                    ("acme", "v1.contacts.upsert", "validation"),
                ]
            )
        ],
    )
    assert len(ids) == 5
    assert len(_rows(dsn)) == 5
    assert len(_rows(dsn, "--tenant", "acme")) == 3
    assert len(_rows(dsn, "--subject", "v1.*.upsert.*")) == 2
    assert len(_rows(dsn, "--subject", "v1.history.>")) == 1
    assert len(_rows(dsn, "--reason", "validation", "--reason", "not_found")) == 4
    assert len(_rows(dsn, "--tenant", "acme", "--reason", "validation")) == 2
    assert len(_rows(dsn, "--since", "1h")) == 5
    assert len(_rows(dsn, "--until", "1h")) == 0
    assert len(_rows(dsn, "--replayed")) == 0
    assert len(_rows(dsn, "--resolved")) == 0
    # Keyset paging, newest first.
    page1 = [json.loads(x)["id"] for x in _rows(dsn, "--limit", "2")]
    page2 = [json.loads(x)["id"] for x in _rows(dsn, "--limit", "2", "--after", str(page1[-1]))]
    assert page1 == sorted(ids, reverse=True)[:2]
    assert page2 == sorted(ids, reverse=True)[2:4]
    table = cli("list", "--tenant", "globex", dsn=dsn)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "AGE",
        "TENANT",
        "SUBJECT",
        "REASON",
        "RETRIES",
        "REPLAYS",
        "ERROR",
    ]
    assert "second line" not in table.stdout
    assert lines[-1] == "2 shown of 2 matching"


def test_show_stats_and_control_characters(dsn: str) -> None:
    migrate(dsn)
    (good,) = store_rows(
        dsn,
        [
            exhausted_row(
                1,
                "acme",
                "v1.chats.upsert",
                {"chat_id": "c1", "x": [1, 2]},
                error="bad \x1b[31mred",
            )
        ],
    )
    (raw,) = store_rows(
        dsn,
        [
            exhausted_row(
                2, "acme", "v1.chats.upsert", None, raw=b"\xff\xfenot json", reason="not_json"
            )
        ],
    )
    out = cli("show", str(good), dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert '"chat_id": "c1"' in out.stdout
    assert "\x1b" not in out.stdout and "\\x1b[31mred" in out.stdout
    assert "source_subject" in out.stdout and "history:" in out.stdout
    out = cli("show", str(raw), dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert "not JSON, 10 bytes" in out.stdout and "\\xff\\xfenot json" in out.stdout
    detail = json.loads(cli("show", str(good), "--json", dsn=dsn).stdout)
    assert detail["original_payload"] == {"chat_id": "c1", "x": [1, 2]}
    stats = json.loads(cli("stats", "--json", dsn=dsn).stdout)
    assert stats["by_tenant_reason"] == [["acme", "not_json", 1], ["acme", "retries_exhausted", 1]]
    assert len(stats["hourly"]) == 24 and sum(n for _, n in stats["hourly"]) == 2
    assert cli("show", "999999", dsn=dsn).returncode == 1


def test_resolve_annotate_unresolve_purge_are_audited(dsn: str) -> None:
    migrate(dsn)
    ids = store_rows(dsn, [exhausted_row(i, "acme", "v1.chats.upsert", {"n": i}) for i in range(5)])
    dry = cli("resolve", "--tenant", "acme", "--note", "fixed upstream", dsn=dsn)
    assert dry.returncode == 0 and "dry run" in dry.stdout and "5 rows" in dry.stdout
    assert query(dsn, "SELECT count(*) FROM exhausted_events WHERE resolved") == [(0,)]
    assert cli("resolve", "--tenant", "acme", dsn=dsn).returncode == 2  # --note required
    out = cli(
        "resolve",
        "--tenant",
        "acme",
        "--note",
        "fixed upstream",
        "--yes",
        "--actor",
        "ann",
        dsn=dsn,
    )
    assert out.returncode == 0, out.stderr
    assert query(
        dsn, "SELECT count(*) FROM exhausted_events WHERE resolved AND notes = 'fixed upstream'"
    ) == [(5,)]
    assert cli("unresolve", str(ids[0]), dsn=dsn).returncode == 0
    assert (
        cli("annotate", str(ids[0]), "--note", "looking", "--actor", "bob", dsn=dsn).returncode == 0
    )
    assert query(dsn, "SELECT resolved, notes FROM exhausted_events WHERE id = %s", (ids[0],)) == [
        (False, "fixed upstream\nlooking")
    ]
    audit = query(
        dsn, "SELECT action, actor, count(*) FROM exhausted_audit GROUP BY 1, 2 ORDER BY 1"
    )
    assert audit == [("annotate", "bob", 1), ("resolve", "ann", 5), ("unresolve", _me(), 1)]
    # The guide's own statement keeps working next to the new columns.
    query_exec(dsn, "UPDATE exhausted_events SET resolved = true WHERE id = %s", (ids[1],))


def _me() -> str:
    from dlqproc.exhausted.command import os_user

    return os_user()


def test_purge_in_batches_audited(dsn: str) -> None:
    migrate(dsn)
    ids = store_rows(dsn, [exhausted_row(i, "acme", "v1.chats.upsert", {"n": i}) for i in range(3)])
    query_exec(
        dsn,
        "UPDATE exhausted_events SET resolved = true,"
        " resolved_at = now() - interval '100 days' WHERE id = ANY(%s)",
        (ids[:2],),
    )
    dry = cli("purge", "--resolved", "--older-than", "90d", dsn=dsn)
    assert dry.returncode == 0 and "would delete 2" in dry.stdout
    out = cli("purge", "--resolved", "--older-than", "90d", "--yes", "--actor", "ops", dsn=dsn)
    assert out.returncode == 0 and "purged 2" in out.stdout
    assert query(dsn, "SELECT id FROM exhausted_events") == [(ids[2],)]
    assert sorted(
        query(dsn, "SELECT exhausted_id, actor FROM exhausted_audit WHERE action = 'purge'")
    ) == [(ids[0], "ops"), (ids[1], "ops")]


def query_exec(dsn: str, sql: str, params: object) -> None:
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute(sql, params)
