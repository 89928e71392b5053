"""The WhatsApp handlers (dlqproc.handlers.whatsapp) as pure functions: no servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqproc.handlers import load
from dlqproc.handlers.payloads import (
    EARLIEST_TIMESTAMP,
    EVENT_TYPES,
    LATEST_TIMESTAMP,
    SCHEMA_DIR,
    json_schemas,
    render,
)
from dlqproc.handlers.whatsapp import HANDLERS
from dlqproc.model import Event, HandlerError, Meta, PermanentError, Reason, RowOp

META = Meta(
    stream="wa_events_stream",
    consumer="c",
    stream_seq=7,
    consumer_seq=3,
    msg_id="m-1",
    received_at="2026-11-29T10:00:00+00:00",
)


def event(
    base: str, payload: Any, meta: Meta = META, tenant: str = "acme", not_after: int = 0
) -> Event:
    body = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    return Event(
        subject=f"{base}.{tenant}",
        base=base,
        tenant=tenant,
        payload=body,
        attempt=1,
        meta=meta,
        not_after=not_after,
    )


def handle(base: str, payload: Any, meta: Meta = META, not_after: int = 0) -> list[RowOp]:
    return list(HANDLERS[base](event(base, payload, meta, not_after=not_after)))


def last_metadata(base: str) -> dict[str, Any]:
    return {
        "stream": "wa_events_stream",
        "consumer": "c",
        "stream_seq": 7,
        "consumer_seq": 3,
        "subject": f"{base}.acme",
        "msg_id": "m-1",
        "processed_at": "2026-11-29T10:00:00+00:00",
    }


def permanent(
    base: str, payload: Any, reason: Reason = Reason.VALIDATION, not_after: int = 0
) -> PermanentError:
    with pytest.raises(PermanentError) as info:
        handle(base, payload, not_after=not_after)
    assert info.value.reason is reason, info.value
    return info.value


CHAT = {
    "chat_id": "123@s.whatsapp.net",
    "jid": "123@s.whatsapp.net",
    "company_id": "acme",
    "agent_id": "agent-1",
    "phone_number": "123",
    "push_name": "Ann",
    "is_group": False,
    "last_message": {"text": "hi", "nested": {"n": [1, 2]}},
    "conversation_timestamp": 1764410400,
    "unread_count": 1,
}
# 2025-11-29T10:00:00Z
MESSAGE = {
    "message_id": "MSG1",
    "chat_id": "123@s.whatsapp.net",
    "jid": "123@s.whatsapp.net",
    "flow": "IN",
    "company_id": "acme",
    "agent_id": "agent-1",
    "from_phone": "123",
    "to_phone": "456",
    "message_type": "text",
    "message_text": "hello",
    "key": {"id": "MSG1", "fromMe": False, "remoteJid": "123@s.whatsapp.net"},
    "message_obj": {"conversation": "hello"},
    "status": "delivered",
    "message_timestamp": 1764410400,
    "campaign": {"is_campaign": True, "tags": ["a", "b"], "assigned_to": "bob", "origin": "ads"},
}
CONTACT = {
    "chat_id": "123@s.whatsapp.net",
    "phone_number": "123",
    "company_id": "acme",
    "agent_id": "agent-1",
    "push_name": "Ann",
}
VALID: dict[str, dict[str, Any]] = {
    "v1.chats.upsert": CHAT,
    "v1.chats.update": {
        "chat_id": "123@s.whatsapp.net",
        "company_id": "acme",
        "agent_id": "agent-1",
        "unread_count": 1,
        "conversation_timestamp": 1764410400,
    },
    "v1.history.chats": {"chats": [CHAT, {**CHAT, "chat_id": "c2", "unread_count": 0}]},
    "v1.messages.upsert": MESSAGE,
    "v1.messages.update": {"message_id": "MSG1", "company_id": "acme", "status": "read"},
    "v1.history.messages": {
        "messages": [MESSAGE, {**MESSAGE, "message_id": "MSG2"}],
        "is_last_batch": True,
        "agent_id": "agent-1",
    },
    "v1.contacts.upsert": CONTACT,
    "v1.contacts.update": {
        "phone_number": "123",
        "company_id": "acme",
        "agent_id": "agent-1",
        "push_name": "Annie",
    },
    "v1.history.contacts": {"contacts": [CONTACT]},
    "v1.connection.update": {
        "agent_id": "agent-1",
        "company_id": "acme",
        "status": "open",
        "phone_number": "999",
        "version": "1.2.3",
    },
}
REQUIRED: dict[str, list[str]] = {
    "v1.chats.upsert": ["chat_id", "jid", "agent_id", "phone_number"],
    "v1.chats.update": ["chat_id", "agent_id"],
    "v1.history.chats": ["chats"],
    "v1.messages.upsert": ["message_id", "chat_id", "jid", "flow", "agent_id"],
    "v1.messages.update": ["message_id"],
    "v1.history.messages": ["messages"],
    "v1.contacts.upsert": ["chat_id", "phone_number", "agent_id", "push_name"],
    "v1.contacts.update": ["phone_number", "agent_id"],
    "v1.history.contacts": ["contacts"],
    "v1.connection.update": ["agent_id"],
}

# The table semantics the README documents, written out here independently of
# the handlers so that a change to either fails a test. Per table: the key,
# the columns a repeated upsert overwrites when present, the ones that only move
# forward, the ones only an insert sets, and the columns each update writes.
# last_metadata (and updated_at) are rewritten by every write.
KEYS: dict[str, set[str]] = {
    "chats": {"chat_id"},
    "messages": {"message_id", "message_date"},
    "contacts": {"chat_id"},
    "agents": {"agent_id"},
}
UPSERT_CHANGES: dict[str, set[str]] = {
    "chats": {
        "push_name",
        "custom_name",
        "is_group",
        "group_name",
        "last_message",
        "unread_count",
        "not_spam",
    },
    "messages": {"message_text", "message_type", "message_obj", "campaign"},
    "contacts": {"push_name"},
    "agents": {"qr_code", "status", "agent_name", "host_name", "version", "phone_number"},
}
MONOTONIC: dict[str, set[str]] = {
    "chats": {"conversation_timestamp"},
    "messages": set(),
    "contacts": set(),
    "agents": set(),
}
INSERT_ONLY: dict[str, set[str]] = {
    "chats": {"jid", "company_id", "agent_id", "phone_number"},
    "messages": {
        "chat_id",
        "jid",
        "flow",
        "agent_id",
        "key",
        "from_phone",
        "to_phone",
        "company_id",
        "message_timestamp",
        "status",
        "message_url",
    },
    "contacts": {"phone_number", "agent_id", "company_id"},
    "agents": {"company_id"},
}
UPDATE_CHANGES: dict[str, set[str]] = {
    "v1.chats.update": {"unread_count", "last_message", "conversation_timestamp"},
    "v1.messages.update": {"status", "edited_message_obj", "is_deleted", "message_url"},
    "v1.contacts.update": {"push_name"},
}
# The zero value an insert stores for an absent field; objects stay NULL.
ZERO_VALUES: dict[str, dict[str, Any]] = {
    "chats": {
        "push_name": "",
        "custom_name": "",
        "is_group": False,
        "group_name": "",
        "conversation_timestamp": 0,
        "unread_count": 0,
        "not_spam": False,
        "last_message": None,
    },
    "messages": {
        "from_phone": "",
        "to_phone": "",
        "message_text": "",
        "message_url": "",
        "message_type": "",
        "status": "",
        "is_deleted": False,
        "message_timestamp": 0,
        "key": None,
        "message_obj": None,
        "edited_message_obj": None,
        "campaign": None,
    },
    "contacts": {},
    "agents": {
        "qr_code": "",
        "status": "",
        "agent_name": "",
        "host_name": "",
        "version": "",
        "phone_number": "",
    },
}


def test_registry_covers_every_event_type() -> None:
    assert set(HANDLERS) == set(EVENT_TYPES) == set(VALID) == set(REQUIRED)
    registry = load("dlqproc.handlers.whatsapp")
    assert set(registry.handlers) == set(EVENT_TYPES)
    assert registry.tenant_ddl


# Expected rows, one base at a time ------------------------------------------


def test_chats_upsert() -> None:
    (op,) = handle("v1.chats.upsert", CHAT)
    assert (op.op, op.table, op.key, op.monotonic) == (
        "upsert",
        "chats",
        ("chat_id",),
        ("conversation_timestamp",),
    )
    assert op.values == {
        "chat_id": "123@s.whatsapp.net",
        "jid": "123@s.whatsapp.net",
        "company_id": "acme",
        "agent_id": "agent-1",
        "phone_number": "123",
        "push_name": "Ann",
        "is_group": False,
        "last_message": {"text": "hi", "nested": {"n": [1, 2]}},
        "conversation_timestamp": 1764410400,
        "unread_count": 1,
        "last_metadata": last_metadata("v1.chats.upsert"),
    }
    assert op.partition == ""


def test_unread_count_is_absolute_never_an_increment() -> None:
    for count in (0, 1, 2, 1):
        (op,) = handle("v1.chats.upsert", {**CHAT, "unread_count": count})
        assert op.values["unread_count"] == count
        assert "unread_count" not in op.monotonic
        (op,) = handle("v1.chats.update", {**VALID["v1.chats.update"], "unread_count": count})
        assert op.values["unread_count"] == count
        assert "unread_count" not in op.monotonic


def test_absent_and_null_fields_are_not_written() -> None:
    payload = {k: CHAT[k] for k in ("chat_id", "jid", "agent_id", "phone_number")}
    (op,) = handle("v1.chats.upsert", {**payload, "push_name": None, "unread_count": None})
    assert set(op.values) == {
        "chat_id",
        "jid",
        "agent_id",
        "phone_number",
        "company_id",
        "last_metadata",
    }


def test_chats_update() -> None:
    (op,) = handle("v1.chats.update", VALID["v1.chats.update"])
    assert (op.op, op.table, op.key, op.monotonic) == (
        "update",
        "chats",
        ("chat_id",),
        ("conversation_timestamp",),
    )
    # agent_id is validated, never written: a chat's agent is an identity column.
    assert op.values == {
        "chat_id": "123@s.whatsapp.net",
        "unread_count": 1,
        "conversation_timestamp": 1764410400,
        "last_metadata": last_metadata("v1.chats.update"),
    }
    permanent("v1.chats.update", {"chat_id": "c"})
    permanent(
        "v1.chats.update",
        {**VALID["v1.chats.update"], "company_id": "globex"},
        Reason.INVALID_TENANT,
    )


def test_history_chats() -> None:
    ops = handle("v1.history.chats", VALID["v1.history.chats"])
    assert [(o.op, o.table, o.key, o.values["chat_id"]) for o in ops] == [
        ("upsert", "chats", ("chat_id",), "123@s.whatsapp.net"),
        ("upsert", "chats", ("chat_id",), "c2"),
    ]
    single = handle("v1.chats.upsert", CHAT)[0]
    assert ops[0] == msgspec.structs.replace(
        single, values={**single.values, "last_metadata": last_metadata("v1.history.chats")}
    )
    assert ops[1].values["unread_count"] == 0
    assert all(o.values["last_metadata"]["subject"] == "v1.history.chats.acme" for o in ops)
    assert handle("v1.history.chats", {"chats": []}) == []


def test_messages_upsert() -> None:
    (op,) = handle("v1.messages.upsert", MESSAGE)
    assert (op.op, op.table, op.key, op.partition, op.monotonic) == (
        "upsert",
        "messages",
        ("message_id", "message_date"),
        "2025-11",
        (),
    )
    assert op.values == {
        "message_id": "MSG1",
        "from_phone": "123",
        "to_phone": "456",
        "chat_id": "123@s.whatsapp.net",
        "jid": "123@s.whatsapp.net",
        "message_text": "hello",
        "message_type": "text",
        "company_id": "acme",
        "key": {"id": "MSG1", "fromMe": False, "remoteJid": "123@s.whatsapp.net"},
        "message_obj": {"conversation": "hello"},
        "flow": "IN",
        "agent_id": "agent-1",
        "status": "delivered",
        "message_timestamp": 1764410400,
        "message_date": "2025-11-29",
        "campaign": {
            "is_campaign": True,
            "tags": ["a", "b"],
            "assigned_to": "bob",
            "origin": "ads",
        },
        "last_metadata": last_metadata("v1.messages.upsert"),
    }


@pytest.mark.parametrize(
    ("timestamp", "date"),
    [
        (1230768000, "2009-01-01"),
        (1230854399, "2009-01-01"),
        (1230854400, "2009-01-02"),
        (1767225599, "2025-12-31"),  # 23:59:59Z: the UTC date, whatever the local zone
        (1767225600, "2026-01-01"),
        (253370764799, "9998-12-31"),  # the latest: its partition ends on 9999-01-01
    ],
)
def test_message_date_is_the_utc_date_of_the_timestamp(timestamp: int, date: str) -> None:
    (op,) = handle("v1.messages.upsert", {**MESSAGE, "message_timestamp": timestamp})
    assert op.values["message_date"] == date
    assert op.partition == date[:7]


def test_message_key_keeps_only_sent_fields_in_camel_case() -> None:
    (op,) = handle("v1.messages.upsert", {**MESSAGE, "key": {"id": "K", "fromMe": True}})
    assert op.values["key"] == {"id": "K", "fromMe": True}
    (op,) = handle("v1.messages.upsert", {k: v for k, v in MESSAGE.items() if k != "key"})
    assert "key" not in op.values
    permanent("v1.messages.upsert", {**MESSAGE, "key": {"fromMe": True}})


def test_message_without_timestamp_is_dated_by_the_epoch_on_every_replay() -> None:
    # message_date is part of the key: it must come from the event, never from
    # when it was received, or a replay on another day would add a second row.
    payload = {k: v for k, v in MESSAGE.items() if k != "message_timestamp"}
    late = msgspec.structs.replace(META, received_at="2026-11-30T23:30:00-02:00")
    for meta in (META, late, msgspec.structs.replace(META, received_at="")):
        (op,) = handle("v1.messages.upsert", payload, meta)
        assert (op.values["message_date"], op.partition) == ("1970-01-01", "1970-01")
        assert "message_timestamp" not in op.values


def test_message_upsert_leaves_update_owned_and_identity_columns_alone() -> None:
    (op,) = handle("v1.messages.upsert", MESSAGE)
    assert set(op.insert_only) == INSERT_ONLY["messages"]
    assert {"status", "message_url", "agent_id", "flow", "key"} <= set(op.insert_only)


def test_messages_update() -> None:
    (op,) = handle(
        "v1.messages.update",
        {
            "message_id": "MSG1",
            "status": "read",
            "edited_message_obj": {"text": "edited"},
            "is_deleted": False,
            "message_url": "https://x/y",
        },
    )
    assert (op.op, op.table, op.key) == ("update", "messages", ("message_id",))
    assert op.values == {
        "message_id": "MSG1",
        "status": "read",
        "edited_message_obj": {"text": "edited"},
        "is_deleted": False,
        "message_url": "https://x/y",
        "last_metadata": last_metadata("v1.messages.update"),
    }
    (op,) = handle("v1.messages.update", {"message_id": "MSG1"})
    assert op.values == {
        "message_id": "MSG1",
        "last_metadata": last_metadata("v1.messages.update"),
    }


def test_history_messages_fill_agent_id_from_the_batch() -> None:
    item = {k: v for k, v in MESSAGE.items() if k != "agent_id"}
    ops = handle(
        "v1.history.messages",
        {"messages": [item, {**item, "message_id": "M2", "agent_id": "own"}], "agent_id": "batch"},
    )
    assert [(o.values["message_id"], o.values["agent_id"]) for o in ops] == [
        ("MSG1", "batch"),
        ("M2", "own"),
    ]
    assert all(o.key == ("message_id", "message_date") and o.partition == "2025-11" for o in ops)
    single = handle("v1.messages.upsert", MESSAGE)[0]
    assert ops[0].values | {"agent_id": "agent-1"} == single.values | {
        "last_metadata": last_metadata("v1.history.messages")
    }
    error = permanent("v1.history.messages", {"messages": [item]})
    assert "agent_id" in str(error)


def test_contacts_upsert() -> None:
    (op,) = handle("v1.contacts.upsert", {k: v for k, v in CONTACT.items() if k != "company_id"})
    assert (op.op, op.table, op.key) == ("upsert", "contacts", ("chat_id",))
    assert op.values == {
        "chat_id": "123@s.whatsapp.net",
        "phone_number": "123",
        "company_id": "acme",
        "agent_id": "agent-1",
        "push_name": "Ann",
        "last_metadata": last_metadata("v1.contacts.upsert"),
    }


def test_contacts_update_keeps_push_name() -> None:
    (op,) = handle("v1.contacts.update", VALID["v1.contacts.update"])
    assert (op.op, op.table, op.key) == ("update", "contacts", ("phone_number", "agent_id"))
    assert op.values == {
        "phone_number": "123",
        "agent_id": "agent-1",
        "push_name": "Annie",
        "last_metadata": last_metadata("v1.contacts.update"),
    }


def test_history_contacts() -> None:
    ops = handle("v1.history.contacts", {"contacts": [CONTACT, {**CONTACT, "chat_id": "c2"}]})
    assert [(o.op, o.table, o.key, o.values["chat_id"]) for o in ops] == [
        ("upsert", "contacts", ("chat_id",), "123@s.whatsapp.net"),
        ("upsert", "contacts", ("chat_id",), "c2"),
    ]


def test_connection_update_keeps_phone_number() -> None:
    (op,) = handle("v1.connection.update", VALID["v1.connection.update"])
    assert (op.op, op.table, op.key) == ("upsert", "agents", ("agent_id",))
    assert op.values == {
        "agent_id": "agent-1",
        "company_id": "acme",
        "status": "open",
        "version": "1.2.3",
        "phone_number": "999",
        "last_metadata": last_metadata("v1.connection.update"),
    }


# Validation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "field"), [(b, f) for b, fields in REQUIRED.items() for f in fields]
)
def test_missing_required_field_is_permanent(base: str, field: str) -> None:
    payload = {k: v for k, v in VALID[base].items() if k != field}
    assert field in str(permanent(base, payload))
    assert field in str(permanent(base, {**VALID[base], field: None}))


@pytest.mark.parametrize(
    ("base", "field"),
    [
        ("v1.history.chats", "chat_id"),
        ("v1.history.messages", "message_id"),
        ("v1.history.contacts", "push_name"),
    ],
)
def test_missing_required_field_of_a_history_item_is_permanent(base: str, field: str) -> None:
    items_field = REQUIRED[base][0]
    items = VALID[base][items_field]
    bad = [items[0], {k: v for k, v in items[-1].items() if k != field}]
    permanent(base, {**VALID[base], items_field: bad})


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ("v1.chats.upsert", {"conversation_timestamp": -1}),
        ("v1.chats.upsert", {"unread_count": -1}),
        ("v1.chats.upsert", {"unread_count": "3"}),
        ("v1.chats.upsert", {"unread_count": 1.5}),
        ("v1.chats.upsert", {"chat_id": "x" * 300}),
        ("v1.chats.upsert", {"chat_id": ""}),
        ("v1.chats.upsert", {"chat_id": 123}),
        ("v1.chats.upsert", {"last_message": "text"}),
        ("v1.chats.upsert", {"is_group": "yes"}),
        ("v1.chats.update", {"conversation_timestamp": -5}),
        ("v1.chats.update", {"conversation_timestamp": 2**64}),
        ("v1.messages.upsert", {"flow": "SIDEWAYS"}),
        ("v1.messages.upsert", {"flow": "in"}),
        ("v1.messages.upsert", {"message_timestamp": -1}),
        ("v1.messages.upsert", {"message_timestamp": 253402300800}),  # year 10000
        ("v1.messages.upsert", {"message_timestamp": 253402300799}),  # December 9999
        ("v1.messages.upsert", {"message_timestamp": 1764410400000}),  # milliseconds
        ("v1.messages.upsert", {"message_timestamp": 1}),  # before 2009
        ("v1.chats.upsert", {"conversation_timestamp": 1764410400000}),
        ("v1.messages.upsert", {"message_text": "x" * 65537}),
        ("v1.messages.upsert", {"key": {"id": ""}}),
        ("v1.messages.upsert", {"key": "MSG1"}),
        ("v1.messages.upsert", {"campaign": {"tags": "a"}}),
        ("v1.messages.upsert", {"campaign": {"tags": ["x" * 257]}}),
        ("v1.messages.upsert", {"message_obj": [1]}),
        ("v1.messages.update", {"is_deleted": 1}),
        ("v1.contacts.upsert", {"push_name": "p" * 257}),
        ("v1.contacts.update", {"agent_id": ["a"]}),
        ("v1.connection.update", {"qr_code": "q" * 65537}),
        ("v1.connection.update", {"company_id": "a" * 257}),
        ("v1.history.messages", {"agent_id": ""}),
        ("v1.history.chats", {"chats": {"chat_id": "x"}}),
    ],
)
def test_wrong_type_or_out_of_bounds_is_permanent(base: str, change: dict[str, Any]) -> None:
    permanent(base, {**VALID[base], **change})


def test_history_lists_are_bounded() -> None:
    permanent("v1.history.contacts", {"contacts": [CONTACT] * 5001})
    assert len(handle("v1.history.contacts", {"contacts": [CONTACT] * 5000})) == 5000


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b"null", b'"x"', b"{", b"\xff\xfe"])
@pytest.mark.parametrize("base", sorted(EVENT_TYPES))
def test_not_an_object_is_permanent(base: str, body: bytes) -> None:
    permanent(base, body)


def test_unknown_fields_are_ignored() -> None:
    for base, payload in VALID.items():
        assert handle(base, {**payload, "added_by_producer": {"x": 1}}) == handle(base, payload)


# Timestamps -----------------------------------------------------------------

# (base, timestamp field, the history list holding it or "")
TIMESTAMPED = [
    ("v1.chats.upsert", "conversation_timestamp", ""),
    ("v1.chats.update", "conversation_timestamp", ""),
    ("v1.history.chats", "conversation_timestamp", "chats"),
    ("v1.messages.upsert", "message_timestamp", ""),
    ("v1.history.messages", "message_timestamp", "messages"),
]
NOW = 1764410400  # the fixtures' timestamps; not_after is a week later
WEEK = NOW + 7 * 86400


def with_timestamp(
    base: str, field: str, items: str, value: int, every_item: bool = False
) -> dict[str, Any]:
    """VALID[base] with `field` set to `value`: in a history batch's second item (or all)."""
    if not items:
        return {**VALID[base], field: value}
    first, second = VALID[base][items][:2]
    first = {**first, field: value} if every_item else first
    return {**VALID[base], items: [first, {**second, field: value}]}


def written(field: str, ops: list[RowOp]) -> list[Any]:
    return [op.values.get(field) for op in ops]


def test_every_timestamp_field_is_covered() -> None:
    fields = {"conversation_timestamp", "message_timestamp"}
    schemas = json.dumps(json_schemas())
    # 0 (unset) or 2009..: the type says 0..9998, the handlers refuse 1..2008.
    assert schemas.count(f'"maximum": {LATEST_TIMESTAMP}') == len(TIMESTAMPED)
    for base, field, items in TIMESTAMPED:
        assert field in fields
        assert field in json.dumps(VALID[base])
        assert not items or items in VALID[base]


@pytest.mark.parametrize(("base", "field", "items"), TIMESTAMPED)
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (EARLIEST_TIMESTAMP, True),  # 2009-01-01T00:00:00Z
        (EARLIEST_TIMESTAMP - 1, False),
        (1, False),
        (0, True),  # unset, as Go producers send it
        (-1, False),
        (LATEST_TIMESTAMP, True),  # 9998-12-31T23:59:59Z
        (LATEST_TIMESTAMP + 1, False),
        (253402300799, False),  # 9999-12-31T23:59:59Z: its next month is year 10000
        (1764400000000, False),  # milliseconds
        (2**63, False),
    ],
)
def test_timestamp_type_bounds(base: str, field: str, items: str, value: int, ok: bool) -> None:
    payload = with_timestamp(base, field, items, value)
    if ok:
        ops = handle(base, payload)  # not_after 0: no moving bound
        assert written(field, ops)[-1] == value
    else:
        error = str(permanent(base, payload))
        assert field in error
        assert not items or f"{items}[1]" in error


@pytest.mark.parametrize(("base", "field", "items"), TIMESTAMPED)
def test_timestamp_past_not_after_is_permanent_validation(
    base: str, field: str, items: str
) -> None:
    ops = handle(base, with_timestamp(base, field, items, WEEK), not_after=WEEK)
    assert written(field, ops)[-1] == WEEK  # at the bound: accepted
    error = str(permanent(base, with_timestamp(base, field, items, WEEK + 1), not_after=WEEK))
    assert field in error
    assert f"{WEEK + 1}" in error and f"{WEEK}" in error
    assert not items or f"{items}[1]" in error
    # The hard bound still applies when the moving one is further away.
    permanent(base, with_timestamp(base, field, items, LATEST_TIMESTAMP + 1), not_after=2**62)


@pytest.mark.parametrize(("base", "field", "items"), TIMESTAMPED)
def test_absent_timestamp_is_never_past_not_after(base: str, field: str, items: str) -> None:
    payload = with_timestamp(base, field, items, NOW)
    if items:
        payload[items] = [{k: v for k, v in i.items() if k != field} for i in payload[items]]
    else:
        del payload[field]
    assert handle(base, payload, not_after=EARLIEST_TIMESTAMP)


def test_message_without_timestamp_keeps_the_epoch_date_under_a_horizon() -> None:
    payload = {k: v for k, v in MESSAGE.items() if k != "message_timestamp"}
    (op,) = handle("v1.messages.upsert", payload, not_after=WEEK)
    assert (op.values["message_date"], op.partition) == ("1970-01-01", "1970-01")


@settings(max_examples=300)
@given(
    case=st.sampled_from(TIMESTAMPED),
    value=st.integers(min_value=-(2**40), max_value=2**40)
    | st.sampled_from([EARLIEST_TIMESTAMP, LATEST_TIMESTAMP, NOW, WEEK]).flatmap(
        lambda t: st.integers(t - 2, t + 2)
    ),
    not_after=st.just(0) | st.integers(min_value=EARLIEST_TIMESTAMP, max_value=2**40),
)
def test_a_timestamp_is_accepted_exactly_within_its_bounds(
    case: tuple[str, str, str], value: int, not_after: int
) -> None:
    base, field, items = case
    within = value == 0 or (
        EARLIEST_TIMESTAMP <= value <= LATEST_TIMESTAMP and (not not_after or value <= not_after)
    )
    try:
        payload = with_timestamp(base, field, items, value, every_item=True)
        ops = handle(base, payload, not_after=not_after)
    except PermanentError as exc:
        assert not within
        assert exc.reason is Reason.VALIDATION and field in str(exc)
    else:
        assert within
        for op in ops:
            if op.partition:  # its month and the next one are dates storage can hold
                year, month = map(int, op.partition.split("-"))
                assert (year, month) == (1970, 1) if value == 0 else 2009 <= year <= 9998
                assert 1 <= month <= 12


# Tenants --------------------------------------------------------------------


@pytest.mark.parametrize("base", sorted(EVENT_TYPES))
def test_company_id_mismatch_is_invalid_tenant(base: str) -> None:
    payload = VALID[base]
    if base.startswith("v1.history."):
        items_field = REQUIRED[base][0]
        items = payload[items_field]
        payload = {**payload, items_field: [items[0], {**items[-1], "company_id": "other"}]}
    else:
        payload = {**payload, "company_id": "other"}
    error = permanent(base, payload, Reason.INVALID_TENANT)
    assert "other" in str(error)
    # Tenant ids are case-sensitive, like subjects.
    if not base.startswith("v1.history."):
        permanent(base, {**payload, "company_id": "ACME"}, Reason.INVALID_TENANT)


def strip_company(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_company(v) for k, v in value.items() if k != "company_id"}
    if isinstance(value, list):
        return [strip_company(v) for v in value]
    return value


@pytest.mark.parametrize("base", sorted(EVENT_TYPES))
def test_absent_company_id_is_taken_from_the_subject(base: str) -> None:
    payload = strip_company(VALID[base])
    assert "company_id" not in json.dumps(payload)
    ops = handle(base, payload)
    assert ops
    assert ops == handle(base, VALID[base])
    for op in ops:
        if "company_id" in op.values:
            assert op.values["company_id"] == "acme"
    ops = list(HANDLERS[base](event(base, payload, tenant="globex")))
    assert all(op.values.get("company_id", "globex") == "globex" for op in ops)


def test_every_upsert_writes_company_id() -> None:
    for base, payload in VALID.items():
        for op in handle(base, strip_company(payload)):
            if op.op == "upsert":
                assert op.values["company_id"] == "acme"


# Idempotency: a pure function of the event ------------------------------------


def test_same_event_same_rows() -> None:
    for base, payload in VALID.items():
        ev = event(base, payload)
        assert HANDLERS[base](ev) == HANDLERS[base](ev)
        for op in HANDLERS[base](ev):
            assert all(k in op.values for k in op.key)
            assert set(op.monotonic) <= {"conversation_timestamp"}


# Table semantics: what a repeated upsert and an update may change --------------

# Every field each event can carry, all present.
FULL_UPSERTS: dict[str, tuple[str, dict[str, Any]]] = {
    "v1.chats.upsert": (
        "chats",
        {**CHAT, "custom_name": "C", "group_name": "G", "not_spam": True},
    ),
    "v1.messages.upsert": ("messages", {**MESSAGE, "message_url": "https://x/y"}),
    "v1.contacts.upsert": ("contacts", CONTACT),
    "v1.connection.update": (
        "agents",
        {**VALID["v1.connection.update"], "qr_code": "q", "agent_name": "n", "host_name": "h"},
    ),
}
FULL_UPDATES: dict[str, dict[str, Any]] = {
    "v1.chats.update": {**VALID["v1.chats.update"], "last_message": {"text": "x"}},
    "v1.messages.update": {
        **VALID["v1.messages.update"],
        "edited_message_obj": {"text": "y"},
        "is_deleted": True,
        "message_url": "https://x/z",
    },
    "v1.contacts.update": VALID["v1.contacts.update"],
}


def partial(data: st.DataObject, base: str, full: dict[str, Any]) -> dict[str, Any]:
    """`full` without some optional fields, and with some others null (absent too)."""
    optional = sorted(set(full) - set(REQUIRED[base]))
    absent = data.draw(st.sets(st.sampled_from(optional)), label="absent")
    nulls = data.draw(st.sets(st.sampled_from(optional)), label="null")
    return {k: None if k in nulls else v for k, v in full.items() if k not in absent}


def sent(payload: dict[str, Any]) -> set[str]:
    return {k for k, v in payload.items() if v is not None}


def test_the_documented_column_sets_do_not_overlap() -> None:
    for table in KEYS:
        sets = [KEYS[table], UPSERT_CHANGES[table], MONOTONIC[table], INSERT_ONLY[table]]
        assert sum(map(len, sets)) == len(set().union(*sets)), table


@given(data=st.data())
def test_an_upsert_changes_on_conflict_exactly_the_documented_columns_it_carries(
    data: st.DataObject,
) -> None:
    base = data.draw(st.sampled_from(sorted(FULL_UPSERTS)), label="base")
    table, full = FULL_UPSERTS[base]
    payload = partial(data, base, full)
    (op,) = handle(base, payload)
    carried = sent(payload) | {"company_id"}  # filled from the subject when absent
    assert (op.op, op.table) == ("upsert", table)
    assert set(op.key) == KEYS[table]
    assert set(op.insert_only) == INSERT_ONLY[table]
    assert set(op.monotonic) == MONOTONIC[table]
    # Absent fields are not written at all: the insert takes the column default,
    # a conflict keeps the stored value.
    assert set(op.values) - {"last_metadata", "message_date"} == carried
    overwritten = set(op.values) - set(op.key) - set(op.insert_only)
    assert overwritten == carried & (UPSERT_CHANGES[table] | MONOTONIC[table]) | {"last_metadata"}


@given(data=st.data())
def test_an_update_writes_only_the_documented_columns_it_carries(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(sorted(FULL_UPDATES)), label="base")
    payload = partial(data, base, FULL_UPDATES[base])
    (op,) = handle(base, payload)
    assert op.op == "update"
    assert set(op.values) - set(op.key) == sent(payload) & UPDATE_CHANGES[base] | {"last_metadata"}


def test_history_items_follow_the_single_upserts_rules() -> None:
    for base, items, single in (
        ("v1.history.chats", "chats", "v1.chats.upsert"),
        ("v1.history.messages", "messages", "v1.messages.upsert"),
        ("v1.history.contacts", "contacts", "v1.contacts.upsert"),
    ):
        (one,) = handle(single, FULL_UPSERTS[single][1])
        (op,) = handle(base, {items: [FULL_UPSERTS[single][1]]})
        assert (op.key, op.insert_only, op.monotonic) == (one.key, one.insert_only, one.monotonic)


# Properties -----------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def field_names() -> st.SearchStrategy[str]:
    names = {f for p in VALID.values() for f in p} | {"fromMe", "remoteJid", "id", "tags"}
    return st.sampled_from(sorted(names))


def check(base: str, body: bytes) -> None:
    try:
        ops = HANDLERS[base](event(base, body))
    except HandlerError as exc:
        assert isinstance(exc, PermanentError)  # these handlers have no transient failure
        assert exc.reason in (Reason.VALIDATION, Reason.INVALID_TENANT)
        return
    for op in ops:
        assert isinstance(op, RowOp)
        assert all(k in op.values and op.values[k] is not None for k in op.key)
        msgspec.json.encode(op.values)  # storable as jsonb/columns


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(EVENT_TYPES)), payload=json_values)
def test_arbitrary_json_only_fails_as_handler_errors(base: str, payload: Any) -> None:
    check(base, msgspec.json.encode(payload))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(sorted(EVENT_TYPES)),
    changes=st.dictionaries(field_names(), json_values | st.just(None), max_size=4),
    drop=st.sets(field_names(), max_size=3),
    item_changes=st.dictionaries(field_names(), json_values, max_size=3),
)
def test_mutated_valid_payloads_only_fail_as_handler_errors(
    base: str, changes: dict[str, Any], drop: set[str], item_changes: dict[str, Any]
) -> None:
    payload = {k: v for k, v in {**VALID[base], **changes}.items() if k not in drop}
    for items_field in ("chats", "messages", "contacts"):
        items = payload.get(items_field)
        if isinstance(items, list) and items and isinstance(items[0], dict):
            payload[items_field] = [{**items[0], **item_changes}, *items[1:]]
    check(base, msgspec.json.encode(payload))


@settings(max_examples=300)
@given(base=st.sampled_from(sorted(EVENT_TYPES)), body=st.binary(max_size=200))
def test_arbitrary_bytes_only_fail_as_handler_errors(base: str, body: bytes) -> None:
    check(base, body)


# Schemas ----------------------------------------------------------------------


def test_committed_json_schemas_match_the_payload_types() -> None:
    """Regenerate with `python -m dlqproc.handlers.payloads` when this fails."""
    schemas = json_schemas()
    assert set(schemas) == set(EVENT_TYPES)
    committed = {p.name.removesuffix(".json") for p in SCHEMA_DIR.glob("*.json")}
    assert committed == set(schemas)
    for base, schema in schemas.items():
        text = (SCHEMA_DIR / f"{base}.json").read_text(encoding="utf-8")
        assert json.loads(text) == schema, base
        assert text == render(schema), base


def test_schema_dir_is_the_repository_one() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert repo / "schema" / "events" == SCHEMA_DIR
