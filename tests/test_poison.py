"""Poison input (issue 9): no single message stalls a lane, holds itself forever, floods
the database or costs its neighbours their events.

Every case goes through the real service (worker processes included) on a real
nats-server of its own and a real PostgreSQL, among innocent neighbours of the
same tenant and of another one, on the realtime lane and as DLQ envelopes. Each
test then checks the same things: every innocent event is a row; the poison is
an exhausted row with its reason, stored at its first delivery; another tenant's
event published after the poison lands within seconds; no consumer is left with
pending or unacknowledged messages; nothing repeats in the log beyond the retry
budget; /ready answers 200.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import fresh_database
from hypothesis import HealthCheck, Phase, example, given, settings

from dlqproc.embedded import NatsServer, PostgresServer
from support.hostile import (
    BASES,
    HORIZON,
    KNOWN_POISONS,
    TENANTS,
    WINDOW_START,
    Message,
    batches,
    big_history,
    encode,
    known_poison,
    lane_of,
    log_problems,
    settle_batch,
    valid_payload,
)
from support.service import DLQ_STREAM, MAIN_CONSUMERS, PIPELINE_ENV, Service, envelope, wait_until

Make = Callable[..., Service]
REALTIME_STREAM = MAIN_CONSUMERS["realtime"][0]
HISTORY_STREAM = MAIN_CONSUMERS["historical"][0]
MB = 1024 * 1024
DEC_9999 = 253402300799  # 9999-12-31T23:59:59Z
TS = 1764400000  # 2025-11-29T07:06:40Z

# The innocent neighbours: one table each, so every one leaves a row of its own.
NEIGHBOUR_BASES = (
    ("v1.chats.upsert", "chats", "chat_id", "c-{}"),
    ("v1.messages.upsert", "messages", "message_id", "m-{}"),
    ("v1.contacts.upsert", "contacts", "chat_id", "c-{}"),
    ("v1.connection.update", "agents", "agent_id", "ag-{}"),
)


@pytest.fixture
def lanes(service: Make, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: the whole pipeline on a nats-server of its own (max_payload in bytes)."""
    servers: list[NatsServer] = []
    services: list[Service] = []

    def make(max_payload: int | None = None, **settings: str) -> Service:
        nats = NatsServer(tmp_path / f"nats-{len(servers)}", max_payload=max_payload)
        nats.start()
        servers.append(nats)
        svc = service(nats_url=nats.url, **{**PIPELINE_ENV, **settings})
        services.append(svc)
        return svc

    yield make
    for svc in services:  # before their nats-server goes
        svc.stop()
    for nats in servers:
        nats.stop()


@dataclass(frozen=True)
class Row:
    tenant: str
    table: str
    column: str
    value: str


@dataclass(frozen=True)
class Poison:
    what: str
    stream: str
    seq: int
    reason: str
    body: bytes
    raw: bool = False  # exhausted_events.raw_payload must hold the body


def row_exists(svc: Service, row: Row) -> bool:
    try:
        return bool(
            svc.query(
                f"SELECT 1 FROM daisi_{row.tenant}.{row.table} WHERE {row.column} = %s",
                (row.value,),
            )
        )
    except psycopg.errors.UndefinedTable:
        return False


@dataclass
class Run:
    """What one test published: innocent rows expected, poisons and their reasons."""

    svc: Service
    rows: list[Row] = field(default_factory=list)
    poisons: list[Poison] = field(default_factory=list)
    # Not yet published: (subject, body, what the poison is) with None for an innocent.
    items: list[tuple[str, bytes, tuple[str, str, bool] | None]] = field(default_factory=list)

    # -- what to publish (in order, by publish())

    def innocent(self, subject: str, body: bytes, row: Row) -> None:
        self.items.append((subject, body, None))
        self.rows.append(row)

    def neighbours(self, tag: str, acme: int = 10, globex: int = 5) -> None:
        """Innocent events for acme and globex on the realtime lane, and as many envelopes."""
        for lane in ("rt", "dlq"):
            for tenant, n in (("acme", acme), ("globex", globex)):
                for i in range(n):
                    uid = f"{tag}-{lane}-{tenant}-{i}"
                    base, table, column, key = NEIGHBOUR_BASES[i % len(NEIGHBOUR_BASES)]
                    payload = valid_payload(base, uid, TS)
                    row = Row(tenant, table, column, key.format(uid))
                    if lane == "rt":
                        self.innocent(f"{base}.{tenant}", json.dumps(payload).encode(), row)
                    else:
                        self.innocent(f"v1.dlq.{tenant}", envelope(base, tenant, payload), row)

    def poison(self, what: str, subject: str, body: bytes, reason: str, raw: bool = False) -> None:
        self.items.append((subject, body, (what, reason, raw)))

    def publish(self) -> None:
        seqs = self.svc.publish_each((subject, body) for subject, body, _ in self.items)
        for (subject, body, spec), seq in zip(self.items, seqs, strict=True):
            if spec is not None:
                what, reason, raw = spec
                self.poisons.append(Poison(what, stream_of(subject), seq, reason, body, raw))
        self.items = []

    # -- what must come of it

    def missing(self) -> list[Row]:
        return [r for r in self.rows if not row_exists(self.svc, r)]

    def wait_for_innocents(self, timeout: float = 20.0) -> None:
        try:
            wait_until(lambda: not self.missing(), timeout=timeout, interval=0.25)
        except AssertionError:
            gone = self.missing()
            raise AssertionError(
                f"{len(gone)} of {len(self.rows)} innocent events are not rows after"
                f" {timeout}s: {gone[:6]}"
            ) from None

    def exhausted(self, minimal_ok: bool = False) -> dict[str, dict[str, Any]]:
        """Each poison's exhausted row (by what it is), checked: its reason, its first
        delivery, its bytes.

        minimal_ok: a row PostgreSQL refused in full may be stored minimal instead,
        with a reason of its own, as long as it keeps the message's bytes.
        """
        found = {}
        wrong = []
        for p in self.poisons:
            row = self.svc.exhausted_of(p.stream, p.seq)
            if row is None:
                wrong.append(f"{p.what}: no exhausted row ({p.stream} seq {p.seq})")
                continue
            found[p.what] = row
            minimal = minimal_ok and row["raw_payload"] is not None
            if row["reason"] != p.reason and not minimal:
                wrong.append(
                    f"{p.what}: reason {row['reason']!r}, not {p.reason!r}"
                    f" (last_error {str(row['last_error'])[:160]!r})"
                )
            if row["retry_count"] != 1:
                wrong.append(f"{p.what}: exhausted at delivery {row['retry_count']}, not the first")
            dead = row.get("_dead_letter")
            if dead is not None and dead.get("error_type") != "fatal":
                wrong.append(f"{p.what}: dead-lettered as {dead.get('error_type')!r}, not fatal")
            if p.raw and bytes(row["raw_payload"] or b"") != p.body:
                have = bytes(row["raw_payload"] or b"")
                wrong.append(f"{p.what}: raw_payload {have[:40]!r} is not the event's bytes")
        assert not wrong, "\n".join(wrong)
        return found


def stream_of(subject: str) -> str:
    if subject.startswith("v1.dlq."):
        return DLQ_STREAM
    return HISTORY_STREAM if subject.startswith("v1.history.") else REALTIME_STREAM


def late_event_lands(svc: Service, tag: str, tenant: str = "globex", within: float = 10.0) -> None:
    """Another tenant's event, published now, is a row within seconds."""
    uid = f"{tag}-late"
    payload = valid_payload("v1.chats.upsert", uid, TS)
    started = time.monotonic()
    svc.publish_each([(f"v1.chats.upsert.{tenant}", json.dumps(payload).encode())])
    try:
        wait_until(lambda: row_exists(svc, Row(tenant, "chats", "chat_id", f"c-{uid}")), within)
    except AssertionError:
        raise AssertionError(
            f"{tenant}'s event published after the poison is not a row within {within}s"
        ) from None
    assert time.monotonic() - started < within


def settled_and_ready(svc: Service, timeout: float = 30.0) -> None:
    """Every consumer drained, no line repeats beyond its budget, /ready 200."""
    svc.wait_drained(timeout)
    problems = log_problems(svc)
    assert not problems, "\n".join(problems)
    svc.wait_ready(10)


def chat_body(uid: str, **fields: object) -> bytes:
    return json.dumps({**valid_payload("v1.chats.upsert", uid, TS), **fields}).encode()


def message_body(uid: str, **fields: object) -> bytes:
    return json.dumps({**valid_payload("v1.messages.upsert", uid, TS), **fields}).encode()


def dlq_envelope(base: str, tenant: str, payload: object, **fields: object) -> bytes:
    env = json.loads(envelope(base, tenant, payload))
    return json.dumps({**env, **fields}).encode()


# ------------------------------------------------------------------ issue 9, case 1


def test_timestamps_past_the_window_fail_validation_and_spare_their_neighbours(
    lanes: Make,
) -> None:
    svc = lanes()
    run = Run(svc)
    week = int(time.time()) + HORIZON + 86400
    run.poison(
        "realtime message of Dec 9999",
        "v1.messages.upsert.acme",
        message_body("dec9999", message_timestamp=DEC_9999),
        "validation",
    )
    run.neighbours("t1")
    run.poison(
        "realtime message just before 2009",
        "v1.messages.upsert.acme",
        message_body("early", message_timestamp=WINDOW_START - 1),
        "validation",
    )
    run.poison(
        "realtime message past the horizon",
        "v1.messages.upsert.globex",
        message_body("future", message_timestamp=week),
        "validation",
    )
    run.poison(
        "realtime chat of Dec 9999",
        "v1.chats.upsert.acme",
        chat_body("chat9999", conversation_timestamp=DEC_9999),
        "validation",
    )
    for tenant in ("acme", "globex"):
        payload = json.loads(message_body(f"dlq9999-{tenant}", message_timestamp=DEC_9999))
        run.poison(
            f"DLQ envelope of Dec 9999 for {tenant}",
            f"v1.dlq.{tenant}",
            envelope("v1.messages.upsert", tenant, payload),
            "validation",
        )
    # At the bounds, inside: written.
    run.innocent(
        "v1.messages.upsert.acme",
        message_body("first-second", message_timestamp=WINDOW_START),
        Row("acme", "messages", "message_id", "m-first-second"),
    )
    run.innocent(
        "v1.messages.upsert.globex",
        message_body("next-days", message_timestamp=int(time.time()) + HORIZON - 3600),
        Row("globex", "messages", "message_id", "m-next-days"),
    )
    run.publish()
    late_event_lands(svc, "t1")
    run.wait_for_innocents()
    settled_and_ready(svc)
    run.exhausted()
    assert svc.query(
        "SELECT message_date FROM daisi_acme.messages WHERE message_id = 'm-first-second'"
    ) == [(dt.date(2009, 1, 1),)]


# ------------------------------------------------------------------ issue 9, case 2


def test_exhausted_rows_postgres_would_refuse_are_stored_and_never_held(lanes: Make) -> None:
    svc = lanes()
    run = Run(svc)
    no_jid = {k: v for k, v in valid_payload("v1.chats.upsert", "nojid", TS).items() if k != "jid"}
    offsets = {
        "+20:00": dt.datetime(2025, 11, 28, 4, 0, tzinfo=dt.UTC),
        "+05:30:15.123456": dt.datetime(2025, 11, 28, 18, 29, 44, 876544, tzinfo=dt.UTC),
    }
    ts_of: dict[str, dt.datetime] = {}
    for offset, instant in offsets.items():
        for tenant in ("acme", "globex"):
            what = f"envelope for {tenant} with ts offset {offset}"
            ts_of[what] = instant
            run.poison(
                what,
                f"v1.dlq.{tenant}",
                dlq_envelope("v1.chats.upsert", tenant, no_jid, ts=f"2025-11-29T00:00:00{offset}"),
                "validation",
            )
    emoji = "🙂" * 1100
    run.poison(
        "envelope with a source_subject of 1,100 emoji",
        "v1.dlq.acme",
        dlq_envelope("v1.chats.upsert", "acme", no_jid, source_subject=emoji),
        "unknown_subject",
    )
    run.neighbours("t2")
    # A subject token of 700 emoji (2,800 bytes): an invalid tenant, its subject
    # longer than a btree index entry may be.
    run.poison(
        "realtime event whose tenant is 700 emoji",
        "v1.chats.upsert." + "🙂" * 700,
        chat_body("emoji-tenant"),
        "invalid_tenant",
    )
    # Eight ~900 KB messages that could each hold a slot and its bytes forever.
    big = {**no_jid, "filler": "x" * 900_000}
    for i in range(8):
        tenant = ("acme", "globex")[i % 2]
        what = f"900 KB envelope #{i} with ts offset +20:00"
        ts_of[what] = offsets["+20:00"]
        run.poison(
            what,
            f"v1.dlq.{tenant}",
            dlq_envelope("v1.chats.upsert", tenant, big, ts="2025-11-29T00:00:00+20:00"),
            "validation",
        )
    run.publish()
    late_event_lands(svc, "t2", tenant="acme")
    run.wait_for_innocents()
    settled_and_ready(svc)

    # Stored as they are, normalised, or as a minimal row that holds the bytes.
    rows = run.exhausted(minimal_ok=True)
    for what, instant in ts_of.items():
        row = rows[what]
        assert row["event_timestamp"] in (None, instant), (what, row["event_timestamp"])
    row = rows["envelope with a source_subject of 1,100 emoji"]
    stored = row["source_subject"]
    assert len(stored.encode()) <= 1024 and stored and emoji.startswith(stored), stored[:20]
    row = rows["realtime event whose tenant is 700 emoji"]
    assert len(row["source_subject"].encode()) <= 1024
    # Refused rows are the message's problem, never an outage that pauses fetching.
    assert svc.find("Postgres unavailable, pausing fetch") == []


# ------------------------------------------------------------------ issue 9, case 3


def test_a_9mb_event_is_too_big_and_fetching_goes_on(lanes: Make) -> None:
    svc = lanes(max_payload=16 * MB)
    run = Run(svc)
    huge = chat_body("huge", last_message={"text": "x" * (9 * 1000 * 1000)})
    run.poison("9 MB realtime event", "v1.chats.upsert.acme", huge, "too_big")
    run.publish()
    # Alone in its fetch: the fetch size must not be computed from it alone.
    wait_until(lambda: svc.consumer_of(*MAIN_CONSUMERS["realtime"])["pending"] == 0)
    big_envelope = envelope("v1.chats.upsert", "globex", json.loads(huge))
    run.poison("9 MB DLQ envelope", "v1.dlq.globex", big_envelope, "too_big")
    run.neighbours("t3")
    run.publish()
    late_event_lands(svc, "t3", tenant="globex")
    run.wait_for_innocents()
    settled_and_ready(svc)
    run.exhausted()


@pytest.mark.parametrize(
    "setting",
    [
        {"NATS_DLQMAXPAYLOADBYTES": str(64 * MB)},
        {"NATS_DLQMAXINFLIGHTBYTES": "1000000"},
    ],
    ids=["max-payload-64MiB", "in-flight-bytes-1MB"],
)
def test_budgets_smaller_than_a_message_still_fetch_everything(
    lanes: Make, setting: dict[str, str]
) -> None:
    svc = lanes(max_payload=16 * MB, **setting)
    run = Run(svc)
    two_mb = {"text": "x" * (2 * 1000 * 1000)}
    run.neighbours("t4", acme=4, globex=2)
    for i in range(3):
        run.innocent(
            "v1.chats.upsert.acme",
            chat_body(f"big-{i}", last_message=two_mb),
            Row("acme", "chats", "chat_id", f"c-big-{i}"),
        )
        payload = valid_payload("v1.chats.upsert", f"bigdlq-{i}", TS)
        run.innocent(
            "v1.dlq.globex",
            envelope("v1.chats.upsert", "globex", {**payload, "last_message": two_mb}),
            Row("globex", "chats", "chat_id", f"c-bigdlq-{i}"),
        )
    run.neighbours("t4b", acme=4, globex=2)
    run.publish()
    run.wait_for_innocents(timeout=30)
    late_event_lands(svc, "t4")
    settled_and_ready(svc)
    assert svc.exhausted() == []


# ------------------------------------------------------------------ issue 9, case 4


def partitions(svc: Service, tenant: str) -> list[str]:
    """The bounds of each partition of the tenant's messages table."""
    return [
        str(r[0])
        for r in svc.query(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent"
            " JOIN pg_namespace n ON n.oid = p.relnamespace"
            " WHERE n.nspname = %s AND p.relname = 'messages'",
            (f"daisi_{tenant}",),
        )
    ]


def months_in_window() -> int:
    last = dt.datetime.fromtimestamp(time.time() + HORIZON, dt.UTC)
    return (last.year - 2009) * 12 + last.month


def test_history_spanning_thousands_of_months_fails_fast_and_partitions_stay_bounded(
    lanes: Make,
) -> None:
    svc = lanes()
    run = Run(svc)
    thousands = big_history("v1.history.messages", "k", 5000, True, WINDOW_START)
    assert len(json.dumps(thousands)) < 900_000
    run.poison(
        "history.messages of 5,000 months",
        "v1.history.messages.acme",
        json.dumps(thousands).encode(),
        "validation",
    )
    run.publish()
    started = time.monotonic()
    # Another tenant's event, published while the history is being handled.
    late_event_lands(svc, "t5", tenant="globex")
    hundred = big_history("v1.history.messages", "h", 100, True, 1262304000)  # from 2010-01
    run.innocent(
        "v1.history.messages.acme",
        json.dumps(hundred).encode(),
        Row("acme", "messages", "message_id", "h0"),
    )
    run.poison(
        "history.messages of 5,000 months in a DLQ envelope",
        "v1.dlq.globex",
        envelope("v1.history.messages", "globex", thousands),
        "validation",
    )
    run.neighbours("t5")
    run.publish()
    run.wait_for_innocents()
    settled_and_ready(svc)
    run.exhausted()
    assert time.monotonic() - started < 30, "the 5,000-month history took its time"
    # The 100-month history, written in full and readable.
    [(count, first, last)] = svc.query(
        "SELECT count(*), min(message_date), max(message_date) FROM daisi_acme.messages"
        " WHERE message_id ~ '^h[0-9]+$'"
    )
    assert count == 100 and first == dt.date(2010, 1, 1), (count, first, last)
    # Partitions: only months inside the window, never more than it has.
    for tenant in ("acme", "globex"):
        bounds = partitions(svc, tenant)
        assert len(bounds) <= months_in_window() + 1, (tenant, len(bounds))
        for b in bounds:
            if b == "DEFAULT":
                continue
            start = re.search(r"FROM \('(\d{4})-(\d{2})-01'\)", b)
            assert start, b
            year, mon = int(start.group(1)), int(start.group(2))
            assert (2009, 1) <= (year, mon) <= _last_month(), b


def _last_month() -> tuple[int, int]:
    last = dt.datetime.fromtimestamp(time.time() + HORIZON, dt.UTC)
    return last.year, last.month


# ------------------------------------------------------------------ issue 9, case 5

UNDECODABLE: list[tuple[str, bytes, str]] = [
    ("empty body", b"", "not_json"),
    ("not JSON", b"chat_id=c1&jid=j", "not_json"),
    (
        "NaN literal",
        b'{"chat_id": "c", "jid": "j", "agent_id": "a", "phone_number": "1", "unread_count": NaN}',
        "not_json",
    ),
    (
        "invalid UTF-8",
        b'{"chat_id": "\xff\xfe", "jid": "j", "agent_id": "a", "phone_number": "1"}',
        "not_json",
    ),
    (
        "lone surrogate",
        b'{"chat_id": "\\ud800", "jid": "j", "agent_id": "a", "phone_number": "1"}',
        "not_json",
    ),
    ("100,000 [", b"[" * 100_000, "too_deep"),
]


def test_undecodable_bodies_keep_their_reason_and_their_bytes(lanes: Make) -> None:
    svc = lanes()
    run = Run(svc)
    for what, body, reason in UNDECODABLE:
        run.poison(f"realtime {what}", "v1.chats.upsert.acme", body, reason, raw=True)
        if reason == "too_deep":
            # An array is not an envelope whatever its depth: nest objects instead.
            what, body = "50,000 nested objects", b'{"a":' * 50_000
        run.poison(f"DLQ message {what}", "v1.dlq.globex", body, reason, raw=True)
    run.neighbours("t6")
    run.poison("historical not JSON", "v1.history.chats.globex", b"{chats: []}", "not_json", True)
    run.poison("historical 100,000 [", "v1.history.messages.acme", b"[" * 100_000, "too_deep", True)
    # Envelopes whose original payload is the hostile part.
    good = envelope("v1.chats.upsert", "acme", "PAYLOAD")
    for what, payload, reason in [
        ("NaN", b'{"chat_id": NaN}', "not_json"),
        ("lone surrogate", b'{"chat_id": "\\ud800"}', "not_json"),
        ("invalid UTF-8", b'{"chat_id": "\xff"}', "not_json"),
        ("100,000 [", b"[" * 100_000, "too_deep"),
    ]:
        body = good.replace(b'"PAYLOAD"', payload)
        run.poison(f"envelope with a {what} payload", "v1.dlq.acme", body, reason, raw=True)
    run.publish()
    late_event_lands(svc, "t6", tenant="globex")
    run.wait_for_innocents()
    settled_and_ready(svc)
    run.exhausted()


# ------------------------------------------------------------------ hypothesis


@pytest.fixture(scope="module")
def hostile_service(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer
) -> Iterator[Service]:
    """One pipeline service for every generated batch of a module."""
    tmp = tmp_path_factory.mktemp("hostile")
    with NatsServer(tmp / "nats") as nats:
        svc = Service(nats.url, fresh_database(pg_server), tmp, **PIPELINE_ENV)
        try:
            yield svc.start()
        finally:
            svc.stop()


HOSTILE = settings(
    max_examples=3,
    deadline=None,
    # Each example costs seconds of a real service: report the first failing
    # batch as drawn rather than shrink it for minutes.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# Every poison issue 9 found, for both tenants, among a valid event of each subject base.
KNOWN_BATCH = [
    *(known_poison(name, "explicit", t) for name in KNOWN_POISONS for t in TENANTS),
    *(
        Message(lane_of(b), f"{b}.{t}", encode(valid_payload(b, f"explicit-{t}", TS)), "event", b)
        for b in BASES
        for t in TENANTS
    ),
]


@HOSTILE
@given(batch=batches())
@example(batch=KNOWN_BATCH)
def test_generated_hostile_batches_all_end_settled(
    hostile_service: Service, batch: list[Message]
) -> None:
    settle_batch(hostile_service, batch)
