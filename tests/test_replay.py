"""Replaying events leaves the same rows: a property over generated events, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqproc.generate import Generator
from dlqproc.handlers.whatsapp import HANDLERS, TENANT_DDL
from dlqproc.model import Event, Meta
from dlqproc.rows import encode
from dlqproc.store import Store, Write
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

_tenants = itertools.count(1)
TABLES = ("chats", "messages", "contacts", "agents")
# Bookkeeping columns that legitimately change on every write.
VOLATILE = {"created_at", "updated_at", "last_metadata"}


def snapshot(dsn: str, tenant: str) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    with psycopg.connect(dsn) as conn:
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM daisi_{tenant}.{table}")
            keep = [i for i, d in enumerate(cur.description or ()) if d.name not in VOLATILE]
            out[table] = sorted(
                (tuple(str(row[i]) for i in keep) for row in cur.fetchall()), key=repr
            )
    return out


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 25))
def test_replaying_events_three_times_leaves_the_same_rows(dsn: str, seed: int, n: int) -> None:
    tenant = f"replay{next(_tenants)}"
    generated = list(
        Generator(seed, (tenant,), (*REALTIME_BASES, *HISTORY_BASES), history_batch=5).events(n)
    )
    writes = []
    for i, e in enumerate(generated):
        base = e.subject.rpartition(".")[0]
        event = Event(e.subject, base, tenant, e.body, 1, Meta(stream="s", stream_seq=i + 1))
        writes.append(Write(tenant=tenant, rows=encode(tuple(HANDLERS[base](event)))))

    async def apply(times: int) -> list[dict[str, list[tuple[Any, ...]]]]:
        store = Store(dsn, 10.0, TENANT_DDL)
        snaps = []
        try:
            await store.migrate()
            for _ in range(times):
                # In order, one event per transaction, as the pipeline would.
                for w in writes:
                    await store.write([w])
                snaps.append(snapshot(dsn, tenant))
        finally:
            await store.close()
        return snaps

    first, second, third = asyncio.run(apply(3))
    assert first == second == third


def test_unread_count_applied_twice_equals_once(dsn: str) -> None:
    update = b'{"chat_id": "c", "agent_id": "a", "unread_count": 1}'
    upsert = (
        b'{"chat_id": "c", "jid": "j", "agent_id": "a", "phone_number": "1", "unread_count": 0}'
    )

    def write(base: str, body: bytes) -> Write:
        event = Event(f"{base}.acme", base, "acme", body, 1)
        return Write(tenant="acme", rows=encode(tuple(HANDLERS[base](event))))

    async def run() -> list[int]:
        store = Store(dsn, 10.0, TENANT_DDL)
        counts = []
        try:
            await store.migrate()
            await store.write([write("v1.chats.upsert", upsert)])
            for _ in range(2):
                await store.write([write("v1.chats.update", update)])
                with psycopg.connect(dsn) as conn:
                    row = conn.execute("SELECT unread_count FROM daisi_acme.chats").fetchone()
                    counts.append(row[0] if row else -1)
        finally:
            await store.close()
        return counts

    assert asyncio.run(run()) == [1, 1]
