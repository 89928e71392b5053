"""The event generator behind `dlqproc publish` (dlqproc.generate): pure, no servers."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqproc import envelope
from dlqproc.generate import DEFAULT_NOW, GeneratedEvent, Generator, dlq_envelopes
from dlqproc.handlers.payloads import EVENT_TYPES
from dlqproc.handlers.whatsapp import HANDLERS
from dlqproc.model import Event, Meta, PermanentError, RowOp
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

ALL_BASES = (*REALTIME_BASES, *HISTORY_BASES)
TENANTS = ("acme", "globex", "initech")
HISTORY_ITEMS = {
    "v1.history.chats": "chats",
    "v1.history.messages": "messages",
    "v1.history.contacts": "contacts",
}


def handle(ev: GeneratedEvent) -> list[RowOp]:
    return list(
        HANDLERS[ev.base](
            Event(
                subject=ev.subject,
                base=ev.base,
                tenant=ev.tenant,
                payload=ev.body,
                attempt=1,
                meta=Meta(stream="s", consumer="c", msg_id=ev.msg_id),
            )
        )
    )


def body(ev: GeneratedEvent) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(ev.body)
    return decoded


def check(events: list[GeneratedEvent], tenants: tuple[str, ...], history_batch: int) -> None:
    for ev in events:
        assert ev.base in EVENT_TYPES
        assert ev.subject == f"{ev.base}.{ev.tenant}"
        assert ev.tenant in tenants
        if ev.valid:
            msgspec.json.decode(ev.body, type=EVENT_TYPES[ev.base])
            rows = handle(ev)
            assert rows and all(isinstance(r, RowOp) for r in rows)
            if ev.base in HISTORY_ITEMS:
                assert len(body(ev)[HISTORY_ITEMS[ev.base]]) == history_batch
                assert len(rows) == history_batch
        else:
            with pytest.raises(msgspec.ValidationError):
                msgspec.json.decode(ev.body, type=EVENT_TYPES[ev.base])
            with pytest.raises(PermanentError):
                handle(ev)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    n=st.integers(min_value=0, max_value=60),
    tenants=st.lists(
        st.sampled_from(("acme", "globex", "initech", "Tenant-9", "t_1")),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    bases=st.lists(st.sampled_from(ALL_BASES), min_size=1, max_size=10, unique=True),
    history_batch=st.integers(min_value=1, max_value=6),
    invalid_rate=st.sampled_from((0.0, 0.1, 0.5, 1.0)),
    update_first_rate=st.sampled_from((0.0, 0.3, 1.0)),
)
def test_every_event_is_valid_or_rejected_as_asked(
    seed: int,
    n: int,
    tenants: list[str],
    bases: list[str],
    history_batch: int,
    invalid_rate: float,
    update_first_rate: float,
) -> None:
    gen = Generator(seed, tenants, bases, history_batch, invalid_rate, update_first_rate)
    events = list(gen.events(n))
    assert len(events) == n
    assert len({ev.msg_id for ev in events}) == n
    check(events, tuple(tenants), history_batch)
    for ev in events:
        # Only the update-before-upsert ones may be outside the asked bases.
        assert ev.base in bases or (ev.base == "v1.messages.update" and update_first_rate > 0)
    if invalid_rate == 0.0:
        assert all(ev.valid for ev in events)
    if invalid_rate == 1.0:
        # No upsert is valid, so none gets an update put before it.
        assert all(not ev.valid for ev in events)
    # Same seed, same sequence, byte for byte; a fresh call starts over.
    again = Generator(seed, tenants, bases, history_batch, invalid_rate, update_first_rate)
    assert list(again.events(n)) == events
    assert list(gen.events(n)) == events


def test_a_large_mixed_run_is_realistic() -> None:
    gen = Generator(7, TENANTS, ALL_BASES, history_batch=20, invalid_rate=0.1)
    events = list(gen.events(1500))
    check(events, TENANTS, 20)
    counts = Counter(ev.base for ev in events)
    assert set(counts) == set(ALL_BASES)
    assert set(Counter(ev.tenant for ev in events)) == set(TENANTS)
    invalid = sum(not ev.valid for ev in events) / len(events)
    assert 0.05 < invalid < 0.15

    upserts = [body(ev) for ev in events if ev.valid and ev.base == "v1.messages.upsert"]
    for msg in upserts:
        assert re.fullmatch(r"3EB0[0-9A-F]{16}", msg["message_id"])
        assert re.fullmatch(r"\d{11,13}@s\.whatsapp\.net|120363\d{12}@g\.us", msg["jid"])
        assert msg["key"]["id"] == msg["message_id"]
        assert msg["key"]["remoteJid"] == msg["chat_id"]
        assert msg["flow"] == ("OUT" if msg["key"]["fromMe"] else "IN")
        assert 1024 <= len(msg["message_text"]) <= 2048
        assert isinstance(msg["message_obj"], dict) and msg["message_obj"]
        assert DEFAULT_NOW - 3600 <= msg["message_timestamp"] <= DEFAULT_NOW
        assert msg["company_id"] in TENANTS
    assert {m["flow"] for m in upserts} == {"IN", "OUT"}

    # Updates refer to rows generated before them (for their tenant) once there are any.
    seen: dict[tuple[str, str], set[Any]] = {}

    def known(tenant: str, kind: str) -> set[Any]:
        return seen.setdefault((tenant, kind), set())

    found = total = 0
    for ev in events:
        if not ev.valid:
            continue
        data = body(ev)
        t = ev.tenant
        if ev.base == "v1.messages.upsert":
            known(t, "msg").add(data["message_id"])
        elif ev.base == "v1.history.messages":
            known(t, "msg").update(m["message_id"] for m in data["messages"])
        elif ev.base == "v1.chats.upsert":
            known(t, "chat").add(data["chat_id"])
        elif ev.base == "v1.history.chats":
            known(t, "chat").update(c["chat_id"] for c in data["chats"])
        elif ev.base == "v1.contacts.upsert":
            known(t, "contact").add((data["phone_number"], data["agent_id"]))
        elif ev.base == "v1.history.contacts":
            known(t, "contact").update((c["phone_number"], c["agent_id"]) for c in data["contacts"])
        else:
            if ev.base == "v1.messages.update":
                kind, key = "msg", data["message_id"]
            elif ev.base == "v1.chats.update":
                kind, key = "chat", data["chat_id"]
            elif ev.base == "v1.contacts.update":
                kind, key = "contact", (data["phone_number"], data["agent_id"])
            else:
                continue
            if known(t, kind):
                total += 1
                found += key in known(t, kind)
    assert total > 100 and found == total


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_update_first_puts_an_update_right_before_each_upsert(seed: int) -> None:
    gen = Generator(seed, TENANTS, ["v1.messages.upsert"], update_first_rate=1.0)
    events = list(gen.events(200))
    check(events, TENANTS, 50)
    assert [ev.base for ev in events] == ["v1.messages.update", "v1.messages.upsert"] * 100
    for update, upsert in zip(events[::2], events[1::2], strict=True):
        assert update.tenant == upsert.tenant
        assert body(update)["message_id"] == body(upsert)["message_id"]
    # An odd count leaves no room for the last pair: the upsert comes alone.
    odd = list(gen.events(5))
    assert [ev.base for ev in odd][-1] == "v1.messages.upsert"
    assert len(odd) == 5


def test_update_first_rate_is_a_fraction_of_upserts() -> None:
    gen = Generator(5, TENANTS, ["v1.messages.upsert"], update_first_rate=0.25)
    events = list(gen.events(2000))
    upserts = [i for i, ev in enumerate(events) if ev.base == "v1.messages.upsert"]
    preceded = [
        i
        for i in upserts
        if i > 0
        and events[i - 1].base == "v1.messages.update"
        and body(events[i - 1])["message_id"] == body(events[i])["message_id"]
    ]
    assert 0.18 < len(preceded) / len(upserts) < 0.32


def test_history_batch_sets_the_item_count() -> None:
    for batch in (1, 50, 300):
        events = list(Generator(3, ["acme"], HISTORY_BASES, history_batch=batch).events(9))
        check(events, ("acme",), batch)


def test_the_clock_is_an_argument() -> None:
    a = list(Generator(1, ["acme"], ["v1.messages.upsert"]).events(20))
    b = list(Generator(1, ["acme"], ["v1.messages.upsert"], now=DEFAULT_NOW + 86400).events(20))
    assert [body(e)["message_timestamp"] + 86400 for e in a] == [
        body(e)["message_timestamp"] for e in b
    ]
    assert {e.msg_id for e in a}.isdisjoint(e.msg_id for e in b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tenants": []},
        {"tenants": ["bad tenant"]},
        {"bases": []},
        {"bases": ["v1.nope"]},
        {"history_batch": 0},
        {"history_batch": 5001},
        {"invalid_rate": 1.5},
        {"update_first_rate": -0.1},
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"seed": 1, "tenants": TENANTS, "bases": ALL_BASES, **kwargs}
    with pytest.raises(ValueError):
        Generator(**args)


def test_dlq_envelopes_wrap_each_event() -> None:
    events = list(Generator(4, TENANTS, ALL_BASES, history_batch=3, invalid_rate=0.3).events(80))
    wrapped = list(dlq_envelopes(events, "uniq.dlq", now=DEFAULT_NOW))
    assert len(wrapped) == len(events)
    for ev, (subject, data) in zip(events, wrapped, strict=True):
        assert subject == f"uniq.dlq.{ev.tenant}"
        env = envelope.decode(data, 1 << 24)
        assert env.company == ev.tenant
        assert env.source_subject == ev.subject
        assert envelope.split_source(env.source_subject, env.company) == ev.base
        assert msgspec.json.decode(env.original_payload) == body(ev)
        assert env.error_type == ("retryable" if ev.valid else "fatal")
        assert env.max_retry == (3 if ev.base in HISTORY_BASES else 5)
        assert env.ts == "2025-11-29T07:06:40Z"
    # A body that is not JSON is kept whole, base64-encoded.
    raw = GeneratedEvent(
        "v1.chats.upsert.acme", b"\xffnot json", "v1.chats.upsert", "acme", True, "x"
    )
    [(_, data)] = dlq_envelopes([raw])
    assert msgspec.json.decode(envelope.decode(data, 1 << 20).original_payload) == {
        "base64": "/25vdCBqc29u"
    }
