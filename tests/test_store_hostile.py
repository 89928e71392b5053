"""Hostile input against dlqproc.store on a real PostgreSQL (issue 9).

Every kind of failure is classified where it happens (an outage raises
StoreUnavailable; data, resource errors and bugs fail their own item while its
neighbours commit), an exhausted row is always stored (normalised, or as a
minimal row with the same key), and partitions are created only inside their
window and up to a cap per write.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import hypothesis.strategies as st
import msgspec
import psycopg
import pytest
from hypothesis import given
from test_store import assert_failed, exhausted, query, rows, run, upsert
from test_store_partitions import message, where

from dlqproc.handlers import whatsapp
from dlqproc.model import FailureKind, Reason, RowOp
from dlqproc.rows import encode
from dlqproc.store import (
    Store,
    StoreUnavailable,
    Write,
    Written,
    classify,
    internal_error,
    month_bounds,
)
from support.handlers import TENANT_DDL

# 1. the classifier, on psycopg's own error classes

OUTAGE = ["08000", "08003", "08006", "57P01", "57P02", "57P03", "57P04", "57P05"]
DATA = ["22P02", "22001", "22P05", "23505", "23514", "42P01", "42703", "54000", "54001"]
RESOURCE = [
    "53000",
    "53100",
    "53200",  # out of memory / out of shared memory (lock table full)
    "53300",
    "53400",
    "57014",  # statement timeout
    "55P03",  # lock not available
    "40001",
    "40P01",
    "58000",
    "58030",
    "XX000",
    "XX001",
    "25P02",
]


@pytest.mark.parametrize(
    ("states", "expected"),
    [(OUTAGE, "outage"), (DATA, "data"), (RESOURCE, "resource")],
    ids=["outage", "data", "resource"],
)
def test_server_errors_are_classified_by_sqlstate(states: list[str], expected: str) -> None:
    for state in states:
        exc = psycopg.errors.lookup(state)("from the server")
        assert exc.sqlstate == state
        assert classify(exc, conn_ok=True) == expected, state
        # A connection that did not survive the error is an outage, whatever the error.
        assert classify(exc, conn_ok=False) == "outage", state


def test_client_side_errors_and_bugs() -> None:
    assert classify(psycopg.DataError("NUL in a string"), conn_ok=True) == "data"
    assert classify(psycopg.OperationalError("pipeline aborted"), conn_ok=True) == "resource"
    assert classify(psycopg.OperationalError("connection lost"), conn_ok=False) == "outage"
    assert classify(psycopg.ProgrammingError("wrong placeholders"), conn_ok=True) == "bug"
    for bug in (ValueError("year 10000 is out of range"), KeyError("x"), ZeroDivisionError()):
        assert classify(bug, conn_ok=True) == "bug"
        assert classify(bug, conn_ok=False) == "outage"
    assert (
        internal_error(ValueError("year 10000 is out of range"))
        == "internal error: ValueError: year 10000 is out of range"
    )
    assert len(internal_error(ValueError("x" * 100_000))) < 5000


# 2. each class of failure, raised by the real server among innocent items

PROVOKE = """
CREATE FUNCTION daisi_acme.provoke() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.id LIKE 'raise:%' THEN
        RAISE EXCEPTION 'provoked %', NEW.id USING ERRCODE = substr(NEW.id, 7);
    ELSIF NEW.id = 'greedy' THEN
        -- More locks than the shared lock table holds: a real 53200.
        PERFORM pg_advisory_xact_lock(i) FROM generate_series(1, 1000000) AS i;
    ELSIF NEW.id = 'suicide' THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER provoke BEFORE INSERT OR UPDATE ON daisi_acme.test_rows
    FOR EACH ROW EXECUTE FUNCTION daisi_acme.provoke();
"""


def execute(dsn: str, ddl: str) -> None:
    """Run statements without parameters (PL/pgSQL bodies hold % signs)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ddl.encode())


def with_trigger(dsn: str, ddl: str = PROVOKE) -> None:
    """Create daisi_acme.test_rows through the store, then put `ddl` on it."""
    assert run(dsn, lambda s: s.write([Write(tenant="acme", rows=encode((upsert("seed"),)))])) == [
        Written()
    ]
    execute(dsn, ddl)


def among_innocents(dsn: str, culprit: str) -> list[Written]:
    writes = [
        Write(tenant="acme", rows=encode((upsert("before"),))),
        Write(tenant="acme", rows=encode((upsert(culprit),))),
        Write(exhausted=exhausted()),
        Write(tenant="acme", rows=encode((upsert("after"),))),
    ]
    results: list[Written] = run(dsn, lambda s: s.write(writes))
    return results


def assert_innocents_committed(dsn: str, results: list[Written]) -> None:
    assert results[0] == results[3] == Written()
    assert results[2] == Written(inserted=True)
    assert set(rows(dsn)) == {"seed", "before", "after"}
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(1,)]


@pytest.mark.parametrize(
    ("state", "kind", "reason"),
    [
        ("22023", FailureKind.PERMANENT, Reason.VALIDATION),
        ("23514", FailureKind.PERMANENT, Reason.VALIDATION),
        *((s, FailureKind.TRANSIENT, Reason.DATABASE) for s in RESOURCE),
    ],
)
def test_a_server_error_fails_its_item_only(
    dsn: str, state: str, kind: FailureKind, reason: Reason
) -> None:
    with_trigger(dsn)
    results = among_innocents(dsn, f"raise:{state}")
    assert_failed(results[1], kind, reason)
    assert f"provoked raise:{state}" in str(results[1].failure)
    assert_innocents_committed(dsn, results)


def test_out_of_shared_memory_fails_its_item_only(dsn: str) -> None:
    with_trigger(dsn)
    results = among_innocents(dsn, "greedy")
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.DATABASE)
    assert "out of shared memory" in str(results[1].failure)
    assert_innocents_committed(dsn, results)


@pytest.mark.parametrize("culprit", ["raise:08006", "raise:57P01", "suicide"])
def test_an_outage_raises_and_commits_nothing(dsn: str, culprit: str) -> None:
    with_trigger(dsn)
    with pytest.raises(StoreUnavailable):
        among_innocents(dsn, culprit)
    assert set(rows(dsn)) == {"seed"}
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(0,)]


def test_a_failed_commit_is_an_outage(dsn: str) -> None:
    # A deferred trigger fails at COMMIT: no savepoint can isolate it, so the
    # transaction as a whole failed.
    with_trigger(
        dsn,
        """
        CREATE FUNCTION daisi_acme.at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.id = 'deferred' THEN RAISE EXCEPTION 'refused at commit'; END IF;
            RETURN NEW;
        END $$;
        CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON daisi_acme.test_rows
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION daisi_acme.at_commit();
        """,
    )
    with pytest.raises(StoreUnavailable, match="refused at commit"):
        among_innocents(dsn, "deferred")
    assert set(rows(dsn)) == {"seed"}


# 3. real timeouts: a row locked by another transaction


@pytest.fixture
def locked_row(dsn: str) -> Iterator[None]:
    """Row "locked" of daisi_acme.test_rows inserted by a transaction left open."""
    with_trigger(dsn, "SELECT 1")
    with psycopg.connect(dsn) as other:
        other.execute(
            "INSERT INTO daisi_acme.test_rows (id, company_id, attempt) VALUES ('locked', 'x', 1)"
        )
        yield
        other.rollback()


def write_locked(dsn: str, statement_timeout: float) -> list[Written]:
    async def main() -> list[Written]:
        store = Store(dsn, statement_timeout=statement_timeout, tenant_ddl=TENANT_DDL)
        try:
            return await store.write(
                [
                    Write(tenant="acme", rows=encode((upsert("before"),))),
                    Write(tenant="acme", rows=encode((upsert("locked"),))),
                    Write(tenant="acme", rows=encode((upsert("after"),))),
                ]
            )
        finally:
            await store.close()

    return asyncio.run(main())


def test_statement_timeout_fails_its_item_only(dsn: str, locked_row: None) -> None:
    results = write_locked(dsn, statement_timeout=0.3)
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.DATABASE)
    assert "statement timeout" in str(results[1].failure)
    assert results[0] == results[2] == Written()
    assert set(rows(dsn)) == {"seed", "before", "after"}


def test_lock_timeout_fails_its_item_only(dsn: str, locked_row: None) -> None:
    database = dsn.rsplit("/", 1)[1]
    query(dsn, f"ALTER DATABASE {database} SET lock_timeout = '300ms'")
    results = write_locked(dsn, statement_timeout=30.0)
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.DATABASE)
    assert "lock timeout" in str(results[1].failure)
    assert results[0] == results[2] == Written()
    assert set(rows(dsn)) == {"seed", "before", "after"}


# 4. bugs: exceptions nobody classified fail only the items they happened in


def test_a_bug_in_one_item_fails_that_item_only(dsn: str) -> None:
    # A malformed block (two keys for one row) makes rows.rounds raise ValueError,
    # both in the pipelined plan and item by item.
    block = encode((upsert("bug"),))[0]
    broken = msgspec.structs.replace(block, keys=block.keys * 2)
    writes = [
        Write(tenant="acme", rows=encode((upsert("before"),))),
        Write(tenant="acme", rows=(broken,)),
        Write(exhausted=exhausted()),
        Write(tenant="acme", rows=encode((upsert("after"),))),
    ]
    results = run(dsn, lambda s: s.write(writes))
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.HANDLER_ERROR)
    assert str(results[1].failure).startswith("internal error: ValueError: ")
    assert results[0] == results[3] == Written()
    assert results[2] == Written(inserted=True)
    assert set(rows(dsn)) == {"before", "after"}


def test_a_bug_preparing_tenants_fails_their_items_only(dsn: str) -> None:
    async def main() -> list[Written]:
        # A DDL template naming a placeholder that does not exist: KeyError.
        store = Store(dsn, 10.0, (*TENANT_DDL, "CREATE INDEX ON {schema}.test_rows ({nope})"))
        try:
            await store.migrate()
            return await store.write(
                [Write(tenant="acme", rows=encode((upsert("a"),))), Write(exhausted=exhausted())]
            )
        finally:
            await store.close()

    results = asyncio.run(main())
    assert_failed(results[0], FailureKind.TRANSIENT, Reason.HANDLER_ERROR)
    assert str(results[0].failure) == "internal error: KeyError: 'nope'"
    assert results[1] == Written(inserted=True)


def test_a_tenant_that_cannot_be_prepared_fails_its_items_only(dsn: str) -> None:
    # A type named like the table: CREATE TABLE fails in daisi_bad only.
    query(dsn, "CREATE SCHEMA daisi_bad; CREATE TYPE daisi_bad.test_rows AS ENUM ('x')")
    writes = [
        Write(tenant="bad", rows=encode((upsert("b", tenant="bad"),))),
        Write(tenant="acme", rows=encode((upsert("a"),))),
        Write(tenant="bad", rows=encode((upsert("c", tenant="bad"),))),
    ]
    results = run(dsn, lambda s: s.write(writes))
    for failed in (results[0], results[2]):
        assert_failed(failed, FailureKind.TRANSIENT, Reason.DATABASE)
        assert str(failed.failure).startswith("preparing daisi_bad: ")
    assert results[1] == Written()
    assert rows(dsn) == {"a": ("acme", 1)}


# 5. exhausted rows: hostile values are normalised, and the full row is stored

_rng = random.Random(1)
# Distinct emoji, so that PostgreSQL cannot compress them into an index entry.
_EMOJI = "".join(chr(_rng.randrange(0x1F300, 0x1F6FF)) for _ in range(1100))
UTC = dt.UTC

HOSTILE: dict[str, tuple[dict[str, Any], dt.datetime | None]] = {
    "offset +20:00": (
        {"event_timestamp": "2024-05-06T07:08:09+20:00"},
        dt.datetime(2024, 5, 5, 11, 8, 9, tzinfo=UTC),
    ),
    "offset with seconds": (
        {"event_timestamp": "2024-05-06T07:08:09+05:30:15.123456"},
        dt.datetime(2024, 5, 6, 1, 37, 53, 876544, tzinfo=UTC),
    ),
    "year 1 east of UTC": ({"event_timestamp": "0001-01-01T00:00:00+05:00"}, None),
    "year 9999 west of UTC": ({"event_timestamp": "9999-12-31T23:00:00-05:00"}, None),
    "naive": (
        {"event_timestamp": "2024-05-06T07:08:09"},
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    ),
    "Z": (
        {"event_timestamp": "2024-05-06T07:08:09Z"},
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    ),
    "garbage timestamp": ({"event_timestamp": "yesterday"}, None),
    "empty timestamp": ({"event_timestamp": ""}, None),
    "1,100 emoji subject": (
        {"source_subject": _EMOJI},
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    ),
    "NUL everywhere": (
        {
            "company_id": "ac\x00me",
            "source_subject": "v1.messages\x00.upsert.acme",
            "last_error": "bo\x00om",
            "reason": "retries\x00exhausted",
            "dlq_subject": "v1.dlq\x00.acme",
            "event_timestamp": "2024-05-06T07:08:09\x00",
        },
        None,
    ),
    "lone surrogates": (
        {
            "company_id": "ac\ud800me",
            "source_subject": "v1.\udfff",
            "last_error": "\ud83d",
            "dlq_subject": "v1.dlq.\ud800",
            "event_timestamp": "2024-05-06T07:08:09\ud800",
        },
        None,
    ),
    "huge texts": (
        {
            "company_id": "é" * 5000,
            "last_error": "é" * 100_000,
            "dlq_subject": "ü" * 5000,
            "retry_count": 2**40,
        },
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC),
    ),
}


def stored(dsn: str) -> dict[int, dict[str, Any]]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT *, octet_length(source_subject) AS subject_bytes,"
            " octet_length(last_error) AS error_bytes, octet_length(company_id) AS company_bytes,"
            " octet_length(dlq_subject) AS dlq_subject_bytes FROM public.exhausted_events"
        )
        return {r["dlq_sequence"]: r for r in cur.fetchall()}


def hostile_writes() -> list[Write]:
    return [
        Write(exhausted=exhausted(dlq_sequence=i, **fields))
        for i, (fields, _) in enumerate(HOSTILE.values())
    ]


def test_hostile_exhausted_rows_are_stored_in_full(dsn: str) -> None:
    async def body(store: Store) -> tuple[list[Written], list[Written]]:
        return await store.write(hostile_writes()), await store.write(hostile_writes())

    first, second = run(dsn, body)
    assert first == [Written(inserted=True)] * len(HOSTILE)
    assert second == [Written(inserted=False)] * len(HOSTILE)  # a redelivery hits the same rows
    by_sequence = stored(dsn)
    assert len(by_sequence) == len(HOSTILE)
    found = {name: by_sequence[i] for i, name in enumerate(HOSTILE)}
    for name, (_, timestamp) in HOSTILE.items():
        row = found[name]
        assert row["dlq_payload"] == {"company": "acme", "original_payload": {"id": "m1"}}, name
        assert row["original_payload"] == {"id": "m1"}, name
        assert row["event_timestamp"] == timestamp, name
        for col in ("company_id", "source_subject", "last_error", "reason", "dlq_subject"):
            assert "\x00" not in row[col], (name, col)
        assert row["subject_bytes"] <= 1024 and row["dlq_subject_bytes"] <= 1024, name
        assert row["error_bytes"] <= 16 * 1024 and row["company_bytes"] <= 256, name
    emoji = found["1,100 emoji subject"]
    assert emoji["subject_bytes"] > 1000 and _EMOJI.startswith(emoji["source_subject"])
    nul = found["NUL everywhere"]
    assert (nul["company_id"], nul["last_error"]) == ("ac\\u0000me", "bo\\u0000om")
    assert found["lone surrogates"]["company_id"] == "ac?me"
    huge = found["huge texts"]
    assert huge["retry_count"] == 2**31 - 1 and set(huge["last_error"]) == {"é"}


def test_the_emoji_subject_is_what_the_issue_reported(dsn: str) -> None:
    # Cut at 1,024 characters (as before), the subject is too large for its index.
    run(dsn, lambda s: s.migrate(), migrate=False)
    with pytest.raises(psycopg.errors.ProgramLimitExceeded):
        query(
            dsn,
            "INSERT INTO exhausted_events (company_id, source_subject, dlq_payload)"
            " VALUES ('acme', %s, '{}')",
            (_EMOJI[:1024],),
        )


def test_original_raw_is_kept_in_raw_payload(dsn: str) -> None:
    body = b'{"company": "acme", "original_payload": {"base64": "/w=="}}'
    nul_body = b'{"company": "acme", "original_payload": "\\u0000"}'
    writes = [
        Write(
            exhausted=exhausted(dlq_sequence=1, raw=body, envelope_json=body, original_raw=b"\xff")
        ),
        Write(
            exhausted=exhausted(
                dlq_sequence=2, raw=nul_body, envelope_json=nul_body, original_raw=b"\xfe"
            )
        ),
        Write(exhausted=exhausted(dlq_sequence=3, raw=nul_body, envelope_json=nul_body)),
    ]
    assert run(dsn, lambda s: s.write(writes)) == [Written(inserted=True)] * 3
    found = stored(dsn)
    assert found[1]["raw_payload"] == b"\xff"
    assert found[1]["dlq_payload"] == msgspec.json.decode(body)
    assert found[2]["raw_payload"] == b"\xfe"
    assert found[2]["dlq_payload"]["undecodable"] is True
    assert found[3]["raw_payload"] == nul_body
    for seq, raw in ((1, body), (2, nul_body), (3, nul_body)):
        assert found[seq]["payload_digest"] == hashlib.md5(raw).hexdigest()


# 6. a full row PostgreSQL refuses: the minimal row, with the same key

REFUSALS = {
    "check on the timestamp": (
        "ALTER TABLE public.exhausted_events"
        " ADD CONSTRAINT refuse_full CHECK (event_timestamp IS NULL)"
    ),
    "check on the subject's size": (
        "ALTER TABLE public.exhausted_events"
        " ADD CONSTRAINT refuse_full CHECK (octet_length(source_subject) <= 256)"
    ),
    "trigger out of memory": """
        CREATE FUNCTION public.refuse_full() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT NEW.dlq_payload ? 'minimal' THEN
                RAISE EXCEPTION 'refuse_full' USING ERRCODE = '53200';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_full BEFORE INSERT ON public.exhausted_events
            FOR EACH ROW EXECUTE FUNCTION public.refuse_full();
    """,
}


@pytest.mark.parametrize("refusal", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_full_row_is_stored_minimal_once(
    dsn: str, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = b'{"company": "bad tenant!", "original_payload": {"id": "m1"}}'
    row = exhausted(
        company_id="bad tenant!",
        source_subject=_EMOJI,
        dlq_subject="v1.dlq.\x00" + _EMOJI,
        last_error="boom",
        raw=raw,
        original_raw=b"\xff",
    )
    writes = [
        Write(tenant="acme", rows=encode((upsert("before"),))),
        Write(exhausted=row),
        Write(tenant="acme", rows=encode((upsert("after"),))),
    ]

    async def body(store: Store) -> tuple[list[Written], list[Written]]:
        execute(dsn, refusal)
        with caplog.at_level(logging.WARNING, logger="dlqproc.store"):
            first = await store.write(writes)
        return first, await store.write([Write(exhausted=row)])

    first, second = run(dsn, body)
    assert first == [Written(), Written(inserted=True), Written()]
    assert second == [Written(inserted=False)]
    assert set(rows(dsn)) == {"before", "after"}
    assert "exhausted row refused, stored minimal row" in caplog.messages

    (minimal,) = stored(dsn).values()
    assert minimal["dlq_payload"]["minimal"] is True
    assert "refuse_full" in minimal["dlq_payload"]["refused"]
    assert minimal["dlq_payload"]["size"] == len(raw)
    assert minimal["dlq_payload"]["dlq_subject"].startswith("v1.dlq.\\x00\\U0001f")
    assert minimal["company_id"] == "_invalid"
    assert minimal["source_subject"].isascii() and minimal["subject_bytes"] <= 256
    assert minimal["source_subject"].startswith("\\U0001f")
    assert minimal["last_error"].startswith("boom\n[dlqproc: the full exhausted row was refused")
    assert minimal["event_timestamp"] is None and minimal["original_payload"] is None
    assert (minimal["reason"], minimal["retry_count"]) == ("retries_exhausted", 3)
    assert (minimal["dlq_stream"], minimal["dlq_sequence"]) == ("DLQ", 42)
    assert minimal["payload_digest"] == hashlib.md5(raw).hexdigest()
    assert minimal["raw_payload"] == raw


def test_a_minimal_row_keeps_a_valid_tenant(dsn: str) -> None:
    async def body(store: Store) -> list[Written]:
        query(dsn, REFUSALS["check on the timestamp"])
        return await store.write([Write(exhausted=exhausted())])

    assert run(dsn, body) == [Written(inserted=True)]
    (minimal,) = stored(dsn).values()
    assert minimal["company_id"] == "acme"
    assert minimal["source_subject"] == "v1.messages.upsert.acme"


# 7. partitions: only inside the window, at most max_new_partitions per write

ARABIC_DIGITS = "\u0662\u0660\u0662\u0664-\u0660\u0661"  # "2024-01": \d, but not [0-9]


def partitions(dsn: str) -> set[str]:
    found = query(
        dsn,
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'daisi_acme.messages'::regclass",
    )
    return {r[0] for r in found}


def write_messages(dsn: str, *ops: RowOp, **store_kw: Any) -> list[Written]:
    async def main() -> list[Written]:
        store = Store(dsn, 10.0, whatsapp.TENANT_DDL, **store_kw)
        try:
            await store.migrate()
            return await store.write([Write(tenant="acme", rows=encode(ops))])
        finally:
            await store.close()

    return asyncio.run(main())


def month_of(day: dt.date) -> str:
    return f"{day.year:04d}-{day.month:02d}"


def test_rows_outside_the_window_land_in_the_default_partition(dsn: str) -> None:
    today = dt.datetime.now(UTC).date()
    ahead = today + dt.timedelta(days=40)  # always in a month past now + 7 days
    ops = [
        message("before-2009", "2008-12-31"),
        message("far-future", "2999-01-01"),
        message("ahead", ahead.isoformat()),
        # The year-9999 message of the issue: its partition's end is not a date.
        message("year-9999", "9999-12-31"),
        message("today", today.isoformat()),
    ]
    malformed = ["2024-13", "abcd", "2024-1", "2024-01\n", ARABIC_DIGITS, "\ud800", ""]
    for i, month in enumerate(malformed):
        ops.append(msgspec.structs.replace(message(f"bad{i}", "2024-01-15"), partition=month))

    assert write_messages(dsn, *ops) == [Written()]
    assert partitions(dsn) == {"messages_default", "messages_" + month_of(today).replace("-", "_")}
    placed = where(dsn)
    assert len(placed) == len(ops)
    assert placed.pop("today") == "daisi_acme.messages_" + month_of(today).replace("-", "_")
    assert set(placed.values()) == {"daisi_acme.messages_default"}
    # A longer horizon admits the month ahead, and its row moves out of default.
    assert write_messages(dsn, ops[2], partition_horizon=60 * 86400) == [Written()]
    assert where(dsn)["ahead"] == "daisi_acme.messages_" + month_of(ahead).replace("-", "_")


def test_one_write_creates_at_most_the_cap(dsn: str) -> None:
    months = [dt.date(2015 + m // 12, m % 12 + 1, 15) for m in range(30)]
    ops = [message(f"m{i}", day.isoformat()) for i, day in enumerate(months)]

    def in_default() -> int:
        return sum(p == "daisi_acme.messages_default" for p in where(dsn).values())

    assert write_messages(dsn, *ops) == [Written()]
    assert len(partitions(dsn)) == 12 + 1
    assert len(where(dsn)) == 30 and in_default() == 18  # every row readable
    # Later writes create more, moving their rows out of the default partition.
    assert write_messages(dsn, *ops) == [Written()]
    assert len(partitions(dsn)) == 24 + 1 and in_default() == 6
    assert write_messages(dsn, *ops) == [Written()]
    assert len(partitions(dsn)) == 30 + 1 and in_default() == 0
    assert len(where(dsn)) == 30
    assert where(dsn)["m29"] == "daisi_acme.messages_2017_06"


def test_the_cap_is_per_write_across_items_and_configurable(dsn: str) -> None:
    ops = [message(f"m{i}", f"2016-{i + 1:02d}-10") for i in range(6)]

    async def main() -> list[Written]:
        store = Store(dsn, 10.0, whatsapp.TENANT_DDL, max_new_partitions=4)
        try:
            await store.migrate()
            return await store.write([Write(tenant="acme", rows=encode((op,))) for op in ops])
        finally:
            await store.close()

    assert asyncio.run(main()) == [Written()] * 6
    assert len(partitions(dsn)) == 4 + 1
    assert write_messages(dsn, *ops, max_new_partitions=0) == [Written()]
    assert len(partitions(dsn)) == 4 + 1
    assert len(where(dsn)) == 6


def test_a_partition_that_cannot_be_created_leaves_rows_in_default(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_messages(dsn, message("seed", "2016-02-10"))
    # A type with the partition's name: CREATE TABLE fails, the write does not.
    query(dsn, "CREATE TYPE daisi_acme.messages_2016_01 AS ENUM ('x')")
    with caplog.at_level(logging.WARNING, logger="dlqproc.store"):
        assert write_messages(dsn, message("m", "2016-01-10")) == [Written()]
    assert "could not create partition" in caplog.messages
    assert where(dsn)["m"] == "daisi_acme.messages_default"


@given(st.text(max_size=12) | st.from_regex(r"[0-9]{4}-[0-9]{2}", fullmatch=True))
def test_month_bounds_never_raises(month: str) -> None:
    bounds = month_bounds(month)
    if bounds is not None:
        start, end = bounds
        assert f"{start.year:04d}-{start.month:02d}" == month
        assert start.day == end.day == 1 and start < end


def test_month_bounds_edges() -> None:
    assert month_bounds("9999-11") == (dt.date(9999, 11, 1), dt.date(9999, 12, 1))
    for bad in ("9999-12", "10000-01", ARABIC_DIGITS, "2024-01\n", "\ud800"):
        assert month_bounds(bad) is None
