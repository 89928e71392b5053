"""Compatibility with the service dlqproc replaces, through the whole pipeline.

Events go through real NATS (the main consumers) into a real PostgreSQL, and
every test reads the rows back as an operator's SQL would: absent fields are
the old service's zero values, an event without a field keeps the stored
value, and a repeated upsert changes exactly the columns the README's "Table
semantics" lists (test_whatsapp_handlers holds that list). Each test has a
nats-server of its own, since the events streams' subjects are fixed.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from test_whatsapp_ddl import PREVIOUS_DDL, apply_ddl, column_defaults
from test_whatsapp_handlers import (
    INSERT_ONLY,
    KEYS,
    MONOTONIC,
    UPDATE_CHANGES,
    UPSERT_CHANGES,
    ZERO_VALUES,
)

from support.service import Service, wait_until

Make = Callable[..., Service]
TS = 1764400000  # 2025-11-29T07:06:40Z
BOOKKEEPING = {"last_metadata", "created_at", "updated_at"}
# Columns only an update event writes; no upsert carries them.
UPDATE_ONLY = {
    "chats": set(),
    "messages": {"edited_message_obj", "is_deleted"},
    "contacts": set(),
    "agents": set(),
}
ROW_ID = {"chats": "chat_id", "messages": "message_id", "contacts": "chat_id", "agents": "agent_id"}
# The table each event writes and the column naming its row.
TARGET = {
    "v1.chats.upsert": ("chats", "chat_id"),
    "v1.chats.update": ("chats", "chat_id"),
    "v1.history.chats": ("chats", "chat_id"),
    "v1.messages.upsert": ("messages", "message_id"),
    "v1.messages.update": ("messages", "message_id"),
    "v1.contacts.upsert": ("contacts", "chat_id"),
    "v1.contacts.update": ("contacts", "phone_number"),
    "v1.connection.update": ("agents", "agent_id"),
}


def rows(
    svc: Service, table: str, tenant: str = "acme", column: str = ""
) -> dict[str, dict[str, Any]]:
    """Every row of a tenant table with every column, by `column` (ROW_ID's by default)."""
    column = column or ROW_ID[table]
    with psycopg.connect(svc.dsn, autocommit=True) as conn:
        try:
            cur = conn.execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier(f"daisi_{tenant}", table))
            )
        except psycopg.errors.UndefinedTable:
            return {}
        names = [d.name for d in cur.description or ()]
        found = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    return {r[column]: r for r in found}


def put(svc: Service, base: str, payload: dict[str, Any], tenant: str = "acme") -> dict[str, Any]:
    """Publish one event and wait until its row carries it; that row."""
    table, column = TARGET[base]
    subject = f"{base}.{tenant}"
    (seq,) = svc.publish_to(subject, [json.dumps(payload).encode()])
    ident = (payload["chats"][0] if base == "v1.history.chats" else payload)[column]

    def written() -> dict[str, Any] | None:
        row = rows(svc, table, tenant, column).get(ident)
        meta = (row or {}).get("last_metadata") or {}
        return row if (meta.get("subject"), meta.get("stream_seq")) == (subject, seq) else None

    row: dict[str, Any] = wait_until(written, timeout=60)
    return row


def without(row: dict[str, Any], *columns: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in {"last_metadata", "updated_at", *columns}}


def all_columns(svc: Service, table: str) -> set[str]:
    return {
        r[0]
        for r in svc.query(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'daisi_acme' AND table_name = %s",
            (table,),
        )
    }


CHAT_REQUIRED = {
    "chat_id": "c1",
    "jid": "111@s.whatsapp.net",
    "agent_id": "ag1",
    "phone_number": "111",
}
MESSAGE_REQUIRED = {
    "message_id": "M1",
    "chat_id": "c1",
    "jid": "111@s.whatsapp.net",
    "flow": "IN",
    "agent_id": "ag1",
}


def test_absent_fields_read_back_as_the_old_services_zero_values(pipeline: Make) -> None:
    svc = pipeline()
    chat = put(svc, "v1.chats.upsert", CHAT_REQUIRED)
    agent = put(svc, "v1.connection.update", {"agent_id": "ag1", "status": "open"})
    message = put(svc, "v1.messages.upsert", MESSAGE_REQUIRED)
    history = put(svc, "v1.history.chats", {"chats": [{**CHAT_REQUIRED, "chat_id": "h1"}]})
    for table, row in (("chats", chat), ("chats", history), ("messages", message)):
        assert {c: row[c] for c in ZERO_VALUES[table]} == ZERO_VALUES[table], table
    assert agent["status"] == "open"
    assert {c: agent[c] for c in ZERO_VALUES["agents"] if c != "status"} == {
        "qr_code": "",
        "agent_name": "",
        "host_name": "",
        "version": "",
        "phone_number": "",
    }
    assert str(message["message_date"]) == "1970-01-01"
    # The operators' queries find them.
    assert svc.query(
        "SELECT chat_id FROM daisi_acme.chats"
        " WHERE unread_count = 0 AND NOT is_group AND NOT not_spam AND push_name = ''"
        " AND conversation_timestamp = 0 ORDER BY 1"
    ) == [("c1",), ("h1",)]
    assert svc.query("SELECT agent_id FROM daisi_acme.agents WHERE qr_code = ''") == [("ag1",)]
    assert svc.query(
        "SELECT message_id FROM daisi_acme.messages WHERE status = '' AND message_text = ''"
    ) == [("M1",)]


def test_an_event_without_a_field_keeps_the_stored_value(pipeline: Make) -> None:
    svc = pipeline()
    full_chat = {
        **CHAT_REQUIRED,
        "push_name": "Ann",
        "custom_name": "A",
        "is_group": True,
        "group_name": "G",
        "last_message": {"text": "hi"},
        "conversation_timestamp": TS,
        "unread_count": 3,
        "not_spam": True,
    }
    before = put(svc, "v1.chats.upsert", full_chat)
    # A repeated upsert without its optional fields: nothing goes back to a default.
    after = put(svc, "v1.chats.upsert", CHAT_REQUIRED)
    assert without(after) == without(before)
    after = put(
        svc,
        "v1.chats.update",
        {"chat_id": "c1", "agent_id": "ag1", "conversation_timestamp": TS + 5},
    )
    assert without(after) == {**without(before), "conversation_timestamp": TS + 5}
    assert after["unread_count"] == 3 and after["last_message"] == {"text": "hi"}

    put(svc, "v1.messages.upsert", {**MESSAGE_REQUIRED, "message_text": "x", "status": "sent"})
    before = put(
        svc,
        "v1.messages.update",
        {
            "message_id": "M1",
            "status": "delivered",
            "edited_message_obj": {"text": "y"},
            "is_deleted": True,
            "message_url": "https://u",
        },
    )
    after = put(svc, "v1.messages.update", {"message_id": "M1", "status": "read"})
    assert without(after) == {**without(before), "status": "read"}
    after = put(svc, "v1.messages.upsert", MESSAGE_REQUIRED)
    assert without(after) == {**without(before), "status": "read"}

    contact = {"chat_id": "c1", "phone_number": "111", "agent_id": "ag1", "push_name": "Ann"}
    before = put(svc, "v1.contacts.upsert", contact)
    after = put(svc, "v1.contacts.update", {"phone_number": "111", "agent_id": "ag1"})
    assert without(after) == without(before)

    agent = {
        "agent_id": "ag1",
        "qr_code": "q",
        "status": "open",
        "agent_name": "n",
        "host_name": "h",
        "version": "1",
        "phone_number": "999",
    }
    before = put(svc, "v1.connection.update", agent)
    after = put(svc, "v1.connection.update", {"agent_id": "ag1"})
    assert without(after) == without(before)
    assert svc.exhausted() == []


# Two versions of one row's event: every field differs, the key does not.
FIRST: dict[str, dict[str, Any]] = {
    "v1.chats.upsert": {
        "chat_id": "c1",
        "jid": "111@s.whatsapp.net",
        "agent_id": "ag1",
        "phone_number": "111",
        "push_name": "Ann",
        "custom_name": "A",
        "is_group": False,
        "group_name": "ga",
        "last_message": {"text": "a"},
        "conversation_timestamp": TS,
        "unread_count": 1,
        "not_spam": False,
    },
    "v1.messages.upsert": {
        "message_id": "M1",
        "chat_id": "c1",
        "jid": "111@s.whatsapp.net",
        "flow": "IN",
        "agent_id": "ag1",
        "to_phone": "1",
        "from_phone": "2",
        "message_type": "text",
        "message_text": "a",
        "message_url": "https://a",
        "key": {"id": "M1", "fromMe": False, "remoteJid": "111@s.whatsapp.net"},
        "message_obj": {"conversation": "a"},
        "status": "sent",
        "message_timestamp": TS,
        "campaign": {"is_campaign": False, "tags": ["a"]},
    },
    "v1.contacts.upsert": {
        "chat_id": "c1",
        "phone_number": "111",
        "agent_id": "ag1",
        "push_name": "Ann",
    },
    "v1.connection.update": {
        "agent_id": "ag1",
        "qr_code": "qa",
        "status": "connecting",
        "agent_name": "na",
        "host_name": "ha",
        "version": "1",
        "phone_number": "999",
    },
}
SECOND: dict[str, dict[str, Any]] = {
    "v1.chats.upsert": {
        "chat_id": "c1",
        "jid": "222@s.whatsapp.net",
        "agent_id": "ag2",
        "phone_number": "222",
        "push_name": "Bob",
        "custom_name": "B",
        "is_group": True,
        "group_name": "gb",
        "last_message": {"text": "b"},
        "conversation_timestamp": TS + 10,
        "unread_count": 7,
        "not_spam": True,
    },
    "v1.messages.upsert": {
        "message_id": "M1",
        "chat_id": "c2",
        "jid": "222@s.whatsapp.net",
        "flow": "OUT",
        "agent_id": "ag2",
        "to_phone": "3",
        "from_phone": "4",
        "message_type": "image",
        "message_text": "b",
        "message_url": "https://b",
        "key": {"id": "M1", "fromMe": True, "remoteJid": "222@s.whatsapp.net"},
        "message_obj": {"conversation": "b"},
        "status": "read",
        "message_timestamp": TS + 60,  # the same UTC day: the same row
        "campaign": {"is_campaign": True, "tags": ["b"], "origin": "ads"},
    },
    "v1.contacts.upsert": {
        "chat_id": "c1",
        "phone_number": "222",
        "agent_id": "ag2",
        "push_name": "Bob",
    },
    "v1.connection.update": {
        "agent_id": "ag1",
        "qr_code": "qb",
        "status": "open",
        "agent_name": "nb",
        "host_name": "hb",
        "version": "2",
        "phone_number": "888",
    },
}


def stored(base: str, payload: dict[str, Any], column: str) -> Any:
    """The value an event's field is stored as (the tenant fills company_id)."""
    if column == "company_id":
        return "acme"
    if column == "message_date":
        return dt.datetime.fromtimestamp(payload["message_timestamp"], dt.UTC).date()
    return payload[column]


def test_a_repeated_upsert_changes_exactly_the_documented_columns(pipeline: Make) -> None:
    svc = pipeline()
    for base, first in FIRST.items():
        table, _ = TARGET[base]
        second = SECOND[base]
        before = put(svc, base, first)
        after = put(svc, base, second)
        columns = all_columns(svc, table)
        changes, forward = UPSERT_CHANGES[table], MONOTONIC[table]
        kept = KEYS[table] | INSERT_ONLY[table]
        # Every column is accounted for, and each is checked below.
        assert columns == kept | changes | forward | UPDATE_ONLY[table] | BOOKKEEPING, table
        for column in sorted(columns - BOOKKEEPING):
            if column in UPDATE_ONLY[table]:
                want = before[column]
            elif column in kept:
                want = stored(base, first, column)
            else:
                want = stored(base, second, column)  # the second is later: forward too
            assert after[column] == want, (table, column)
        for column in changes | forward | INSERT_ONLY[table] - {"company_id"}:
            assert stored(base, first, column) != stored(base, second, column), (table, column)
        assert after["created_at"] == before["created_at"]
        assert after["updated_at"] > before["updated_at"]
        assert after["last_metadata"]["subject"] == f"{base}.acme"

    # An update writes its own columns, never the chat's agent.
    chat = rows(svc, "chats")["c1"]
    update = {"chat_id": "c1", "agent_id": "ag3", "unread_count": 0, "last_message": {"t": 1}}
    after = put(svc, "v1.chats.update", {**update, "conversation_timestamp": TS + 5})
    assert UPDATE_CHANGES["v1.chats.update"] == {
        "unread_count",
        "last_message",
        "conversation_timestamp",
    }
    # conversation_timestamp only moves forward: TS + 5 is older than TS + 10.
    assert without(after) == {**without(chat), "unread_count": 0, "last_message": {"t": 1}}
    assert after["agent_id"] == "ag1"
    assert svc.exhausted() == []


def test_tables_of_the_previous_ddl_get_the_defaults_at_start_up(pipeline: Make, dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_ddl(conn, PREVIOUS_DDL)
        conn.execute(
            "INSERT INTO daisi_acme.chats (chat_id, jid, company_id, agent_id, phone_number)"
            " VALUES ('old', 'j', 'acme', 'ag1', '1')"
        )
    svc = pipeline()
    new = put(svc, "v1.chats.upsert", CHAT_REQUIRED)
    assert {c: new[c] for c in ZERO_VALUES["chats"]} == ZERO_VALUES["chats"]
    agent = put(svc, "v1.connection.update", {"agent_id": "ag1", "status": "open"})
    assert agent["qr_code"] == "" and agent["version"] == ""
    put(svc, "v1.chats.upsert", CHAT_REQUIRED, tenant="globex")  # a tenant created now
    assert column_defaults(dsn, "daisi_acme") == column_defaults(dsn, "daisi_globex")
    # The row written before keeps its NULLs: nothing is backfilled at start-up.
    old = rows(svc, "chats")["old"]
    assert (old["unread_count"], old["is_group"], old["push_name"]) == (None, None, None)
