"""dlqproc.store.Store against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from dlqproc.embedded import free_port
from dlqproc.model import FailureKind, Reason, RowOp
from dlqproc.rows import encode
from dlqproc.store import (
    ExhaustedRow,
    NotWritten,
    Store,
    StoreUnavailable,
    Write,
    WriteResult,
    Written,
    migrations,
    writer,
)
from support.handlers import TENANT_DDL


def run(
    dsn: str, body: Callable[[Store], Awaitable[Any]], *, migrate: bool = True, **settings: Any
) -> Any:
    """Run body(store) on a fresh Store with `settings`; migrate first, always close."""

    async def main() -> Any:
        store = Store(dsn, statement_timeout=10.0, tenant_ddl=TENANT_DDL, **settings)
        try:
            if migrate:
                await store.migrate()
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on its own connection; its rows, or [] when it returns none."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql.encode(), params)
        return cur.fetchall() if cur.description is not None else []


def schemas(dsn: str) -> set[str]:
    return {r[0] for r in query(dsn, "SELECT schema_name FROM information_schema.schemata")}


def rows(dsn: str, schema: str = "daisi_acme") -> dict[str, tuple[str, int]]:
    found = query(dsn, f'SELECT id, company_id, attempt FROM "{schema}".test_rows')
    return {r[0]: (r[1], r[2]) for r in found}


def upsert(id_: str, attempt: Any = 1, tenant: str = "acme", **kw: Any) -> RowOp:
    return RowOp(
        op="upsert",
        table="test_rows",
        key=("id",),
        values={"id": id_, "company_id": tenant, "attempt": attempt},
        **kw,
    )


def update(id_: str, attempt: Any) -> RowOp:
    return RowOp(
        op="update", table="test_rows", key=("id",), values={"id": id_, "attempt": attempt}
    )


def exhausted(**overrides: Any) -> ExhaustedRow:
    fields: dict[str, Any] = {
        "company_id": "acme",
        "source_subject": "v1.messages.upsert.acme",
        "last_error": "boom",
        "retry_count": 3,
        "reason": "retries_exhausted",
        "event_timestamp": "2024-05-06T07:08:09+00:00",
        "envelope_json": b'{"company": "acme", "original_payload": {"id": "m1"}}',
        "original_json": b'{"id": "m1"}',
        "raw": b'{"company": "acme", "original_payload": {"id": "m1"}}',
        "dlq_stream": "DLQ",
        "dlq_sequence": 42,
        "dlq_subject": "v1.dlq.acme",
    }
    fields.update(overrides)
    return ExhaustedRow(**fields)


def assert_failed(result: WriteResult, kind: FailureKind, reason: Reason | None = None) -> None:
    assert isinstance(result, NotWritten), result
    assert result.failure.kind is kind, result.failure
    if reason is not None:
        assert result.failure.reason is reason, result.failure


# 1. migrations


def test_migrate_applies_once(dsn: str) -> None:
    async def body(store: Store) -> tuple[list[str], list[str]]:
        return await store.migrate(), await store.migrate()

    first, second = run(dsn, body, migrate=False)
    assert first == [
        "001_exhausted_events.sql",
        "002_tenants.sql",
        "003_exhausted_replays.sql",
    ]
    assert second == []
    assert query(dsn, "SELECT version, name FROM public.dlqproc_migrations ORDER BY 1") == [
        (1, "001_exhausted_events.sql"),
        (2, "002_tenants.sql"),
        (3, "003_exhausted_replays.sql"),
    ]
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(0,)]
    # A new Store on the same database finds nothing left to apply.
    assert run(dsn, lambda store: store.migrate(), migrate=False) == []


# 2. exhausted rows are idempotent per (stream, sequence, body)


def test_exhausted_row_is_idempotent(dsn: str) -> None:
    async def body(store: Store) -> list[list[Written]]:
        row = exhausted()
        first = await store.write([Write(exhausted=row)])
        second = await store.write([Write(exhausted=exhausted())])
        # Stream recreated: same stream and sequence, a different body.
        recreated = await store.write([Write(exhausted=exhausted(raw=b"another body"))])
        return [first, second, recreated]

    first, second, recreated = run(dsn, body)
    assert first == [Written(inserted=True)]
    assert second == [Written(inserted=False)]
    assert recreated == [Written(inserted=True)]
    found = query(
        dsn,
        "SELECT dlq_stream, dlq_sequence, payload_digest FROM public.exhausted_events ORDER BY id",
    )
    assert len(found) == 2
    assert found[0][:2] == found[1][:2] == ("DLQ", 42)
    assert found[0][2] != found[1][2]


def test_exhausted_duplicate_within_one_batch(dsn: str) -> None:
    results = run(dsn, lambda s: s.write([Write(exhausted=exhausted())] * 2))
    assert results == [Written(inserted=True), Written(inserted=False)]
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(1,)]


# 3. exhausted rows: jsonb and its fallback


def _exhausted_row(dsn: str, sequence: int) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT *, dlq_payload->>'undecodable' AS undecodable"
            " FROM public.exhausted_events WHERE dlq_sequence = %s",
            (sequence,),
        )
        found = cur.fetchall()
    assert len(found) == 1, found
    return found[0]


def test_exhausted_jsonb_fallback(dsn: str) -> None:
    nul_json = b'{"company": "acme", "original_payload": {"text": "a\\u0000b"}}'
    assert json.loads(nul_json)["original_payload"]["text"] == "a\x00b"  # valid JSON
    not_json = b"\xff\xfenot json at all"
    valid = exhausted(dlq_sequence=3)

    async def body(store: Store) -> list[Written]:
        return await store.write(
            [
                Write(
                    exhausted=exhausted(
                        dlq_sequence=1,
                        envelope_json=nul_json,
                        original_json=b'{"text": "a\\u0000b"}',
                        raw=nul_json,
                    )
                ),
                Write(
                    exhausted=exhausted(
                        dlq_sequence=2,
                        envelope_json=None,
                        original_json=None,
                        raw=not_json,
                        event_timestamp=None,
                    )
                ),
                Write(exhausted=valid),
            ]
        )

    assert run(dsn, body) == [Written(inserted=True)] * 3

    nul = _exhausted_row(dsn, 1)
    assert nul["raw_payload"] == nul_json
    assert nul["undecodable"] == "true"
    assert nul["dlq_payload"]["size"] == len(nul_json)
    assert nul["dlq_payload"]["dlq_subject"] == "v1.dlq.acme"
    assert nul["original_payload"] is None
    assert nul["company_id"] == "acme" and nul["source_subject"] == "v1.messages.upsert.acme"

    undecoded = _exhausted_row(dsn, 2)
    assert undecoded["raw_payload"] == not_json
    assert undecoded["undecodable"] == "true"
    assert undecoded["dlq_payload"]["size"] == len(not_json)
    assert undecoded["event_timestamp"] is None

    good = _exhausted_row(dsn, 3)
    assert good["raw_payload"] is None
    assert good["undecodable"] is None
    assert good["dlq_payload"] == json.loads(valid.envelope_json or b"")
    assert good["original_payload"] == {"id": "m1"}
    assert good["event_timestamp"].isoformat() == "2024-05-06T07:08:09+00:00"
    assert (good["last_error"], good["retry_count"], good["reason"]) == (
        "boom",
        3,
        "retries_exhausted",
    )
    assert (good["dlq_stream"], good["dlq_subject"], good["resolved"]) == (
        "DLQ",
        "v1.dlq.acme",
        False,
    )


# 4. tenant rows


def test_upsert_creates_schema_and_is_idempotent(dsn: str) -> None:
    before = schemas(dsn)
    assert "daisi_acme" not in before

    async def body(store: Store) -> list[list[Written]]:
        write = Write(tenant="acme", rows=encode((upsert("a"),)))
        return [await store.write([write]), await store.write([write])]

    assert run(dsn, body) == [[Written()], [Written()]]
    assert schemas(dsn) - before == {"daisi_acme"}
    assert rows(dsn) == {"a": ("acme", 1)}


def test_mixed_case_tenant_keeps_its_case_in_its_schema(dsn: str) -> None:
    before = schemas(dsn)
    results = run(
        dsn, lambda s: s.write([Write(tenant="AcMe", rows=encode((upsert("m", tenant="AcMe"),)))])
    )
    assert results == [Written()]
    assert schemas(dsn) - before == {"daisi_AcMe"}
    assert rows(dsn, "daisi_AcMe") == {"m": ("AcMe", 1)}


# 5. one failing item never fails the others


@pytest.mark.parametrize(
    "bad_attempt", ["not-an-int", "1\x002", 2**40], ids=["not-int", "nul", "overflow"]
)
def test_failing_item_does_not_fail_the_batch(dsn: str, bad_attempt: Any) -> None:
    writes = [Write(tenant="acme", rows=encode((upsert(f"r{i}", i),))) for i in range(5)]
    writes[2] = Write(tenant="acme", rows=encode((upsert("r2", bad_attempt),)))

    results = run(dsn, lambda s: s.write(writes))
    assert len(results) == 5
    assert_failed(results[2], FailureKind.PERMANENT)
    assert [r for i, r in enumerate(results) if i != 2] == [Written()] * 4
    assert rows(dsn) == {f"r{i}": ("acme", i) for i in (0, 1, 3, 4)}


def test_failing_item_rolls_back_its_own_earlier_rows(dsn: str) -> None:
    # Item 1 writes one good row and then a bad one: neither is kept.
    writes = [
        Write(tenant="acme", rows=encode((upsert("ok0"),))),
        Write(tenant="acme", rows=encode((upsert("half"), upsert("bad", "x")))),
        Write(exhausted=exhausted()),
    ]
    results = run(dsn, lambda s: s.write(writes))
    assert results[0] == Written()
    assert_failed(results[1], FailureKind.PERMANENT)
    assert results[2] == Written(inserted=True)
    assert rows(dsn) == {"ok0": ("acme", 1)}
    assert query(dsn, "SELECT count(*) FROM public.exhausted_events") == [(1,)]


# 6. update of a missing row


def test_update_missing_row_is_transient_not_found(dsn: str) -> None:
    async def body(store: Store) -> tuple[list[Written], list[Written]]:
        first = await store.write(
            [
                Write(tenant="acme", rows=encode((update("u", 7),))),
                Write(tenant="acme", rows=encode((upsert("other", 1),))),
            ]
        )
        await store.write([Write(tenant="acme", rows=encode((upsert("u", 1),)))])
        second = await store.write([Write(tenant="acme", rows=encode((update("u", 7),)))])
        return first, second

    first, second = run(dsn, body)
    assert_failed(first[0], FailureKind.TRANSIENT, Reason.NOT_FOUND)
    assert first[1] == Written()
    assert second == [Written()]
    assert rows(dsn) == {"other": ("acme", 1), "u": ("acme", 7)}


def test_a_lone_missing_update_fails_alone_without_rewriting_the_batch(dsn: str) -> None:
    # Updates overtaking their upserts are common: they must not send every
    # batch they travel in down the item-by-item path. The fast path alone
    # must answer: it raises when it needs the slow one.
    async def body(store: Store) -> list[WriteResult]:
        await store.write([Write(tenant="acme", rows=encode((upsert("seed"),)))])  # the schema
        writes = [
            Write(tenant="acme", rows=encode((upsert("a", 1),))),
            Write(tenant="acme", rows=encode((update("missing", 7),))),
            Write(tenant="acme", rows=encode((upsert("b", 2),))),
        ]
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            return await writer._fast(conn, writes, {})

    results = run(dsn, body)
    assert results[0] == results[2] == Written()
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.NOT_FOUND)
    assert rows(dsn) == {"seed": ("acme", 1), "a": ("acme", 1), "b": ("acme", 2)}


def test_a_missing_update_in_a_larger_item_rolls_back_only_that_item(dsn: str) -> None:
    async def body(store: Store) -> list[Written]:
        return await store.write(
            [
                Write(tenant="acme", rows=encode((upsert("a", 1),))),
                Write(tenant="acme", rows=encode((upsert("half", 3), update("missing", 7)))),
            ]
        )

    results = run(dsn, body)
    assert results[0] == Written()
    assert_failed(results[1], FailureKind.TRANSIENT, Reason.NOT_FOUND)
    assert rows(dsn) == {"a": ("acme", 1)}


# 7. monotonic columns


def test_monotonic_column_never_moves_back(dsn: str) -> None:
    async def body(store: Store) -> None:
        mono = ("attempt",)
        await store.write([Write(tenant="acme", rows=encode((upsert("m", 5), upsert("plain", 5))))])
        results = await store.write(
            [
                Write(
                    tenant="acme", rows=encode((upsert("m", 3, monotonic=mono), upsert("plain", 3)))
                )
            ]
        )
        assert results == [Written()]
        assert rows(dsn) == {"m": ("acme", 5), "plain": ("acme", 3)}
        # Forward still moves it, on upsert and on update.
        await store.write([Write(tenant="acme", rows=encode((upsert("m", 8, monotonic=mono),)))])
        assert rows(dsn)["m"] == ("acme", 8)
        down = RowOp(
            op="update",
            table="test_rows",
            key=("id",),
            values={"id": "m", "attempt": 2},
            monotonic=mono,
        )
        assert await store.write([Write(tenant="acme", rows=encode((down,)))]) == [Written()]
        assert rows(dsn)["m"] == ("acme", 8)

    run(dsn, body)


def test_a_key_written_twice_in_one_group_ends_as_if_written_in_order(dsn: str) -> None:
    # PostgreSQL refuses to upsert one row twice in a statement: the store must
    # split such rows into rounds, and keep monotonic and insert-only meanings.
    mono = ("attempt",)

    async def body(store: Store) -> list[Written]:
        return await store.write(
            [
                Write(tenant="acme", rows=encode((upsert("d", 4), upsert("d", 2), upsert("e", 1)))),
                Write(tenant="acme", rows=encode((upsert("d", 3),))),
                Write(tenant="acme", rows=encode((upsert("m", 9, monotonic=mono),))),
                Write(tenant="acme", rows=encode((upsert("m", 5, monotonic=mono),))),
                Write(
                    tenant="acme",
                    rows=encode(
                        (upsert("i", 1, insert_only=mono), upsert("i", 6, insert_only=mono))
                    ),
                ),
            ]
        )

    assert run(dsn, body) == [Written()] * 5
    assert rows(dsn) == {
        "d": ("acme", 3),
        "e": ("acme", 1),
        "m": ("acme", 9),
        "i": ("acme", 1),
    }


# 8. invalid tenants


@pytest.mark.parametrize(
    "tenant",
    ['a";DROP SCHEMA x;--', "../x", "x" * 200, "ação", "", "-x", "a.b", "a b"],
    ids=["injection", "path", "long", "non-ascii", "empty", "dash-first", "dot", "space"],
)
def test_invalid_tenant_is_permanent(dsn: str, tenant: str) -> None:
    query(dsn, "CREATE SCHEMA x")
    before = schemas(dsn)
    writes = [
        Write(tenant=tenant, rows=encode((upsert("i", tenant=tenant),))),
        Write(tenant="acme", rows=encode((upsert("ok"),))),
    ]
    results = run(dsn, lambda s: s.write(writes))
    assert_failed(results[0], FailureKind.PERMANENT, Reason.INVALID_TENANT)
    assert results[1] == Written()
    assert schemas(dsn) - before == {"daisi_acme"}
    assert "x" in schemas(dsn)
    assert rows(dsn) == {"ok": ("acme", 1)}


def test_longest_valid_tenant_fits_identifier_limit(dsn: str) -> None:
    tenant = "T" * 57
    results = run(
        dsn, lambda s: s.write([Write(tenant=tenant, rows=encode((upsert("l", tenant=tenant),)))])
    )
    assert results == [Written()]
    assert rows(dsn, "daisi_" + "T" * 57) == {"l": (tenant, 1)}


# 9. database unavailable


def test_unreachable_database(dsn: str) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"

    async def body(store: Store) -> None:
        assert await store.ping() is False
        with pytest.raises(StoreUnavailable):
            await store.write([Write(tenant="acme", rows=encode((upsert("a"),)))])
        with pytest.raises(StoreUnavailable):
            await store.write([Write(exhausted=exhausted())])
        assert await store.ping() is False

    run(dead, body, migrate=False)


def test_start_retries_an_unreachable_database_then_gives_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    for migrate in (True, False):
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="dlqproc.store"),
            pytest.raises(StoreUnavailable, match="cannot connect to Postgres"),
        ):
            run(dead, lambda s: s.start(migrate=migrate, timeout=0.5), migrate=False)  # noqa: B023
        retries = [r for r in caplog.records if r.message == "Postgres not reachable yet, retrying"]
        # Backing off 0.1 s, then 0.2 s; the next wait would pass the timeout
        # (a slow machine may have spent the second wait already).
        delays = [r.retry_in for r in retries]  # type: ignore[attr-defined]
        assert delays in ([0.1], [0.1, 0.2]), delays


def test_start_migrates_or_only_connects(dsn: str) -> None:
    async def body(store: Store) -> list[list[str]]:
        return [
            await store.start(migrate=False, timeout=0),
            await store.start(migrate=True, timeout=0),
            await store.start(migrate=True, timeout=0),
        ]

    connected, applied, again = run(dsn, body, migrate=False)
    assert connected == [] and again == []
    assert applied == [name for _, name, _ in migrations()]


def test_probes_after_a_killed_connection_raise_then_reconnect(dsn: str) -> None:
    async def body(store: Store) -> None:
        await store.write([Write(exhausted=exhausted(company_id="globex"))])
        assert await store.tenants_known() == 0
        assert _terminate_dlqproc_backends(dsn) == 1
        with pytest.raises(StoreUnavailable):
            await store.exhausted_stats()
        stats = await store.exhausted_stats()
        assert list(stats) == ["globex"] and stats["globex"][0] == 1

    run(dsn, body)


def _terminate_dlqproc_backends(dsn: str) -> int:
    found = query(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'dlqproc' AND datname = current_database()",
    )
    return sum(1 for (ok,) in found if ok)


@pytest.mark.parametrize("kind", ["rows", "exhausted"])
def test_killed_connection_raises_then_reconnects(dsn: str, kind: str) -> None:
    def make(i: int) -> Write:
        if kind == "rows":
            return Write(tenant="acme", rows=encode((upsert(f"k{i}"),)))
        return Write(exhausted=exhausted(dlq_sequence=i))

    async def body(store: Store) -> None:
        assert await store.write([make(1)]) == [Written(inserted=kind == "exhausted")]
        assert await store.ping() is True
        assert _terminate_dlqproc_backends(dsn) == 1
        with pytest.raises(StoreUnavailable):
            await store.write([make(2)])
        assert await store.write([make(3)]) == [Written(inserted=kind == "exhausted")]
        # Committed: visible from another connection while the store is still open.
        if kind == "rows":
            assert rows(dsn) == {"k1": ("acme", 1), "k3": ("acme", 1)}
        else:
            found = query(dsn, "SELECT dlq_sequence FROM public.exhausted_events ORDER BY 1")
            assert found == [(1,), (3,)]
        assert await store.ping() is True

    run(dsn, body)


def test_ping_after_killed_connection_reconnects(dsn: str) -> None:
    async def body(store: Store) -> None:
        assert await store.ping() is True
        assert _terminate_dlqproc_backends(dsn) == 1
        # The first use of the dead connection may fail; the store then recovers.
        await store.ping()
        assert await store.ping() is True
        assert await store.write([Write(tenant="acme", rows=encode((upsert("p"),)))]) == [Written()]

    run(dsn, body)
    assert rows(dsn) == {"p": ("acme", 1)}


# 10. identifiers are quoted


@pytest.mark.parametrize(
    "table",
    ['test_rows"; DROP TABLE x; --', "test_rows; DROP TABLE x; --", "x; DROP TABLE x"],
)
def test_table_name_is_quoted(dsn: str, table: str) -> None:
    async def body(store: Store) -> list[Written]:
        # Creates daisi_acme, then the sentinel inside it.
        await store.write([Write(tenant="acme", rows=encode((upsert("seed"),)))])
        query(dsn, "CREATE TABLE daisi_acme.x (v int)")
        query(dsn, "INSERT INTO daisi_acme.x VALUES (1)")
        evil = RowOp(op="upsert", table=table, key=("id",), values={"id": "e", "attempt": 1})
        return await store.write(
            [
                Write(tenant="acme", rows=encode((evil,))),
                Write(tenant="acme", rows=encode((upsert("after"),))),
            ]
        )

    results = run(dsn, body)
    assert isinstance(results[0], NotWritten), results[0]
    assert "does not exist" in str(results[0].failure)
    assert results[1] == Written()
    assert query(dsn, "SELECT v FROM daisi_acme.x") == [(1,)]
    assert rows(dsn) == {"seed": ("acme", 1), "after": ("acme", 1)}


def test_column_and_key_names_are_quoted(dsn: str) -> None:
    async def body(store: Store) -> list[Written]:
        await store.write([Write(tenant="acme", rows=encode((upsert("seed"),)))])
        query(dsn, "CREATE TABLE daisi_acme.x (v int)")
        evil_col = RowOp(
            op="upsert",
            table="test_rows",
            key=("id",),
            values={"id": "e", 'attempt") VALUES (1); DROP TABLE daisi_acme.x; --': 1},
        )
        evil_key = RowOp(
            op="update",
            table="test_rows",
            key=('id" = id OR TRUE; DROP TABLE daisi_acme.x; --',),
            values={'id" = id OR TRUE; DROP TABLE daisi_acme.x; --': "seed", "attempt": 9},
        )
        return await store.write(
            [
                Write(tenant="acme", rows=encode((evil_col,))),
                Write(tenant="acme", rows=encode((evil_key,))),
            ]
        )

    results = run(dsn, body)
    assert isinstance(results[0], NotWritten), results[0]
    assert isinstance(results[1], NotWritten), results[1]
    assert query(dsn, "SELECT count(*) FROM daisi_acme.x") == [(0,)]
    assert rows(dsn) == {"seed": ("acme", 1)}


# Bugs found while writing these tests.


@pytest.mark.parametrize("bad", ["table", "column"])
def test_undefined_table_or_column_is_permanent(dsn: str, bad: str) -> None:
    values = {"id": "e", "company_id": "acme", "attempt": 1}
    if bad == "column":
        values["no_such_column"] = 1
    table = "no_such_table" if bad == "table" else "test_rows"
    op = RowOp(op="upsert", table=table, key=("id",), values=values)
    results = run(dsn, lambda s: s.write([Write(tenant="acme", rows=encode((op,)))]))
    assert_failed(results[0], FailureKind.PERMANENT, Reason.VALIDATION)


# Incompressible, so that PostgreSQL cannot fit it into a btree index entry.
_HUGE = random.Random(0).randbytes(6000).hex()


def test_oversized_key_fails_only_its_item(dsn: str) -> None:
    writes = [
        Write(tenant="acme", rows=encode((upsert("ok1"),))),
        Write(tenant="acme", rows=encode((upsert(_HUGE),))),
        Write(tenant="acme", rows=encode((upsert("ok2"),))),
    ]
    results = run(dsn, lambda s: s.write(writes))
    assert_failed(results[1], FailureKind.PERMANENT)
    assert results[0] == results[2] == Written()
    assert rows(dsn) == {"ok1": ("acme", 1), "ok2": ("acme", 1)}


def test_oversized_exhausted_subject_is_stored_truncated(dsn: str) -> None:
    # An exhausted row must always be storable, or its message could never leave
    # the stream: an over-long source subject is cut to fit its index.
    writes = [
        Write(exhausted=exhausted(dlq_sequence=1, source_subject=_HUGE + ".acme")),
        Write(exhausted=exhausted(dlq_sequence=2)),
    ]
    results = run(dsn, lambda s: s.write(writes))
    assert results == [Written(inserted=True), Written(inserted=True)]
    with psycopg.connect(dsn) as conn:
        lengths = [
            r[0]
            for r in conn.execute(
                "SELECT length(source_subject) FROM exhausted_events ORDER BY dlq_sequence"
            )
        ]
    assert lengths[0] == 1024 and lengths[1] < 1024


def test_probes_wait_for_a_commit_group_they_never_join(dsn: str) -> None:
    # The probes share the commit loop's connection: a read that slipped in
    # while a group was being written would run inside its transaction (a
    # replica's commit loop once hung that way in the cluster test).
    async def body(store: Store) -> None:
        blocker = await psycopg.AsyncConnection.connect(dsn)
        try:
            await blocker.execute("LOCK TABLE public.exhausted_events IN ACCESS EXCLUSIVE MODE")
            write = asyncio.ensure_future(store.write([Write(exhausted=exhausted())]))
            await _until_a_dlqproc_backend_waits_on_a_lock(dsn)
            finished_after_write: list[bool] = []
            probes = [
                asyncio.ensure_future(p())
                for p in (store.exhausted_stats, store.tenants_known, store.replay_totals)
            ]
            for probe in probes:
                probe.add_done_callback(lambda _: finished_after_write.append(write.done()))
            done, _ = await asyncio.wait(probes, timeout=0.5)
            assert not done, "a probe ran while a commit group held the connection"
        finally:
            await blocker.rollback()
            await blocker.close()
        assert await write == [Written(inserted=True)]
        stats, _, _ = await asyncio.gather(*probes)
        assert stats["acme"][0] == 1
        assert finished_after_write == [True, True, True]

    run(dsn, body)


async def _until_a_dlqproc_backend_waits_on_a_lock(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(200):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dlqproc'"
                " AND wait_event_type = 'Lock'"
            )
            row = await cur.fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the commit group never waited on the lock")
