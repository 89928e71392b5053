"""Hostile input for the whole pipeline, as hypothesis strategies, and the property
every message must meet: it ends settled and accounted for.

A batch (`batches`) mixes these over the three lanes and two tenants:

- events (`events`): for each subject base of dlqproc.handlers.whatsapp.HANDLERS a
  valid-looking payload with some fields replaced by hostile values (timestamps
  at and past every bound, huge and unicode strings, emoji, NUL, lone
  surrogates, NaN and Infinity literals, deep nesting, wrong types), fields
  dropped or added, histories of up to 5,000 items;
- raw bodies (`raw_bodies`): empty, not JSON, invalid UTF-8, BOMs, deep nesting,
  truncated JSON, random bytes;
- DLQ envelopes (`envelopes`): wrong or invalid company, emoji and huge
  source subjects, odd `ts` offsets, base64 wrappers, missing fields, wrong types;
- the single messages issue 9 found stalling the service (`known_poison`);
- innocent events and envelopes (`innocents`), so that hostile messages always
  have neighbours whose rows must be written.

`settle_batch` publishes a batch through a running service (PIPELINE_ENV) and
checks that every consumer drains, that every message is a row or an exhausted
row, that nothing repeats in the log beyond the retry budget, and that /ready
answers 200.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from hypothesis import note
from hypothesis import strategies as st

from dlqproc.envelope import valid_tenant
from dlqproc.handlers.whatsapp import HANDLERS
from dlqproc.topology import HISTORY_BASES
from support.service import DLQ_STREAM, MAIN_CONSUMERS, Service

TENANTS = ("acme", "globex")
# Subject tokens that are valid for NATS but not as tenants.
BAD_TENANTS = ("x" * 200, "ação", "a$b", "_lead", "ACME-but-" + "y" * 60)
DLQ_SUBJECT = "v1.dlq"

WINDOW_START = 1230768000  # 2009-01-01T00:00:00Z, the earliest timestamp admitted
HORIZON = 7 * 86400  # handlers.timestampHorizon's default
LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z
# Bodies stay below NATS's default max_payload (1 MiB) with room for headers.
MAX_BODY = 1024 * 1024 - 8 * 1024

HISTORY_LIST = {
    "v1.history.chats": "chats",
    "v1.history.messages": "messages",
    "v1.history.contacts": "contacts",
}
# Where a successful event of each base leaves a row: table, key columns.
KEYS: dict[str, tuple[str, tuple[str, ...]]] = {
    "v1.chats.upsert": ("chats", ("chat_id",)),
    "v1.chats.update": ("chats", ("chat_id",)),
    "v1.history.chats": ("chats", ("chat_id",)),
    "v1.messages.upsert": ("messages", ("message_id",)),
    "v1.messages.update": ("messages", ("message_id",)),
    "v1.history.messages": ("messages", ("message_id",)),
    "v1.contacts.upsert": ("contacts", ("chat_id",)),
    "v1.contacts.update": ("contacts", ("phone_number", "agent_id")),
    "v1.history.contacts": ("contacts", ("chat_id",)),
    "v1.connection.update": ("agents", ("agent_id",)),
}
TABLES = ("chats", "messages", "contacts", "agents")
BASES = tuple(sorted(HANDLERS))
assert set(BASES) == set(KEYS), "a new subject base needs its hostile payloads"


# ------------------------------------------------------------------ encoding


class Raw(str):
    """JSON text that goes into a body verbatim (NaN, deep nesting, escapes)."""

    __slots__ = ()

    def __repr__(self) -> str:
        text = str(self)
        return f"Raw({text[:40]!r}{'...' if len(text) > 40 else ''} {len(text)} chars)"


def encode(value: object, ascii_only: bool = True) -> bytes:
    """JSON bytes of `value`, hostile parts included.

    Raw is inserted as is; floats keep Python's NaN/Infinity literals; with
    `ascii_only` strings are \\u-escaped (lone surrogates become "\\ud800"
    escapes), otherwise written as UTF-8 with surrogates passed through (bytes
    that are not valid UTF-8).
    """
    parts: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, Raw):
            parts.append(str(v))
        elif isinstance(v, str):
            parts.append(json.dumps(v, ensure_ascii=ascii_only))
        elif isinstance(v, dict):
            parts.append("{")
            for i, (k, item) in enumerate(v.items()):
                if i:
                    parts.append(",")
                walk(str(k))
                parts.append(":")
                walk(item)
            parts.append("}")
        elif isinstance(v, list | tuple):
            parts.append("[")
            for i, item in enumerate(v):
                if i:
                    parts.append(",")
                walk(item)
            parts.append("]")
        else:  # None, bool, int, float (NaN, Infinity)
            parts.append(json.dumps(v))

    walk(value)
    return "".join(parts).encode("utf-8", "surrogatepass")


def capped(body: bytes) -> bytes:
    """A body NATS accepts: one too big is cut, which leaves it truncated JSON."""
    return body[:MAX_BODY]


@dataclass(frozen=True)
class Message:
    """One message to publish: its lane, subject and body, and where it came from."""

    lane: str  # "realtime", "historical" or "dlq"
    subject: str
    body: bytes
    kind: str = ""  # what made it: "event", "raw", "envelope"
    base: str = ""  # the event's subject base (for DLQ envelopes: the source's)

    def __repr__(self) -> str:
        head = self.body[:160]
        more = f"...+{len(self.body) - 160}B" if len(self.body) > 160 else ""
        return f"Message({self.lane}, {self.subject[:80]!r}, {self.kind}, {head!r}{more})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # How hypothesis prints a failing example: bodies of 500 KB stay short.
        printer.text(repr(self))


def lane_of(base: str) -> str:
    return "historical" if base in HISTORY_BASES else "realtime"


def stream_of(lane: str) -> str:
    return DLQ_STREAM if lane == "dlq" else MAIN_CONSUMERS[lane][0]


# ------------------------------------------------------------------ values


def now() -> int:
    return int(time.time())


_IMPORTED = now()


def _relative(offset: int) -> st.SearchStrategy[int]:
    """Now + offset, read when drawn (a long run must not age its bounds)."""
    return st.builds(lambda: now() + offset)


def timestamps() -> st.SearchStrategy[object]:
    """Unix seconds at and past every bound, and values that are not unix seconds."""
    edges = st.sampled_from(
        [
            0,
            1,
            WINDOW_START - 1,
            WINDOW_START,
            LAST_SECOND - 86400 * 31,
            LAST_SECOND,
            LAST_SECOND + 1,
            2**31 - 1,
            2**31,
            2**53 + 1,
            2**63 - 1,
            2**63,
            2**64,
            -1,
            -(2**63),
            10**30,
            1764400000000,  # milliseconds, not seconds
        ]
    )
    around_now = st.one_of(
        _relative(0),
        _relative(HORIZON - 60),
        _relative(HORIZON + 60),
        _relative(HORIZON + 86400),
        _relative(-86400),
    )
    odd = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([1764400000.5, 1.0e18, -0.0]),
        st.sampled_from(["1764400000", "", "2025-11-29T00:00:00Z", "now"]),
        st.booleans(),
        st.just(Raw("NaN")),
        st.just(Raw("1e999")),
        st.just(Raw("-Infinity")),
    )
    # Bounds fixed at import: a strategy must draw alike when hypothesis replays it.
    inside = st.integers(WINDOW_START, _IMPORTED)
    # The bounds the issue names, drawn more often than the rest.
    bounds = st.sampled_from([LAST_SECOND, WINDOW_START - 1, WINDOW_START, 2**63 - 1])
    return st.one_of(bounds, bounds, edges, around_now, inside, st.integers(-(2**70), 2**70), odd)


def _repeat(unit: str, n: int) -> str:
    return unit * n


def strings() -> st.SearchStrategy[object]:
    """Unicode, emoji, NUL, lone surrogates, bidi marks, huge strings."""
    special = st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\ud800",
            "x\udfff",
            "\ud83d",
            "🙂",
            "👩‍👩‍👧‍👦",
            "ação",
            "\u202eevil",
            "\uffff",
            "\U0010ffff",
            "'; DROP TABLE chats; --",
            '"quoted"',
            "\\u0000",
            "a" * 256,
            "a" * 257,
        ]
    )
    huge = st.builds(
        _repeat,
        st.sampled_from(["x", "🙂", "é", "\x00", "\ud800"]),
        st.sampled_from([255, 256, 257, 1025, 65536, 65537, 70_000]),
    )
    return st.one_of(st.text(max_size=24), special, huge)


def deep(depth: int, opener: str = "[") -> Raw:
    closer = {"[": "]", "{": "}"}[opener]
    if opener == "{":
        return Raw('{"a":' * depth + "1" + closer * depth)
    return Raw(opener * depth + closer * depth)


def raw_values() -> st.SearchStrategy[object]:
    """JSON text no ordinary value encodes to."""
    return st.one_of(
        st.sampled_from(
            [
                Raw("NaN"),
                Raw("Infinity"),
                Raw("-Infinity"),
                Raw('"\\ud800"'),
                Raw('"\\udc00\\ud800"'),
                Raw('"\\u0000"'),
                Raw("1e999"),
                Raw("-0"),
                Raw("123456789012345678901234567890"),
                Raw('{"a": 1, "a": 2}'),
                Raw("[1, 2,]"),
                Raw("tru"),
            ]
        ),
        st.builds(deep, st.sampled_from([64, 500, 1025, 100_000]), st.sampled_from(["[", "{"])),
    )


def wrong_types() -> st.SearchStrategy[object]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        st.just([]),
        st.just({}),
    )


def hostile_values() -> st.SearchStrategy[object]:
    return st.one_of(strings(), wrong_types(), raw_values(), timestamps())


# ------------------------------------------------------------------ events


def _ts(n: int) -> int:
    """An in-window timestamp, distinct per n."""
    return 1764400000 - n * 3607


def valid_payload(base: str, uid: str, ts: int) -> dict[str, Any]:
    """A payload of `base` that the handlers accept (ids derived from `uid`)."""
    chat = {
        "chat_id": f"c-{uid}",
        "jid": f"{uid}@s.whatsapp.net",
        "agent_id": "ag1",
        "phone_number": f"p-{uid}",
        "push_name": "Ann",
        "unread_count": 1,
        "conversation_timestamp": ts,
    }
    message = {
        "message_id": f"m-{uid}",
        "chat_id": f"c-{uid}",
        "jid": f"{uid}@s.whatsapp.net",
        "flow": "IN",
        "agent_id": "ag1",
        "message_text": "hello",
        "status": "sent",
        "key": {"id": f"m-{uid}", "fromMe": False, "remoteJid": f"{uid}@s.whatsapp.net"},
        "message_timestamp": ts,
    }
    contact = {
        "chat_id": f"c-{uid}",
        "phone_number": f"p-{uid}",
        "agent_id": "ag1",
        "push_name": "Ann",
    }
    return {
        "v1.chats.upsert": chat,
        "v1.chats.update": {
            "chat_id": f"c-{uid}",
            "agent_id": "ag1",
            "unread_count": 3,
            "conversation_timestamp": ts + 1,
        },
        "v1.history.chats": {"chats": [chat]},
        "v1.messages.upsert": message,
        "v1.messages.update": {"message_id": f"m-{uid}", "status": "read"},
        "v1.history.messages": {"messages": [message], "agent_id": "ag1"},
        "v1.contacts.upsert": contact,
        "v1.contacts.update": {"phone_number": f"p-{uid}", "agent_id": "ag1", "push_name": "B"},
        "v1.history.contacts": {"contacts": [contact]},
        "v1.connection.update": {"agent_id": f"ag-{uid}", "status": "open", "phone_number": "9"},
    }[base]


def big_history(base: str, uid: str, count: int, months_apart: bool, start: int) -> dict[str, Any]:
    """A history event of `count` small items, in distinct months or all in one.

    Items are kept small: 5,000 of them must fit a NATS message.
    """
    key = HISTORY_LIST[base]
    items: list[dict[str, Any]] = []
    for i in range(count):
        ts = start + i * 2_678_400 if months_apart else start + i  # 31 days apart
        if key == "messages":
            items.append(
                {
                    "message_id": f"{uid}{i}",
                    "chat_id": "c",
                    "jid": "j",
                    "flow": "IN",
                    "message_timestamp": ts,
                }
            )
        elif key == "chats":
            items.append(
                {
                    "chat_id": f"{uid}{i}",
                    "jid": "j",
                    "agent_id": "a",
                    "phone_number": "1",
                    "conversation_timestamp": ts,
                }
            )
        else:
            items.append(
                {"chat_id": f"{uid}{i}", "phone_number": "1", "agent_id": "a", "push_name": "n"}
            )
    out: dict[str, Any] = {key: items}
    if key == "messages":
        out["agent_id"] = "ag1"
    return out


TIMESTAMP_FIELDS = {"conversation_timestamp", "message_timestamp", "unread_count"}


@st.composite
def _mutated(draw: st.DrawFn, obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with up to three fields replaced, dropped or added."""
    obj = dict(obj)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["replace", "replace", "drop", "extra"]))
        keys = sorted(obj)
        if op == "extra" or not keys:
            name = draw(
                st.one_of(st.text(max_size=8), st.sampled_from(["company_id", "__proto__"]))
            )
            obj[name] = draw(hostile_values())
            continue
        name = draw(st.sampled_from(keys))
        if op == "drop":
            del obj[name]
        elif name in TIMESTAMP_FIELDS and draw(st.booleans()):
            obj[name] = draw(timestamps())
        elif name == "company_id" or (name not in TIMESTAMP_FIELDS and draw(st.booleans())):
            obj[name] = draw(st.one_of(strings(), st.sampled_from([*TENANTS, *BAD_TENANTS])))
        else:
            obj[name] = draw(hostile_values())
    return obj


@st.composite
def payloads(draw: st.DrawFn, base: str, uid: str) -> object:
    """A payload of `base`: valid, mutated, a huge history, or not an object at all."""
    shape = draw(
        st.sampled_from(
            ["valid", "timestamps", "timestamps", "mutated", "mutated", "mutated", "big", "other"]
        )
    )
    if shape == "other":
        return draw(hostile_values())
    if shape == "big" and base in HISTORY_LIST:
        count = draw(st.sampled_from([0, 100, 5000, 5001]))
        months_apart = draw(st.booleans())
        start = draw(st.sampled_from([WINDOW_START, WINDOW_START - 1, 1700000000, 0]))
        return big_history(base, uid, count, months_apart, start)
    obj = valid_payload(base, uid, draw(st.sampled_from([_ts(0), _ts(1), WINDOW_START])))
    if shape == "valid":
        return obj
    key = HISTORY_LIST.get(base)
    if shape == "timestamps":
        # Every timestamp of the event (of each item of a history) at or past a bound.
        ts = draw(timestamps())
        for target in obj[key] if key is not None else [obj]:
            for name in TIMESTAMP_FIELDS - {"unread_count"}:
                if name in target:
                    target[name] = ts
        return obj
    if key is not None and draw(st.booleans()):
        # Mutate the items of a history, or add hostile ones.
        items = [draw(_mutated(item)) for item in obj[key]]
        items += draw(st.lists(st.builds(lambda: {}) | wrong_types(), max_size=2))
        return {**obj, key: items}
    return draw(_mutated(obj))


def tenants() -> st.SearchStrategy[str]:
    """Mostly the two real tenants; sometimes a token no schema may be named after."""
    return st.one_of(
        st.sampled_from(TENANTS), st.sampled_from(TENANTS), st.sampled_from(BAD_TENANTS)
    )


@st.composite
def events(draw: st.DrawFn, tag: str) -> Message:
    """A hostile event published on its main lane."""
    base = draw(st.sampled_from(BASES))
    uid = f"{tag}-{draw(st.integers(0, 3))}"  # a few ids per batch: updates find rows
    payload = draw(payloads(base, uid))
    body = capped(encode(payload, ascii_only=draw(st.booleans())))
    return Message(lane_of(base), f"{base}.{draw(tenants())}", body, "event", base)


def raw_bodies() -> st.SearchStrategy[bytes]:
    """Bodies that are not one well-formed JSON value."""
    return st.one_of(
        st.sampled_from(
            [
                b"",
                b" ",
                b"not json",
                b"NaN",
                b'{"chat_id": NaN}',
                b'{"chat_id": "\\ud800"}',
                b'{"chat_id": "\xff\xfe"}',
                b"\xef\xbb\xbf{}",  # a UTF-8 BOM
                '{"a": 1}'.encode("utf-16"),
                b'{"a": 1} trailing',
                b'{"a": ',
                b"\x00" * 16,
                b"[" * 100_000,
                b'{"a":' * 50_000,
                b"x" * (MAX_BODY - 1),
            ]
        ),
        st.binary(max_size=64),
    )


@st.composite
def raw_messages(draw: st.DrawFn) -> Message:
    lane = draw(st.sampled_from(["realtime", "historical", "dlq"]))
    tenant = draw(tenants())
    if lane == "dlq":
        return Message(lane, f"{DLQ_SUBJECT}.{tenant}", draw(raw_bodies()), "raw")
    base = draw(st.sampled_from([b for b in BASES if lane_of(b) == lane]))
    return Message(lane, f"{base}.{tenant}", draw(raw_bodies()), "raw", base)


def odd_ts() -> st.SearchStrategy[object]:
    """Envelope `ts` values: offsets PostgreSQL cannot store, non-dates, wrong types."""
    unstorable = st.sampled_from(  # offsets timestamptz refuses
        [
            "2025-11-29T00:00:00+20:00",
            "2025-11-29T00:00:00+05:30:15.123456",
            "2025-11-29T00:00:00-23:59",
        ]
    )
    return st.one_of(
        st.builds(lambda: datetime.now(UTC).isoformat()),
        unstorable,
        st.sampled_from(
            [
                "2025-11-29T00:00:00-23:59",
                "2025-11-29T00:00:00+15:59",
                "2025-11-29T00:00:00Z",
                "2025-11-29 00:00:00",
                "0001-01-01T00:00:00+14:00",
                "9999-12-31T23:59:59-14:00",
                "2025-13-01T00:00:00Z",
                "2025-11-29T24:00:00Z",
                "2025-11-29T00:00:00\x00",
                "garbage",
                "",
            ]
        ),
        wrong_types(),
    )


def source_subjects(base: str, tenant: str) -> st.SearchStrategy[object]:
    good = f"{base}.{tenant}"
    return st.one_of(
        st.just(good),
        st.just(good),
        st.sampled_from(
            [
                "🙂" * 1100,
                "x" * 5000,
                f"{base}.{'🙂' * 300}",
                f"{base}.other",
                f"{good}.extra",
                base,
                "v1.nosuch.acme",
                "",
                f"{good}\x00",
            ]
        ),
        strings(),
        wrong_types(),
    )


@st.composite
def envelopes(draw: st.DrawFn, tag: str) -> Message:
    """A hostile DLQ envelope, published straight to the DLQ stream."""
    base = draw(st.sampled_from(BASES))
    tenant = draw(st.sampled_from(TENANTS))
    uid = f"{tag}-{draw(st.integers(0, 3))}"
    payload = draw(payloads(base, uid))
    wrapper = draw(st.sampled_from(["plain", "plain", "plain", "base64", "base64-raw", "junk"]))
    original: object = payload
    if wrapper == "base64":
        original = {"base64": base64.b64encode(encode(payload)).decode()}
    elif wrapper == "base64-raw":
        original = {"base64": base64.b64encode(draw(raw_bodies())[:200_000]).decode()}
    elif wrapper == "junk":
        original = {"base64": draw(st.sampled_from(["!!!", "", "=", "a" * 5]))}
    env: dict[str, object] = {
        "source_subject": draw(source_subjects(base, tenant)),
        "company": draw(
            st.one_of(st.just(tenant), st.just(tenant), st.sampled_from([*TENANTS, *BAD_TENANTS]))
        ),
        "original_payload": original,
        "error": "failed in main consumer",
        "error_type": draw(st.sampled_from(["retryable", "fatal", "", "🙂"])),
        "retry_count": draw(st.one_of(st.integers(0, 5), wrong_types())),
        "max_retry": 5,
        "ts": draw(odd_ts()),
    }
    for name in draw(st.lists(st.sampled_from(sorted(env)), max_size=2, unique=True)):
        if draw(st.booleans()):
            del env[name]
        else:
            env[name] = draw(hostile_values())
    subject_tenant = draw(st.one_of(st.just(tenant), st.just(tenant), tenants()))
    body = capped(encode(env, ascii_only=draw(st.booleans())))
    return Message("dlq", f"{DLQ_SUBJECT}.{subject_tenant}", body, "envelope", base)


KNOWN_POISONS = (
    "message of Dec 9999",
    "envelope ts +20:00",
    "envelope ts +05:30:15.123456",
    "envelope source_subject of 1,100 emoji",
    "history of 5,000 months",
    "100,000 [",
    "empty body",
)


def known_poison(name: str, tag: str, tenant: str) -> Message:
    """A single message that issue 9 found stalling or looping the service."""
    uid = f"{tag}-known"
    dlq = f"{DLQ_SUBJECT}.{tenant}"
    if name == "message of Dec 9999":
        message = {
            **valid_payload("v1.messages.upsert", uid, _ts(0)),
            "message_timestamp": LAST_SECOND,
        }
        return Message(
            "realtime",
            f"v1.messages.upsert.{tenant}",
            encode(message),
            "known",
            "v1.messages.upsert",
        )
    if name == "history of 5,000 months":
        months = big_history("v1.history.messages", f"{uid}-", 5000, True, WINDOW_START)
        subject = f"v1.history.messages.{tenant}"
        return Message("historical", subject, encode(months), "known", "v1.history.messages")
    if name == "100,000 [":
        return Message("realtime", f"v1.chats.upsert.{tenant}", b"[" * 100_000, "known")
    if name == "empty body":
        return Message("realtime", f"v1.chats.upsert.{tenant}", b"", "known")
    no_jid = {k: v for k, v in valid_payload("v1.chats.upsert", uid, _ts(0)).items() if k != "jid"}
    env: dict[str, object] = {
        "source_subject": f"v1.chats.upsert.{tenant}",
        "company": tenant,
        "original_payload": no_jid,
        "error": "failed in main consumer",
        "error_type": "fatal",
        "retry_count": 1,
        "max_retry": 5,
        "ts": datetime.now(UTC).isoformat(),
    }
    if name == "envelope source_subject of 1,100 emoji":
        env["source_subject"] = "🙂" * 1100
    else:
        env["ts"] = "2025-11-29T00:00:00" + name.rpartition(" ")[2]
    return Message("dlq", dlq, encode(env), "known", "v1.chats.upsert")


@st.composite
def innocents(draw: st.DrawFn, tag: str) -> Message:
    """A valid event of a real tenant, on its main lane or in a DLQ envelope."""
    base = draw(st.sampled_from(BASES))
    tenant = draw(st.sampled_from(TENANTS))
    payload = valid_payload(base, f"{tag}-{draw(st.integers(0, 3))}", _ts(draw(st.integers(0, 9))))
    if draw(st.booleans()):
        return Message(lane_of(base), f"{base}.{tenant}", encode(payload), "innocent", base)
    env = {
        "source_subject": f"{base}.{tenant}",
        "company": tenant,
        "original_payload": payload,
        "error": "failed in main consumer",
        "error_type": "retryable",
        "retry_count": 5,
        "max_retry": 5,
        "ts": datetime.now(UTC).isoformat(),
    }
    return Message("dlq", f"{DLQ_SUBJECT}.{tenant}", encode(env), "innocent", base)


@st.composite
def batches(draw: st.DrawFn, min_size: int = 12, max_size: int = 18) -> list[Message]:
    """~15 hostile messages over the three lanes and two tenants, ids unique to the batch.

    One in twelve is a message issue 9 found stalling the service, so that each
    batch has a fair chance to carry one among its hostile neighbours.
    """
    tag = draw(st.uuids()).hex[:10]
    kinds = st.sampled_from(
        ["event"] * 4 + ["envelope"] * 4 + ["raw"] * 2 + ["known"] + ["innocent"] * 3
    )
    out = []
    for _ in range(draw(st.integers(min_size, max_size))):
        kind = draw(kinds)
        if kind == "innocent":
            out.append(draw(innocents(tag)))
        elif kind == "event":
            out.append(draw(events(tag)))
        elif kind == "envelope":
            out.append(draw(envelopes(tag)))
        elif kind == "raw":
            out.append(draw(raw_messages()))
        else:
            name = draw(st.sampled_from(KNOWN_POISONS))
            out.append(known_poison(name, tag, draw(st.sampled_from(TENANTS))))
    return out


# ------------------------------------------------------------------ the property


@dataclass
class Evidence:
    """What the tenant schemas hold: the (stream, seq) of each row's last writer."""

    svc: Service
    writers: dict[str, set[tuple[str, int]]] = field(default_factory=dict)

    def _writers(self, tenant: str) -> set[tuple[str, int]]:
        if tenant not in self.writers:
            found: set[tuple[str, int]] = set()
            for table in TABLES:
                try:
                    rows = self.svc.query(
                        f"SELECT last_metadata->>'stream', last_metadata->>'stream_seq'"
                        f" FROM daisi_{tenant}.{table}"
                    )
                except psycopg.errors.UndefinedTable:
                    continue
                found |= {(str(s), int(q)) for s, q in rows if s is not None and q is not None}
            self.writers[tenant] = found
        return self.writers[tenant]

    def _has_key(self, tenant: str, base: str, payload: object) -> bool:
        table, cols = KEYS[base]
        if not isinstance(payload, dict):
            return False
        key = HISTORY_LIST.get(base)
        if key is not None:
            items = payload.get(key)
            if not isinstance(items, list):
                return False
            if not items:
                return True  # a valid empty history writes nothing
            payload = items[0]
            if not isinstance(payload, dict):
                return False
        values = [payload.get(c) for c in cols]
        if not all(isinstance(v, str) for v in values):
            return False
        where = " AND ".join(f"{c} = %s" for c in cols)
        try:
            return bool(
                self.svc.query(
                    f"SELECT 1 FROM daisi_{tenant}.{table} WHERE {where} LIMIT 1",
                    tuple(values),
                )
            )
        except (psycopg.errors.UndefinedTable, psycopg.DataError, ValueError):
            return False

    def succeeded(
        self, tenant: str, stream: str, seq: int, base: str, body: bytes | object
    ) -> bool:
        """Rows show the message committed: written by it, or its key's row is there."""
        if not valid_tenant(tenant):
            return False
        if (stream, seq) in self._writers(tenant):
            return True
        payload = strict_json(body) if isinstance(body, bytes) else body
        if isinstance(payload, dict) and set(payload) == {"base64"}:
            try:
                payload = strict_json(base64.b64decode(str(payload["base64"]), validate=True))
            except ValueError:
                return False
        return base in KEYS and self._has_key(tenant, base, payload)


_NOT_JSON = object()


def strict_json(body: bytes) -> object:
    """`body` decoded as strictly as the service does (no NaN, no lone surrogates)."""
    try:
        return msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return _NOT_JSON


def _envelope_of(body: bytes) -> dict[str, Any] | None:
    env = strict_json(body)
    return env if isinstance(env, dict) else None


def account(
    svc: Service, batch: Sequence[Message], seqs: Sequence[int]
) -> tuple[list[str], Counter[str]]:
    """Every message is a row or an exhausted row: what is not, described, and how
    the others ended, counted."""
    exhausted = {(r["dlq_stream"], r["dlq_sequence"]): r for r in svc.exhausted()}
    dead = svc.dead_letters()
    evidence = Evidence(svc)
    problems = []
    ended: Counter[str] = Counter()
    for m, seq in zip(batch, seqs, strict=True):
        stream = stream_of(m.lane)
        tenant = m.subject.rpartition(".")[2]
        if (stream, seq) in exhausted:
            ended["exhausted" if m.lane == "dlq" else "exhausted without a DLQ message"] += 1
        elif m.lane == "dlq":
            env = _envelope_of(m.body)
            source = str(env.get("source_subject", "")) if env else ""
            base = source.rpartition(".")[0]
            if env is not None and evidence.succeeded(
                tenant, stream, seq, base, env.get("original_payload")
            ):
                ended["written"] += 1
            else:
                problems.append(f"DLQ seq {seq} is neither exhausted nor written: {m!r}")
        elif (letter := dead.get(f"dlq-{stream}-{seq}")) is not None:
            if (DLQ_STREAM, letter["_seq"]) in exhausted:
                ended["dead-lettered, exhausted"] += 1
            elif evidence.succeeded(tenant, DLQ_STREAM, letter["_seq"], m.base, m.body):
                ended["dead-lettered, written"] += 1
            else:
                problems.append(
                    f"{stream} seq {seq} was dead-lettered as DLQ seq {letter['_seq']},"
                    f" which is neither exhausted nor written: {m!r}"
                )
        elif evidence.succeeded(tenant, stream, seq, m.base, m.body):
            ended["written"] += 1
        else:
            problems.append(f"{stream} seq {seq} is not written, dead-lettered or exhausted: {m!r}")
    return problems, ended


# Log lines that must never appear, and those bounded by a retry budget.
NEVER = (
    "commit failed unexpectedly",
    "Postgres unavailable, pausing fetch",  # a refused row is not an outage
)


def budgets(svc: Service) -> dict[str, int]:
    """Lines each message may log at most, from the service's settings."""
    env = svc.env
    return {
        # A NAK after each delivery but the last of the budget.
        "Retrying DLQ message with backoff": int(env.get("NATS_DLQMAXRETRIES", "5")) - 1,
        "Event processing failed, retrying with backoff": max(
            int(env.get("NATS_REALTIME_MAXDELIVER", "5")),
            int(env.get("NATS_HISTORICAL_MAXDELIVER", "3")),
        )
        - 1,
        "Published event to DLQ": 1,
    }


def log_problems(svc: Service) -> list[str]:
    """Lines that should not be there, or repeat more than a budget allows."""
    problems = [
        f"{e.get('msg')!r} for {e.get('subject')!r} seq {e.get('stream_seq')}"
        for text in NEVER
        for e in svc.find_containing(text)
    ]
    for msg, limit in budgets(svc).items():
        for (subject, seq), n in svc.repeats(msg, limit).items():
            problems.append(f"{msg!r} {n} times (budget {limit}) for {subject[:80]!r} seq {seq}")
    return problems


def publish_batch(svc: Service, batch: Sequence[Message]) -> list[int]:
    return svc.publish_each((m.subject, m.body) for m in batch)


def settle_batch(
    svc: Service, batch: Sequence[Message], timeout: float = 45.0
) -> tuple[float, Counter[str]]:
    """Publish `batch` through `svc` and check that each message ends settled.

    Returns the seconds it took to drain, and how the messages ended.
    """
    started = time.monotonic()
    seqs = publish_batch(svc, batch)
    note(f"published at sequences {seqs}")
    svc.wait_drained(timeout)
    drained = time.monotonic() - started
    problems, ended = account(svc, batch, seqs)
    note(f"drained in {drained:.1f}s: {dict(ended)}")
    problems += log_problems(svc)
    assert not problems, "\n".join(problems)
    svc.wait_ready(15)
    return drained, ended
