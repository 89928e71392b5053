"""Handler registry for the WhatsApp events domain (topology.REALTIME_BASES, HISTORY_BASES).

Each handler decodes and validates its payload (dlqproc.handlers.payloads) and
returns the rows to write into the tenant's schema. Every RowOp is idempotent:
upserts are keyed on the event's identity and set absolute values (never
increments; `unread_count` is an absolute count), updates set absolute values,
and timestamps that only move forward are `monotonic`. Fields absent from a
payload (or null) are not written, so a partial event never clears a column.

Failures:
- a payload that does not decode or breaks a bound: PermanentError(VALIDATION);
- a timestamp before 2009 (other than 0, unset) or later than `event.not_after`
  (the worker's clock plus a horizon): PermanentError(VALIDATION) naming the
  field, the history item, value and bound;
- a `company_id` that differs from the subject's tenant: PermanentError(INVALID_TENANT).

Timestamps are unix seconds from 2009-01-01T00:00:00Z (1230768000) to the
earlier of `event.not_after` and 9998-12-31T23:59:59Z (see payloads), or 0.
messages.upsert without `message_timestamp` (or with 0) is dated 1970-01-01: `message_date`
is part of the row's key, so it must come from the event itself for a replay to
land on the same row.

What a repeated upsert may change (README, "Table semantics"):
- identity columns (whose the row is and what it is about: agent, chat, jid,
  phones, flow, key, a message's timestamp) are written only when the row is
  inserted, as the old service did; a replay, a correction or another agent's
  history never moves a row. Updates never write them either;
- the columns a messages.update owns (status, message_url) are written by an
  upsert only when it inserts the row, so a replayed upsert cannot undo a
  later update;
- every other column present in the event is overwritten (a correction wins).

Absent fields get the old service's zero values ('', 0, false) from column
defaults when a row is inserted (Go producers omit zero values); objects stay
NULL, as a Go nil map did. ZERO_DEFAULTS lists them; TENANT_DDL creates them on
new tables and adds them to tables an earlier version created.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from dlqproc.handlers.payloads import (
    EARLIEST_TIMESTAMP,
    ChatUpdate,
    ChatUpsert,
    ConnectionUpdate,
    ContactUpdate,
    ContactUpsert,
    HistoryChats,
    HistoryContacts,
    HistoryMessage,
    HistoryMessages,
    MessageUpdate,
    MessageUpsert,
)
from dlqproc.model import Event, PermanentError, Reason, RowOp

T = TypeVar("T")

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _decoder(t: type[T]) -> msgspec.json.Decoder[T]:
    dec = _DECODERS.get(t)
    if dec is None:
        dec = _DECODERS[t] = msgspec.json.Decoder(t)
    return dec


def _decode(event: Event, t: type[T]) -> T:
    try:
        return _decoder(t).decode(event.payload)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise PermanentError(f"invalid {event.base} payload: {exc}", Reason.VALIDATION) from None


def _not_after(event: Event, field: str, value: int | None, where: str = "") -> None:
    """Refuse a timestamp outside [2009, now + horizon]; 0 means unset."""
    if not value:
        return
    if value < EARLIEST_TIMESTAMP:
        raise PermanentError(
            f"invalid {event.base} payload{where}: {field} {value} is before"
            f" {EARLIEST_TIMESTAMP} (2009-01-01)",
            Reason.VALIDATION,
        )
    if event.not_after and value > event.not_after:
        raise PermanentError(
            f"invalid {event.base} payload{where}: {field} {value} is later than"
            f" {event.not_after} (now + horizon)",
            Reason.VALIDATION,
        )


def _company(event: Event, company_id: str | None, where: str = "") -> str:
    """The payload's company_id checked against the subject's tenant, or the tenant."""
    if company_id is None:
        return event.tenant
    if company_id != event.tenant:
        raise PermanentError(
            f"{event.base}{where}: company_id {company_id[:64]!r} does not match"
            f" subject tenant {event.tenant!r}",
            Reason.INVALID_TENANT,
        )
    return company_id


def last_metadata(event: Event) -> dict[str, Any]:
    m = event.meta
    return {
        "stream": m.stream,
        "consumer": m.consumer,
        "stream_seq": m.stream_seq,
        "consumer_seq": m.consumer_seq,
        "subject": event.subject,
        "msg_id": m.msg_id,
        "processed_at": m.received_at,
    }


def _present(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries whose value is not None (None means absent from the payload)."""
    return {k: v for k, v in values.items() if v is not None}


# Identity columns per table: set when a row is inserted, never changed by a
# later upsert or update (see the module docstring). A message's status and
# message_url belong to messages.update once the row exists.
CHAT_IDENTITY = ("jid", "company_id", "agent_id", "phone_number")
MESSAGE_IDENTITY = (
    "chat_id",
    "jid",
    "flow",
    "agent_id",
    "key",
    "from_phone",
    "to_phone",
    "company_id",
    "message_timestamp",
)
MESSAGE_UPDATE_OWNED = ("status", "message_url")
CONTACT_IDENTITY = ("phone_number", "agent_id", "company_id")
AGENT_IDENTITY = ("company_id",)


# chats ---------------------------------------------------------------------


def _chat_upsert(event: Event, chat: ChatUpsert, meta: dict[str, Any], where: str = "") -> RowOp:
    _not_after(event, "conversation_timestamp", chat.conversation_timestamp, where)
    values = _present(
        {
            "chat_id": chat.chat_id,
            "jid": chat.jid,
            "company_id": _company(event, chat.company_id, where),
            "agent_id": chat.agent_id,
            "phone_number": chat.phone_number,
            "push_name": chat.push_name,
            "custom_name": chat.custom_name,
            "is_group": chat.is_group,
            "group_name": chat.group_name,
            "last_message": chat.last_message,
            "conversation_timestamp": chat.conversation_timestamp,
            # Absolute: the old service's "1 means increment" is not repeated.
            "unread_count": chat.unread_count,
            "not_spam": chat.not_spam,
        }
    )
    values["last_metadata"] = meta
    return RowOp(
        op="upsert",
        table="chats",
        key=("chat_id",),
        values=values,
        monotonic=("conversation_timestamp",),
        insert_only=CHAT_IDENTITY,
    )


def handle_chats_upsert(event: Event) -> Sequence[RowOp]:
    return (_chat_upsert(event, _decode(event, ChatUpsert), last_metadata(event)),)


def handle_chats_update(event: Event) -> Sequence[RowOp]:
    chat = _decode(event, ChatUpdate)
    _not_after(event, "conversation_timestamp", chat.conversation_timestamp)
    _company(event, chat.company_id)
    # agent_id is required and validated, never written: the chat's agent is
    # an identity column (as the old service had it).
    values = _present(
        {
            "chat_id": chat.chat_id,
            "unread_count": chat.unread_count,
            "last_message": chat.last_message,
            "conversation_timestamp": chat.conversation_timestamp,
        }
    )
    values["last_metadata"] = last_metadata(event)
    return (
        RowOp(
            op="update",
            table="chats",
            key=("chat_id",),
            values=values,
            monotonic=("conversation_timestamp",),
        ),
    )


def handle_history_chats(event: Event) -> Sequence[RowOp]:
    batch = _decode(event, HistoryChats)
    meta = last_metadata(event)
    return tuple(
        _chat_upsert(event, chat, meta, f" chats[{i}]") for i, chat in enumerate(batch.chats)
    )


# messages ------------------------------------------------------------------

_EPOCH = dt.date(1970, 1, 1)


def _message_date(timestamp: int | None) -> dt.date:
    # Bounded by the payload type to dates up to 9998-12-31, so the store's
    # partition bound (the first day of the next month) exists too.
    return _EPOCH + dt.timedelta(days=(timestamp or 0) // 86400)


def _message_upsert(
    event: Event,
    msg: MessageUpsert | HistoryMessage,
    agent_id: str,
    meta: dict[str, Any],
    where: str = "",
) -> RowOp:
    _not_after(event, "message_timestamp", msg.message_timestamp, where)
    date = _message_date(msg.message_timestamp)
    values = _present(
        {
            "message_id": msg.message_id,
            "from_phone": msg.from_phone,
            "to_phone": msg.to_phone,
            "chat_id": msg.chat_id,
            "jid": msg.jid,
            "message_text": msg.message_text,
            "message_url": msg.message_url,
            "message_type": msg.message_type,
            "company_id": _company(event, msg.company_id, where),
            # Builtins keep the wire's camelCase names (fromMe, remoteJid).
            "key": None if msg.key is None else msgspec.to_builtins(msg.key),
            "message_obj": msg.message_obj,
            "flow": msg.flow,
            "agent_id": agent_id,
            "status": msg.status,
            "message_timestamp": msg.message_timestamp,
            "message_date": date.isoformat(),
            "campaign": None if msg.campaign is None else msgspec.to_builtins(msg.campaign),
        }
    )
    values["last_metadata"] = meta
    return RowOp(
        op="upsert",
        table="messages",
        key=("message_id", "message_date"),
        values=values,
        insert_only=MESSAGE_IDENTITY + MESSAGE_UPDATE_OWNED,
        partition=f"{date.year:04d}-{date.month:02d}",
    )


def handle_messages_upsert(event: Event) -> Sequence[RowOp]:
    msg = _decode(event, MessageUpsert)
    return (_message_upsert(event, msg, msg.agent_id, last_metadata(event)),)


def handle_messages_update(event: Event) -> Sequence[RowOp]:
    msg = _decode(event, MessageUpdate)
    _company(event, msg.company_id)
    values = _present(
        {
            "message_id": msg.message_id,
            "status": msg.status,
            "edited_message_obj": msg.edited_message_obj,
            "is_deleted": msg.is_deleted,
            "message_url": msg.message_url,
        }
    )
    values["last_metadata"] = last_metadata(event)
    return (RowOp(op="update", table="messages", key=("message_id",), values=values),)


def handle_history_messages(event: Event) -> Sequence[RowOp]:
    batch = _decode(event, HistoryMessages)
    meta = last_metadata(event)
    rows = []
    for i, msg in enumerate(batch.messages):
        where = f" messages[{i}]"
        agent_id = msg.agent_id if msg.agent_id is not None else batch.agent_id
        if agent_id is None:
            raise PermanentError(
                f"invalid {event.base} payload: {where.strip()} has no agent_id"
                " and the batch has none",
                Reason.VALIDATION,
            )
        rows.append(_message_upsert(event, msg, agent_id, meta, where))
    return tuple(rows)


# contacts ------------------------------------------------------------------


def _contact_upsert(
    event: Event, contact: ContactUpsert, meta: dict[str, Any], where: str = ""
) -> RowOp:
    return RowOp(
        op="upsert",
        table="contacts",
        key=("chat_id",),
        values={
            "chat_id": contact.chat_id,
            "phone_number": contact.phone_number,
            "company_id": _company(event, contact.company_id, where),
            "agent_id": contact.agent_id,
            "push_name": contact.push_name,
            "last_metadata": meta,
        },
        insert_only=CONTACT_IDENTITY,
    )


def handle_contacts_upsert(event: Event) -> Sequence[RowOp]:
    return (_contact_upsert(event, _decode(event, ContactUpsert), last_metadata(event)),)


def handle_contacts_update(event: Event) -> Sequence[RowOp]:
    contact = _decode(event, ContactUpdate)
    _company(event, contact.company_id)
    # The old service dropped push_name here; it is the point of the event.
    values = _present(
        {
            "phone_number": contact.phone_number,
            "agent_id": contact.agent_id,
            "push_name": contact.push_name,
        }
    )
    values["last_metadata"] = last_metadata(event)
    return (RowOp(op="update", table="contacts", key=("phone_number", "agent_id"), values=values),)


def handle_history_contacts(event: Event) -> Sequence[RowOp]:
    batch = _decode(event, HistoryContacts)
    meta = last_metadata(event)
    return tuple(
        _contact_upsert(event, c, meta, f" contacts[{i}]") for i, c in enumerate(batch.contacts)
    )


# agents --------------------------------------------------------------------


def handle_connection_update(event: Event) -> Sequence[RowOp]:
    conn = _decode(event, ConnectionUpdate)
    values = _present(
        {
            "agent_id": conn.agent_id,
            "company_id": _company(event, conn.company_id),
            "qr_code": conn.qr_code,
            "status": conn.status,
            "agent_name": conn.agent_name,
            "host_name": conn.host_name,
            "version": conn.version,
            # The old service dropped phone_number.
            "phone_number": conn.phone_number,
        }
    )
    values["last_metadata"] = last_metadata(event)
    return (
        RowOp(
            op="upsert",
            table="agents",
            key=("agent_id",),
            values=values,
            insert_only=AGENT_IDENTITY,
        ),
    )


HANDLERS: dict[str, Callable[[Event], Sequence[RowOp]]] = {
    "v1.chats.upsert": handle_chats_upsert,
    "v1.chats.update": handle_chats_update,
    "v1.history.chats": handle_history_chats,
    "v1.messages.upsert": handle_messages_upsert,
    "v1.messages.update": handle_messages_update,
    "v1.history.messages": handle_history_messages,
    "v1.contacts.upsert": handle_contacts_upsert,
    "v1.contacts.update": handle_contacts_update,
    "v1.history.contacts": handle_history_contacts,
    "v1.connection.update": handle_connection_update,
}

# The old service's zero values for the fields a producer may omit (a Go
# producer omits zero values), as SQL default expressions. Objects (last_message,
# key, message_obj, edited_message_obj, campaign) have none: the old service
# stored a nil map as NULL, and '{}' would claim an object nobody sent. Columns
# an upsert requires need none either. No NOT NULL is added: the contract
# records none for these columns, and on a table of an earlier version it
# would take a full scan under an exclusive lock (and fail on its NULLs).
_TEXT, _ZERO, _FALSE = "''", "0", "false"
ZERO_DEFAULTS: dict[str, dict[str, str]] = {
    "chats": {
        "push_name": _TEXT,
        "custom_name": _TEXT,
        "is_group": _FALSE,
        "group_name": _TEXT,
        "conversation_timestamp": _ZERO,
        "unread_count": _ZERO,
        "not_spam": _FALSE,
    },
    "contacts": {},
    "agents": {
        "qr_code": _TEXT,
        "status": _TEXT,
        "agent_name": _TEXT,
        "host_name": _TEXT,
        "version": _TEXT,
        "phone_number": _TEXT,
    },
    "messages": {
        "from_phone": _TEXT,
        "to_phone": _TEXT,
        "message_text": _TEXT,
        "message_url": _TEXT,
        "message_type": _TEXT,
        "status": _TEXT,
        "is_deleted": _FALSE,
        "message_timestamp": _ZERO,
    },
}

_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "chats": (
        ("chat_id", "text PRIMARY KEY"),
        ("jid", "text"),
        ("company_id", "text NOT NULL"),
        ("agent_id", "text"),
        ("phone_number", "text"),
        ("push_name", "text"),
        ("custom_name", "text"),
        ("is_group", "boolean"),
        ("group_name", "text"),
        ("last_message", "jsonb"),
        ("conversation_timestamp", "bigint"),
        ("unread_count", "bigint"),
        ("not_spam", "boolean"),
    ),
    "contacts": (
        ("chat_id", "text PRIMARY KEY"),
        ("phone_number", "text"),
        ("company_id", "text NOT NULL"),
        ("agent_id", "text"),
        ("push_name", "text"),
    ),
    "agents": (
        ("agent_id", "text PRIMARY KEY"),
        ("company_id", "text NOT NULL"),
        ("qr_code", "text"),
        ("status", "text"),
        ("agent_name", "text"),
        ("host_name", "text"),
        ("version", "text"),
        ("phone_number", "text"),
    ),
    "messages": (
        ("message_id", "text NOT NULL"),
        ("from_phone", "text"),
        ("to_phone", "text"),
        ("chat_id", "text"),
        ("jid", "text"),
        ("message_text", "text"),
        ("message_url", "text"),
        ("message_type", "text"),
        ("company_id", "text NOT NULL"),
        ("key", "jsonb"),
        ("edited_message_obj", "jsonb"),
        ("message_obj", "jsonb"),
        ("flow", "text CHECK (flow IN ('IN', 'OUT'))"),
        ("agent_id", "text"),
        ("status", "text"),
        ("is_deleted", "boolean NOT NULL"),
        ("message_timestamp", "bigint"),
        ("message_date", "date NOT NULL"),
        ("campaign", "jsonb"),
    ),
}
_TIMES = (
    ("last_metadata", "jsonb"),
    ("created_at", "timestamptz NOT NULL DEFAULT now()"),
    ("updated_at", "timestamptz NOT NULL DEFAULT now()"),
)


def _create(table: str, tail: str = "", after: str = "") -> str:
    defaults = ZERO_DEFAULTS[table]
    lines = [
        f"{name} {kind}" + (f" DEFAULT {defaults[name]}" if name in defaults else "")
        for name, kind in _COLUMNS[table] + _TIMES
    ]
    body = ",\n        ".join([*lines, *([tail] if tail else [])])
    return f"CREATE TABLE IF NOT EXISTS {{schema}}.{table} (\n        {body}\n    ){after}"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


# Tables created by an earlier version lack the defaults: add each one whose
# column has no default yet. Only then is the table altered (an ALTER takes an
# exclusive lock, and this runs on a tenant's first write after every start);
# a default someone else set (the old service's own schema) is left alone.
# Existing NULLs are not backfilled here (README, "Table semantics").
_ADD_DEFAULTS = """DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT a.attrelid::regclass AS rel, a.attname, d.expr
        FROM (VALUES
            {values}
        ) AS d(tbl, col, expr)
        JOIN pg_attribute a
          ON a.attrelid = to_regclass('{{schema}}.' || quote_ident(d.tbl))
         AND a.attname = d.col AND NOT a.attisdropped AND NOT a.atthasdef
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET DEFAULT %s', c.rel, c.attname, c.expr);
    END LOOP;
END
$$""".format(
    values=",\n            ".join(
        f"({_sql_text(t)}, {_sql_text(c)}, {_sql_text(e)})"
        for t, cols in ZERO_DEFAULTS.items()
        for c, e in cols.items()
    )
)

TENANT_DDL: tuple[str, ...] = (
    _create("chats"),
    _create("contacts"),
    "CREATE INDEX IF NOT EXISTS contacts_phone_number_agent_id"
    " ON {schema}.contacts (phone_number, agent_id)",
    _create("agents"),
    _create(
        "messages",
        tail="PRIMARY KEY (message_id, message_date)",
        after=" PARTITION BY RANGE (message_date)",
    ),
    "CREATE TABLE IF NOT EXISTS {schema}.messages_default PARTITION OF {schema}.messages DEFAULT",
    "CREATE INDEX IF NOT EXISTS messages_message_id ON {schema}.messages (message_id)",
    "CREATE INDEX IF NOT EXISTS messages_chat_id_message_timestamp"
    " ON {schema}.messages (chat_id, message_timestamp)",
    _ADD_DEFAULTS,
)
