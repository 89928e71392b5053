"""The whole pipeline: main consumers -> tenant tables, failures -> DLQ -> DLQ worker -> exhausted.

Each test has a nats-server of its own, since the events streams' subjects are fixed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import nats
import psycopg
import pytest
from nats.js import api

from dlqproc.embedded import NatsServer
from dlqproc.policy import DEAD_LETTER_ATTEMPTS
from support.service import Service, wait_until

Make = Callable[..., Service]
TS = 1764400000  # 2025-11-29 UTC

CHAT = {
    "chat_id": "c1",
    "jid": "111@s.whatsapp.net",
    "agent_id": "ag1",
    "phone_number": "111",
    "push_name": "Ann",
    "unread_count": 2,
    "conversation_timestamp": TS,
}
MESSAGE = {
    "message_id": "M1",
    "chat_id": "c1",
    "jid": "111@s.whatsapp.net",
    "flow": "IN",
    "agent_id": "ag1",
    "message_text": "hello",
    "status": "sent",
    "key": {"id": "M1", "fromMe": False, "remoteJid": "111@s.whatsapp.net"},
    "message_timestamp": TS,
}
CONTACT = {"chat_id": "c1", "phone_number": "111", "agent_id": "ag1", "push_name": "Ann"}
EVENTS: list[tuple[str, dict[str, Any], str, str]] = [
    # (subject base, payload, table, id column)
    ("v1.chats.upsert", CHAT, "chats", "chat_id"),
    ("v1.messages.upsert", MESSAGE, "messages", "message_id"),
    ("v1.contacts.upsert", CONTACT, "contacts", "chat_id"),
    (
        "v1.connection.update",
        {"agent_id": "ag1", "status": "open", "phone_number": "999"},
        "agents",
        "agent_id",
    ),
    (
        "v1.chats.update",
        {"chat_id": "c1", "agent_id": "ag1", "unread_count": 5, "conversation_timestamp": TS + 10},
        "chats",
        "chat_id",
    ),
    ("v1.messages.update", {"message_id": "M1", "status": "read"}, "messages", "message_id"),
    (
        "v1.contacts.update",
        {"phone_number": "111", "agent_id": "ag1", "push_name": "Anna"},
        "contacts",
        "chat_id",
    ),
    (
        "v1.history.chats",
        {"chats": [{**CHAT, "chat_id": "h1"}, {**CHAT, "chat_id": "h2"}]},
        "chats",
        "chat_id",
    ),
    (
        "v1.history.messages",
        {"messages": [{**MESSAGE, "message_id": "H1"}], "agent_id": "ag1"},
        "messages",
        "message_id",
    ),
    ("v1.history.contacts", {"contacts": [{**CONTACT, "chat_id": "hc1"}]}, "contacts", "chat_id"),
]


def table(svc: Service, tenant: str, name: str) -> list[dict[str, Any]]:
    with psycopg.connect(svc.dsn, autocommit=True) as conn:
        try:
            cur = conn.execute(f"SELECT * FROM daisi_{tenant}.{name}")
        except psycopg.errors.UndefinedTable:
            return []
        cols = [d.name for d in cur.description or ()]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]


def schemas(svc: Service) -> set[str]:
    return {r[0] for r in svc.query("SELECT schema_name FROM information_schema.schemata")}


def send(svc: Service, base: str, tenant: str, payload: object) -> int:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return svc.publish_to(f"{base}.{tenant}", [body])[0]


def main_settled(svc: Service, realtime: bool = True) -> bool:
    stream, durable = (
        ("wa_events_stream", "wa_events_realtime_consumer")
        if realtime
        else ("wa_history_events_stream", "wa_history_events_historical_consumer")
    )
    c = svc.consumer_of(stream, durable)
    return c["pending"] == 0 and c["ack_pending"] == 0


def test_every_event_type_reaches_its_table_with_last_metadata(pipeline: Make) -> None:
    svc = pipeline()
    for base, payload, _, _ in EVENTS[:4]:
        send(svc, base, "acme", payload)
    wait_until(
        lambda: (
            len(table(svc, "acme", "agents")) == 1
            and table(svc, "acme", "contacts")
            and table(svc, "acme", "messages")
            and table(svc, "acme", "chats")
        )
    )
    for base, payload, _, _ in EVENTS[4:]:
        send(svc, base, "acme", payload)
    wait_until(lambda: main_settled(svc) and main_settled(svc, realtime=False), timeout=30)
    chats = {r["chat_id"]: r for r in table(svc, "acme", "chats")}
    assert set(chats) == {"c1", "h1", "h2"}
    assert chats["c1"]["unread_count"] == 5  # absolute, never incremented
    assert chats["c1"]["conversation_timestamp"] == TS + 10
    meta = chats["c1"]["last_metadata"]
    assert meta["stream"] == "wa_events_stream" and meta["subject"] == "v1.chats.update.acme"
    assert meta["stream_seq"] > 0 and meta["processed_at"]
    messages = {r["message_id"]: r for r in table(svc, "acme", "messages")}
    assert set(messages) == {"M1", "H1"}
    assert messages["M1"]["status"] == "read"
    assert str(messages["M1"]["message_date"]) == "2025-11-29"
    assert messages["H1"]["last_metadata"]["stream"] == "wa_history_events_stream"
    contacts = {r["chat_id"]: r for r in table(svc, "acme", "contacts")}
    assert contacts["c1"]["push_name"] == "Anna" and set(contacts) == {"c1", "hc1"}
    [agent] = table(svc, "acme", "agents")
    assert agent["phone_number"] == "999" and agent["status"] == "open"
    assert svc.exhausted() == [] and svc.dlq_messages() == []
    # Monthly partition for the message's month, created on first use.
    where = svc.query("SELECT tableoid::regclass::text FROM daisi_acme.messages")
    assert {r[0] for r in where} == {"daisi_acme.messages_2025_11"}


def test_missing_required_field_is_dead_lettered_fatal_then_exhausted(pipeline: Make) -> None:
    svc = pipeline()
    bad = {k: v for k, v in CHAT.items() if k != "jid"}
    seq = send(svc, "v1.chats.upsert", "acme", bad)
    wait_until(svc.exhausted, timeout=30)
    [env] = svc.dlq_messages()
    assert env["error_type"] == "fatal" and env["retry_count"] == 1
    assert env["source_subject"] == "v1.chats.upsert.acme" and env["company"] == "acme"
    assert env["original_payload"] == bad and env["max_retry"] == 5
    assert env["_subject"] == "v1.dlq.acme"
    assert env["_headers"]["Original-Nats-Msg-Id"] == f"msg-{seq}"
    assert env["_headers"]["Nats-Msg-Id"] == f"dlq-wa_events_stream-{seq}"
    [row] = svc.exhausted()
    # Exhausted on the DLQ worker's first pass.
    assert row["retry_count"] == 1 and row["reason"] == "validation"
    assert row["original_payload"] == bad
    wait_until(lambda: main_settled(svc))


def test_update_before_upsert_is_retried_dead_lettered_and_then_succeeds(
    pipeline: Make,
) -> None:
    svc = pipeline(
        NATS_REALTIME_MAXDELIVER="2",
        NATS_DLQBASEDELAYMINUTES="0.02",
        NATS_DLQMAXDELAYMINUTES="0.02",
        NATS_DLQMAXRETRIES="5",
        NATS_DLQMAXDELIVER="8",
    )
    send(svc, "v1.messages.update", "acme", {"message_id": "M1", "status": "read"})
    wait_until(svc.dlq_messages, timeout=30)
    [env] = svc.dlq_messages()
    assert env["error_type"] == "retryable" and env["retry_count"] == 2
    send(svc, "v1.messages.upsert", "acme", MESSAGE)
    wait_until(lambda: svc.settled() and main_settled(svc), timeout=60)
    [row] = table(svc, "acme", "messages")
    assert row["status"] == "read"  # the DLQ worker applied the update after the upsert
    assert svc.exhausted() == []


def test_tenants_are_isolated_without_company_id(pipeline: Make) -> None:
    svc = pipeline()
    send(svc, "v1.chats.upsert", "acme", {**CHAT, "chat_id": "a-chat"})
    send(svc, "v1.chats.upsert", "globex", {**CHAT, "chat_id": "g-chat"})
    # A payload naming another tenant than its subject is fatal.
    send(svc, "v1.chats.upsert", "acme", {**CHAT, "chat_id": "spoof", "company_id": "globex"})
    wait_until(lambda: table(svc, "globex", "chats") and svc.exhausted(), timeout=30)
    wait_until(lambda: main_settled(svc))
    assert [r["chat_id"] for r in table(svc, "acme", "chats")] == ["a-chat"]
    assert [r["chat_id"] for r in table(svc, "globex", "chats")] == ["g-chat"]
    [row] = svc.exhausted()
    assert row["reason"] == "invalid_tenant" and row["company_id"] == "acme"


def test_company_id_serves_one_tenant_only(pipeline: Make) -> None:
    svc = pipeline(COMPANY_ID="acme")
    send(svc, "v1.chats.upsert", "acme", {**CHAT, "chat_id": "a-chat"})
    send(svc, "v1.chats.upsert", "globex", {**CHAT, "chat_id": "g-chat"})
    wait_until(lambda: table(svc, "acme", "chats"), timeout=30)
    c = svc.consumer_of("wa_events_stream", "wa_events_realtime_consumer_acme")
    wait_until(
        lambda: (
            svc.consumer_of("wa_events_stream", "wa_events_realtime_consumer_acme")["ack_pending"]
            == 0
        )
    )
    assert c["pending"] == 0
    assert table(svc, "globex", "chats") == []
    assert "daisi_globex" not in schemas(svc)


@pytest.mark.parametrize("tenant", ["x" * 200, "ação", "a$b"])
def test_bad_tenant_tokens_are_rejected_and_create_nothing(pipeline: Make, tenant: str) -> None:
    svc = pipeline()
    before = schemas(svc)
    send(svc, "v1.chats.upsert", tenant, CHAT)
    wait_until(svc.exhausted, timeout=30)
    [row] = svc.exhausted()
    assert row["reason"] == "invalid_tenant"
    # A value no valid tenant can have (those start with a letter or digit).
    assert row["company_id"] == "_invalid"
    assert row["dlq_subject"] == "v1.dlq._invalid"
    assert schemas(svc) - before == set()


@pytest.mark.parametrize("company", ['a";DROP SCHEMA x;--', "../x", "x" * 200, "ação"])
def test_bad_tenants_in_dlq_envelopes_are_rejected(pipeline: Make, company: str) -> None:
    svc = pipeline()
    before = schemas(svc)
    env = {
        "source_subject": f"v1.chats.upsert.{company}",
        "company": company,
        "original_payload": CHAT,
        "error": "e",
        "error_type": "fatal",
        "retry_count": 1,
        "max_retry": 5,
        "ts": "2025-11-29T00:00:00Z",
    }
    svc.publish_to("v1.dlq.acme", [json.dumps(env).encode()])
    wait_until(svc.exhausted, timeout=30)
    [row] = svc.exhausted()
    assert row["reason"] == "invalid_tenant"
    assert schemas(svc) - before == set()


def test_dlq_publish_failure_naks_and_recovers(pipeline: Make, own_nats: NatsServer) -> None:
    # A full DLQ stream that discards new messages refuses the dead-letter
    # publish. (A deleted one is recreated within a second by the DLQ lane's
    # fetch failures: tests/test_service.py.)
    svc = pipeline()

    async def dlq_stream(max_msgs: int, filler: bool = False) -> int:
        nc = await nats.connect(own_nats.url)
        try:
            js = nc.jetstream()
            config = (await js.stream_info("dlq_stream")).config
            config.max_msgs, config.discard = max_msgs, api.DiscardPolicy.NEW
            await js.update_stream(config)
            if filler:
                await js.publish("v1.dlq.filler", b"not an envelope")
            return int((await js.stream_info("dlq_stream")).state.messages)
        finally:
            await nc.close()

    assert asyncio.run(dlq_stream(1, filler=True)) == 1
    bad = {k: v for k, v in CHAT.items() if k != "jid"}
    send(svc, "v1.chats.upsert", "acme", bad)
    wait_until(lambda: svc.find("Failed to publish event to DLQ, NAKing it"), timeout=30)
    # NAKed: neither acked nor lost, it is still the consumer's to deliver.
    c = svc.consumer_of("wa_events_stream", "wa_events_realtime_consumer")
    assert c["ack_floor"] == 0
    asyncio.run(dlq_stream(-1))
    wait_until(lambda: main_settled(svc), timeout=60)
    # The filler and the dead-lettered event.
    assert asyncio.run(dlq_stream(-1)) == 2
    assert svc.consumer_of("wa_events_stream", "wa_events_realtime_consumer")["ack_floor"] == 1


def test_crashing_event_is_dead_lettered_to_its_own_tenant(pipeline: Make) -> None:
    svc = pipeline(
        HANDLERS_MODULE="support.crashing_whatsapp",
        NATS_REALTIME_MAXDELIVER="2",
        NATS_DLQMAXRETRIES="2",
        NATS_DLQMAXDELIVER="4",
    )
    send(svc, "v1.chats.upsert", "acme", {**CHAT, "push_name": "crash"})
    wait_until(svc.exhausted, timeout=60)
    [env] = svc.dlq_messages()
    assert env["_subject"] == "v1.dlq.acme" and env["company"] == "acme"
    assert env["error_type"] == "retryable"
    [row] = svc.exhausted()
    assert row["company_id"] == "acme" and row["reason"] == "retries_exhausted"


def test_a_dead_letter_jetstream_keeps_refusing_is_stored_directly(
    pipeline: Make, own_nats: NatsServer
) -> None:
    """The operator's DLQ stream takes messages of at most 2 KiB; a 4 KiB event
    fails validation. Its dead-letter publish is refused on every delivery, so
    after DEAD_LETTER_ATTEMPTS of them the event is stored in exhausted_events
    itself and ACKed, instead of coming back for ever."""

    async def operator_stream() -> None:
        nc = await nats.connect(own_nats.url)
        try:
            await nc.jetstream().add_stream(
                name="dlq_stream", subjects=["v1.dlq.>"], max_msg_size=2048
            )
        finally:
            await nc.close()

    asyncio.run(operator_stream())
    svc = pipeline()
    body = json.dumps({"chat_id": "c", "push_name": "x" * 4096}).encode()  # no jid: validation
    seq = send(svc, "v1.chats.upsert", "acme", body)
    row = wait_until(lambda: svc.exhausted_of("wa_events_stream", seq), timeout=60)
    wait_until(lambda: main_settled(svc), timeout=30)
    assert row["reason"] == "validation" and bytes(row["raw_payload"]) == body
    assert row["retry_count"] == 1 + DEAD_LETTER_ATTEMPTS
    assert "[stored directly: dead-letter publish failed on every attempt]" in row["last_error"]
    assert svc.dlq_messages() == []
    refused = svc.find_containing("Failed to publish event to DLQ")
    assert len(refused) == DEAD_LETTER_ATTEMPTS
    [stored] = svc.find_containing("Event not dead-lettered, stored in exhausted_events")
    assert stored["why"] == "dead-letter publish failed on every attempt"


def test_event_too_big_for_a_dlq_message_is_stored_directly(pipeline: Make) -> None:
    svc = pipeline()
    # Fits NATS's 1 MiB, but not once wrapped in an envelope; fails validation.
    body = json.dumps(
        {
            "chat_id": "c",
            "agent_id": "a",
            "phone_number": "1",
            "push_name": "x" * (1024 * 1024 - 400),
        }
    ).encode()
    send(svc, "v1.chats.upsert", "acme", body)
    wait_until(svc.exhausted, timeout=30)
    wait_until(lambda: main_settled(svc))
    [row] = svc.exhausted()
    assert bytes(row["raw_payload"]) == body and row["reason"] == "validation"
    assert row["company_id"] == "acme" and row["source_subject"] == "v1.chats.upsert.acme"
    assert svc.dlq_messages() == []
