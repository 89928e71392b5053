"""The WhatsApp event payloads, one per subject base of topology, as msgspec Structs.

One frozen Struct per subject base. Required fields (sent by every producer) have
no default; every other field defaults to None, which the handlers read as
"absent". `company_id` is optional everywhere: when absent it is taken from the
subject's tenant. Unknown fields are ignored (producers may add fields).

Bounds are part of the types (msgspec.Meta), so decoding is validation and the
JSON Schemas under schema/events/ say the same thing. Regenerate them with

    python -m dlqproc.handlers.payloads

Timestamps (`conversation_timestamp`, `message_timestamp`) are unix seconds:
0 (unset: Go producers send zero values) or within [2009-01-01T00:00:00Z,
9998-12-31T23:59:59Z] = [1230768000, 253370764799]. Nothing WhatsApp sent
predates 2009, and the upper bound keeps the month after a message's month (its
partition's end) within year 9999, so a millisecond timestamp fails here
instead of in storage. The types bound 0..9998; the handlers refuse 1..2008 and
anything later than the worker's clock plus a horizon (Event.not_after), which
no static schema can say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

# Identifiers, phones, jids, names and other short strings.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Short = Annotated[str, msgspec.Meta(max_length=256)]
# Message text, QR codes, URLs.
Text = Annotated[str, msgspec.Meta(max_length=65536)]
# Unix seconds, bounds as in the module docstring.
EARLIEST_TIMESTAMP = 1230768000  # 2009-01-01T00:00:00Z
LATEST_TIMESTAMP = 253370764799  # 9998-12-31T23:59:59Z
Timestamp = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=LATEST_TIMESTAMP,
        description="Unix seconds: 0 (unset, as the old service's producers send it)"
        " or from 2009-01-01T00:00:00Z to a horizon (default 7 days) after the time"
        " the event is processed",
    ),
]
# message_timestamp also decides the row's message_date and monthly partition.
MessageTimestamp = Timestamp
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Flow = Literal["IN", "OUT"]
Tags = Annotated[list[Short], msgspec.Meta(max_length=1000)]

HISTORY_MAX = 5000


class _Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=False, kw_only=True):
    """Base of every payload: frozen, tolerant of unknown fields, keyword-only."""


class MessageKey(_Payload, frozen=True, omit_defaults=True):
    """WhatsApp message key; JSON names are camelCase."""

    id: Id
    from_me: bool | None = msgspec.field(default=None, name="fromMe")
    remote_jid: Short | None = msgspec.field(default=None, name="remoteJid")


class Campaign(_Payload, frozen=True, omit_defaults=True):
    is_campaign: bool | None = None
    tags: Tags | None = None
    assigned_to: Short | None = None
    origin: Short | None = None


class ChatUpsert(_Payload, frozen=True):
    chat_id: Id
    jid: Short
    agent_id: Id
    phone_number: Short
    company_id: Short | None = None
    push_name: Short | None = None
    custom_name: Short | None = None
    is_group: bool | None = None
    group_name: Short | None = None
    last_message: dict[str, Any] | None = None
    conversation_timestamp: Timestamp | None = None
    unread_count: Count | None = None
    not_spam: bool | None = None


class ChatUpdate(_Payload, frozen=True):
    chat_id: Id
    agent_id: Id
    company_id: Short | None = None
    unread_count: Count | None = None
    last_message: dict[str, Any] | None = None
    conversation_timestamp: Timestamp | None = None


class HistoryChats(_Payload, frozen=True):
    chats: Annotated[list[ChatUpsert], msgspec.Meta(max_length=HISTORY_MAX)]


class _MessageFields(_Payload, frozen=True):
    """messages.upsert without agent_id (whose requiredness differs in history)."""

    message_id: Id
    chat_id: Id
    jid: Short
    flow: Flow
    company_id: Short | None = None
    to_phone: Short | None = None
    from_phone: Short | None = None
    message_type: Short | None = None
    message_text: Text | None = None
    message_url: Text | None = None
    key: MessageKey | None = None
    message_obj: dict[str, Any] | None = None
    status: Short | None = None
    message_timestamp: MessageTimestamp | None = None
    campaign: Campaign | None = None


class MessageUpsert(_MessageFields, frozen=True, kw_only=True):
    agent_id: Id


class HistoryMessage(_MessageFields, frozen=True):
    """An item of history.messages: agent_id may come from the batch instead."""

    agent_id: Id | None = None


class MessageUpdate(_Payload, frozen=True):
    message_id: Id
    company_id: Short | None = None
    status: Short | None = None
    edited_message_obj: dict[str, Any] | None = None
    is_deleted: bool | None = None
    message_url: Text | None = None


class HistoryMessages(_Payload, frozen=True):
    messages: Annotated[list[HistoryMessage], msgspec.Meta(max_length=HISTORY_MAX)]
    is_last_batch: bool | None = None
    agent_id: Id | None = None


class ContactUpsert(_Payload, frozen=True):
    chat_id: Id
    phone_number: Short
    agent_id: Id
    push_name: Short
    company_id: Short | None = None


class ContactUpdate(_Payload, frozen=True):
    phone_number: Short
    agent_id: Id
    company_id: Short | None = None
    push_name: Short | None = None


class HistoryContacts(_Payload, frozen=True):
    contacts: Annotated[list[ContactUpsert], msgspec.Meta(max_length=HISTORY_MAX)]


class ConnectionUpdate(_Payload, frozen=True):
    agent_id: Id
    company_id: Short | None = None
    qr_code: Text | None = None
    status: Short | None = None
    agent_name: Short | None = None
    host_name: Short | None = None
    version: Short | None = None
    phone_number: Short | None = None


EVENT_TYPES: dict[str, type[msgspec.Struct]] = {
    "v1.chats.upsert": ChatUpsert,
    "v1.chats.update": ChatUpdate,
    "v1.history.chats": HistoryChats,
    "v1.messages.upsert": MessageUpsert,
    "v1.messages.update": MessageUpdate,
    "v1.history.messages": HistoryMessages,
    "v1.contacts.upsert": ContactUpsert,
    "v1.contacts.update": ContactUpdate,
    "v1.history.contacts": HistoryContacts,
    "v1.connection.update": ConnectionUpdate,
}

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema" / "events"


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of each event payload, by subject base."""
    return {base: msgspec.json.schema(t) for base, t in EVENT_TYPES.items()}


def render(schema: dict[str, Any]) -> str:
    """The committed form of a schema file: pretty, sorted keys, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for base, schema in json_schemas().items():
        path = directory / f"{base}.json"
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_schemas():
        print(p)
