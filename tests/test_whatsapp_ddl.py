"""The WhatsApp registry's TENANT_DDL and rows against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from test_whatsapp_handlers import event

from dlqproc.handlers.payloads import EARLIEST_TIMESTAMP, LATEST_TIMESTAMP
from dlqproc.handlers.whatsapp import HANDLERS, TENANT_DDL
from dlqproc.model import FailureKind, Reason, RowOp
from dlqproc.rows import encode
from dlqproc.store import Store, Write, Written

SCHEMA = "daisi_acme"
TABLES = {"chats", "contacts", "agents", "messages"}


# TENANT_DDL as the previous version had it, before the zero-value defaults:
# the tables an earlier version left behind, which start-up must bring up to date.
_PREVIOUS_TIMES = """
        last_metadata jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()"""

PREVIOUS_DDL: tuple[str, ...] = (
    f"""CREATE TABLE IF NOT EXISTS {{schema}}.chats (
        chat_id text PRIMARY KEY,
        jid text,
        company_id text NOT NULL,
        agent_id text,
        phone_number text,
        push_name text,
        custom_name text,
        is_group boolean,
        group_name text,
        last_message jsonb,
        conversation_timestamp bigint,
        unread_count bigint,
        not_spam boolean,{_PREVIOUS_TIMES}
    )""",
    f"""CREATE TABLE IF NOT EXISTS {{schema}}.contacts (
        chat_id text PRIMARY KEY,
        phone_number text,
        company_id text NOT NULL,
        agent_id text,
        push_name text,{_PREVIOUS_TIMES}
    )""",
    "CREATE INDEX IF NOT EXISTS contacts_phone_number_agent_id"
    " ON {schema}.contacts (phone_number, agent_id)",
    f"""CREATE TABLE IF NOT EXISTS {{schema}}.agents (
        agent_id text PRIMARY KEY,
        company_id text NOT NULL,
        qr_code text,
        status text,
        agent_name text,
        host_name text,
        version text,
        phone_number text,{_PREVIOUS_TIMES}
    )""",
    f"""CREATE TABLE IF NOT EXISTS {{schema}}.messages (
        message_id text NOT NULL,
        from_phone text,
        to_phone text,
        chat_id text,
        jid text,
        message_text text,
        message_url text,
        message_type text,
        company_id text NOT NULL,
        key jsonb,
        edited_message_obj jsonb,
        message_obj jsonb,
        flow text CHECK (flow IN ('IN', 'OUT')),
        agent_id text,
        status text,
        is_deleted boolean NOT NULL DEFAULT false,
        message_timestamp bigint,
        message_date date NOT NULL,
        campaign jsonb,{_PREVIOUS_TIMES},
        PRIMARY KEY (message_id, message_date)
    ) PARTITION BY RANGE (message_date)""",
    "CREATE TABLE IF NOT EXISTS {schema}.messages_default PARTITION OF {schema}.messages DEFAULT",
    "CREATE INDEX IF NOT EXISTS messages_message_id ON {schema}.messages (message_id)",
    "CREATE INDEX IF NOT EXISTS messages_chat_id_message_timestamp"
    " ON {schema}.messages (chat_id, message_timestamp)",
)


def apply_ddl(
    conn: psycopg.Connection[Any], ddl: Sequence[str] = TENANT_DDL, schema: str = SCHEMA
) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    for statement in ddl:
        conn.execute(sql.SQL(statement).format(schema=sql.Identifier(schema)))


def column_defaults(dsn: str, schema: str) -> dict[tuple[str, str], str | None]:
    """(table, column) -> its default expression, for the tenant tables of `schema`."""
    return {
        (t, c): d
        for t, c, d in query(
            dsn,
            "SELECT table_name, column_name, column_default FROM information_schema.columns"
            " WHERE table_schema = %s",
            (schema,),
        )
        if t in TABLES
    }


def query(dsn: str, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(text.encode(), params).fetchall()


def test_tenant_ddl_is_idempotent_and_creates_the_tables(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_ddl(conn)
        apply_ddl(conn)
    kinds = dict(
        query(
            dsn,
            "SELECT c.relname, c.relkind::text FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            (SCHEMA,),
        )
    )
    assert kinds == {
        "chats": "r",
        "contacts": "r",
        "agents": "r",
        "messages": "p",
        "messages_default": "r",
    }
    (strategy,) = query(
        dsn,
        "SELECT pt.partstrat::text, a.attname FROM pg_partitioned_table pt"
        " JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]"
        " WHERE pt.partrelid = %s::regclass",
        (f"{SCHEMA}.messages",),
    )
    assert strategy == ("r", "message_date")
    (default,) = query(
        dsn,
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = %s::regclass",
        (f"{SCHEMA}.messages",),
    )
    assert default == ("messages_default", "DEFAULT")
    columns: dict[str, set[str]] = {}
    for table, column in query(
        dsn,
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s",
        (SCHEMA,),
    ):
        columns.setdefault(table, set()).add(column)
    for table in TABLES:
        assert {"company_id", "last_metadata", "created_at", "updated_at"} <= columns[table]
    assert {
        "message_id",
        "from_phone",
        "to_phone",
        "chat_id",
        "jid",
        "message_text",
        "message_url",
        "message_type",
        "key",
        "edited_message_obj",
        "message_obj",
        "flow",
        "agent_id",
        "status",
        "is_deleted",
        "message_timestamp",
        "message_date",
        "campaign",
    } <= columns["messages"]
    assert {"phone_number"} <= columns["agents"]
    indexes = {
        r[0]
        for r in query(dsn, "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (SCHEMA,))
    }
    assert {"messages_message_id", "contacts_phone_number_agent_id"} <= indexes


# The handlers' rows through the real Store ------------------------------------


def rows_of(base: str, payload: dict[str, Any]) -> tuple[RowOp, ...]:
    return tuple(HANDLERS[base](event(base, payload)))


def write(dsn: str, *events: tuple[str, dict[str, Any]]) -> list[Written]:
    async def main() -> list[Written]:
        store = Store(dsn, statement_timeout=10.0, tenant_ddl=TENANT_DDL)
        try:
            await store.migrate()  # tenants are recorded in a table of the migrations
            return await store.write(
                [
                    Write(tenant="acme", rows=encode(rows_of(base, payload)))
                    for base, payload in events
                ]
            )
        finally:
            await store.close()

    return asyncio.run(main())


def snapshot(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every tenant row, without updated_at and last_metadata (which a replay rewrites)."""
    out = {}
    for table in sorted(TABLES):
        cols = [
            r[0]
            for r in query(
                dsn,
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (SCHEMA, table),
            )
            if r[0] not in ("updated_at", "last_metadata")
        ]
        select = sql.SQL("SELECT {} FROM {} ORDER BY 1").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), sql.Identifier(SCHEMA, table)
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            out[table] = conn.execute(select).fetchall()
    return out


# A base for conversation timestamps (2025-11-29T10:00:00Z): T + n orders like n.
T = 1764410400
CHAT = {
    "chat_id": "c1",
    "jid": "c1@s.whatsapp.net",
    "agent_id": "a1",
    "phone_number": "123",
    "unread_count": 1,
    "conversation_timestamp": T + 100,
    "last_message": {"text": "hi"},
}
MESSAGE = {
    "message_id": "M1",
    "chat_id": "c1",
    "jid": "c1@s.whatsapp.net",
    "flow": "OUT",
    "agent_id": "a1",
    "key": {"id": "M1", "fromMe": True, "remoteJid": "c1@s.whatsapp.net"},
    "message_timestamp": 1764410400,
    "campaign": {"is_campaign": False, "tags": ["t"]},
}
CONTACT = {"chat_id": "c1", "phone_number": "123", "agent_id": "a1", "push_name": "Ann"}
EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("v1.chats.upsert", CHAT),
    ("v1.history.chats", {"chats": [{**CHAT, "chat_id": "c2", "unread_count": 0}]}),
    ("v1.chats.update", {"chat_id": "c1", "agent_id": "a1", "unread_count": 1}),
    ("v1.messages.upsert", MESSAGE),
    ("v1.history.messages", {"messages": [{**MESSAGE, "message_id": "M2"}], "agent_id": "a1"}),
    ("v1.messages.update", {"message_id": "M1", "status": "read", "is_deleted": True}),
    ("v1.contacts.upsert", CONTACT),
    ("v1.history.contacts", {"contacts": [{**CONTACT, "chat_id": "c2"}]}),
    ("v1.contacts.update", {"phone_number": "123", "agent_id": "a1", "push_name": "Annie"}),
    ("v1.connection.update", {"agent_id": "a1", "status": "open", "phone_number": "999"}),
]


def test_every_event_writes_and_replays_to_the_same_rows(dsn: str) -> None:
    assert {base for base, _ in EVENTS} == set(HANDLERS)
    assert write(dsn, *EVENTS) == [Written()] * len(EVENTS)
    first = snapshot(dsn)
    for _ in range(2):
        assert write(dsn, *EVENTS) == [Written()] * len(EVENTS)
        assert snapshot(dsn) == first
    chats = query(
        dsn, f"SELECT chat_id, unread_count, conversation_timestamp FROM {SCHEMA}.chats ORDER BY 1"
    )
    assert chats == [
        ("c1", 1, T + 100),
        ("c2", 0, T + 100),
    ]  # unread_count absolute, not incremented
    (msg,) = query(
        dsn,
        f"SELECT key, message_date::text, status, is_deleted, campaign FROM {SCHEMA}.messages"
        " WHERE message_id = 'M1'",
    )
    assert msg == (
        {"id": "M1", "fromMe": True, "remoteJid": "c1@s.whatsapp.net"},
        "2025-11-29",
        "read",
        True,
        {"is_campaign": False, "tags": ["t"]},
    )
    assert query(dsn, f"SELECT push_name FROM {SCHEMA}.contacts WHERE chat_id = 'c1'") == [
        ("Annie",)
    ]
    assert query(dsn, f"SELECT phone_number, company_id FROM {SCHEMA}.agents") == [("999", "acme")]
    (meta,) = query(dsn, f"SELECT last_metadata FROM {SCHEMA}.agents")
    assert meta[0]["subject"] == "v1.connection.update.acme"
    assert meta[0]["stream_seq"] == 7


def test_conversation_timestamp_only_moves_forward(dsn: str) -> None:
    assert write(dsn, ("v1.chats.upsert", CHAT)) == [Written()]
    update = {"chat_id": "c1", "agent_id": "a1"}
    write(dsn, ("v1.chats.update", {**update, "conversation_timestamp": T + 50}))
    write(dsn, ("v1.chats.upsert", {**CHAT, "conversation_timestamp": T + 70}))
    assert query(dsn, f"SELECT conversation_timestamp FROM {SCHEMA}.chats") == [(T + 100,)]
    write(dsn, ("v1.chats.update", {**update, "conversation_timestamp": T + 200}))
    assert query(dsn, f"SELECT conversation_timestamp FROM {SCHEMA}.chats") == [(T + 200,)]


def test_updates_of_missing_rows_are_transient_not_found(dsn: str) -> None:
    results = write(
        dsn,
        ("v1.chats.update", {"chat_id": "nope", "agent_id": "a1"}),
        ("v1.messages.update", {"message_id": "nope", "status": "read"}),
        ("v1.contacts.update", {"phone_number": "0", "agent_id": "a1", "push_name": "x"}),
        ("v1.connection.update", {"agent_id": "a1"}),
    )
    for result in results[:3]:
        assert result.failure is not None
        assert (result.failure.kind, result.failure.reason) == (
            FailureKind.TRANSIENT,
            Reason.NOT_FOUND,
        )
    assert results[3] == Written()


def test_messages_at_the_timestamp_bounds_are_stored(dsn: str) -> None:
    # The latest timestamp's month ends on 9999-01-01: storage can hold it.
    first = {**MESSAGE, "message_id": "first", "message_timestamp": EARLIEST_TIMESTAMP}
    last = {**MESSAGE, "message_id": "last", "message_timestamp": LATEST_TIMESTAMP}
    events = [("v1.messages.upsert", first), ("v1.messages.upsert", last)]
    assert write(dsn, *events) == [Written()] * 2
    assert write(dsn, *events) == [Written()] * 2
    assert query(
        dsn, f"SELECT message_id, message_date::text FROM {SCHEMA}.messages ORDER BY 2"
    ) == [("first", "2009-01-01"), ("last", "9998-12-31")]


# Zero-value defaults on the tables of an earlier version -------------------------


def test_tables_of_the_previous_ddl_get_the_zero_value_defaults(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_ddl(conn, PREVIOUS_DDL)
        conn.execute(
            f"INSERT INTO {SCHEMA}.chats (chat_id, jid, company_id, agent_id, phone_number)"
            " VALUES ('old', 'j', 'acme', 'a1', '1')"
        )
        # A default someone else chose (the old service's schema) is theirs.
        conn.execute(f"ALTER TABLE {SCHEMA}.chats ALTER COLUMN custom_name SET DEFAULT 'x'")
        before = column_defaults(dsn, SCHEMA)
        apply_ddl(conn)
        apply_ddl(conn)
        apply_ddl(conn, schema="daisi_fresh")
    fresh = column_defaults(dsn, "daisi_fresh")
    migrated = column_defaults(dsn, SCHEMA)
    assert migrated == {**fresh, ("chats", "custom_name"): "'x'::text"}
    assert migrated != before
    assert fresh[("chats", "unread_count")] == "0"
    assert fresh[("agents", "qr_code")] == "''::text"
    assert fresh[("messages", "last_metadata")] is None
    # Existing NULLs are not backfilled (README, "Table semantics").
    assert query(dsn, f"SELECT unread_count, is_group, push_name FROM {SCHEMA}.chats") == [
        (None, None, None)
    ]
    # Rows inserted from now on, into the parent or a month's partition, get them.
    assert write(
        dsn,
        ("v1.chats.upsert", {k: CHAT[k] for k in ("chat_id", "jid", "agent_id", "phone_number")}),
    ) == [Written()]
    minimal = {k: MESSAGE[k] for k in ("message_id", "chat_id", "jid", "flow", "agent_id")}
    dated = {**minimal, "message_id": "M2", "message_timestamp": T}
    assert (
        write(dsn, ("v1.messages.upsert", minimal), ("v1.messages.upsert", dated))
        == [Written()] * 2
    )
    assert query(
        dsn, f"SELECT unread_count, is_group, push_name FROM {SCHEMA}.chats WHERE chat_id = 'c1'"
    ) == [(0, False, "")]
    assert query(
        dsn,
        f"SELECT message_id, tableoid::regclass::text, message_text, status, message_timestamp"
        f" FROM {SCHEMA}.messages ORDER BY 1",
    ) == [
        ("M1", f"{SCHEMA}.messages_default", "", "", 0),
        ("M2", f"{SCHEMA}.messages_2025_11", "", "", T),
    ]


def test_reapplying_the_ddl_does_not_wait_behind_a_reader(dsn: str) -> None:
    """Defaults in place: the DDL alters nothing, so an operator's long query never blocks it."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_ddl(conn, PREVIOUS_DDL)
    with psycopg.connect(dsn) as reader, psycopg.connect(dsn, autocommit=True) as conn:
        reader.execute(f"SELECT count(*) FROM {SCHEMA}.chats")  # holds ACCESS SHARE until rollback
        conn.execute("SET lock_timeout = '1s'")
        # Needing the defaults, the ALTER waits for the reader (and gives up).
        try:
            apply_ddl(conn)
        except psycopg.errors.LockNotAvailable:
            pass
        else:
            raise AssertionError("the ALTER did not wait for the reader")
        reader.rollback()
        apply_ddl(conn)
        reader.execute(f"SELECT count(*) FROM {SCHEMA}.chats")
        apply_ddl(conn)  # everything in place: no lock the reader holds up
        reader.rollback()
