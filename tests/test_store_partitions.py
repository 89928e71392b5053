"""Monthly partitions of `messages` and insert-only columns, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import psycopg

from dlqproc.handlers.whatsapp import TENANT_DDL
from dlqproc.model import RowOp
from dlqproc.rows import encode
from dlqproc.store import Store, Write, Written, month_bounds


def message(mid: str, date: str, status: str = "sent", partition: bool = True) -> RowOp:
    return RowOp(
        op="upsert",
        table="messages",
        key=("message_id", "message_date"),
        values={
            "message_id": mid,
            "chat_id": "c",
            "jid": "j",
            "company_id": "acme",
            "flow": "IN",
            "agent_id": "a",
            "status": status,
            "message_date": date,
        },
        insert_only=("status",),
        partition=date[:7] if partition else "",
    )


def write(dsn: str, *ops: RowOp) -> list[Written]:
    async def main() -> list[Written]:
        store = Store(dsn, 10.0, TENANT_DDL)
        try:
            await store.migrate()
            return await store.write([Write(tenant="acme", rows=encode((op,))) for op in ops])
        finally:
            await store.close()

    return asyncio.run(main())


def where(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        rows: list[Any] = conn.execute(
            "SELECT message_id, tableoid::regclass::text FROM daisi_acme.messages"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def test_month_bounds() -> None:
    assert month_bounds("2026-12") == (dt.date(2026, 12, 1), dt.date(2027, 1, 1))
    for bad in ("2026-13", "2026-00", "26-01", "2026-1", "x", "0000-01"):
        assert month_bounds(bad) is None


def test_rows_land_in_their_month_partition(dsn: str) -> None:
    assert write(dsn, message("m1", "2026-11-29"), message("m2", "2026-12-01")) == [
        Written(),
        Written(),
    ]
    assert where(dsn) == {"m1": "daisi_acme.messages_2026_11", "m2": "daisi_acme.messages_2026_12"}


def test_rows_in_the_default_partition_move_when_their_month_is_created(dsn: str) -> None:
    # Written without a partition hint: they land in the default partition.
    write(
        dsn,
        message("old1", "2025-03-02", partition=False),
        message("old2", "2025-03-30", partition=False),
        message("other", "2025-04-01", partition=False),
    )
    assert set(where(dsn).values()) == {"daisi_acme.messages_default"}
    write(dsn, message("new", "2025-03-15"))
    placed = where(dsn)
    assert placed["old1"] == placed["old2"] == placed["new"] == "daisi_acme.messages_2025_03"
    assert placed["other"] == "daisi_acme.messages_default"


def test_insert_only_columns_are_not_overwritten_by_a_replayed_upsert(dsn: str) -> None:
    write(dsn, message("m", "2026-11-29", status="sent"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE daisi_acme.messages SET status = 'read' WHERE message_id = 'm'")
    write(dsn, message("m", "2026-11-29", status="sent"))  # a replay of the old upsert
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status FROM daisi_acme.messages").fetchone()
    assert row == ("read",)


def test_a_history_batch_of_one_shape_is_written_in_one_go(dsn: str) -> None:
    ops = tuple(message(f"h{i}", "2026-11-29") for i in range(300))

    async def main() -> list[Written]:
        store = Store(dsn, 10.0, TENANT_DDL)
        try:
            await store.migrate()
            return await store.write([Write(tenant="acme", rows=encode(ops))])
        finally:
            await store.close()

    assert asyncio.run(main()) == [Written()]
    assert len(where(dsn)) == 300


def partitions(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'daisi_acme.messages'::regclass"
        ).fetchall()
    return {r[0] for r in found}


def test_a_partition_that_cannot_be_created_keeps_its_rows_in_default(dsn: str) -> None:
    write(dsn, message("seed", "2016-03-10"))
    # An object already holds the partition's name: creating it fails, and
    # only its month's rows wait in the default partition; the group's other
    # month still gets its partition, and every row is written.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE daisi_acme.messages_2016_01 (x int)")
    assert write(dsn, message("jan", "2016-01-10"), message("feb", "2016-02-10")) == [
        Written(),
        Written(),
    ]
    placed = where(dsn)
    assert placed["jan"] == "daisi_acme.messages_default"
    assert placed["feb"] == "daisi_acme.messages_2016_02"
    assert partitions(dsn) == {"messages_default", "messages_2016_02", "messages_2016_03"}
    # Once the obstacle is gone, a later write creates it and moves the row out.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE daisi_acme.messages_2016_01")
    assert write(dsn, message("jan2", "2016-01-20")) == [Written()]
    placed = where(dsn)
    assert placed["jan"] == placed["jan2"] == "daisi_acme.messages_2016_01"
