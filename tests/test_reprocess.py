"""reprocess(): one DLQ delivery in, one classified Outcome out, never an exception."""

from __future__ import annotations

import base64
import json
import math
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlqproc.envelope import build, classify_json
from dlqproc.handlers import Registry, load
from dlqproc.model import (
    Delivery,
    Event,
    Failed,
    FailureKind,
    Lane,
    Ok,
    Outcome,
    PermanentError,
    Reason,
    RowOp,
    TransientError,
)
from dlqproc.reprocess import MAX_TS_CHARS, Limits, _timestamp, handle, not_after, reprocess
from dlqproc.rows import encode

DEMO = load("dlqproc.handlers.demo")
LIMITS = Limits("v1.dlq", 1 << 20)
TS = "2024-05-01T10:00:00Z"


def _body(payload: Any = None, **fields: Any) -> bytes:
    env: dict[str, Any] = {
        "source_subject": "demo.ok.acme",
        "company": "acme",
        "original_payload": {"id": "e1", "text": "hello"} if payload is None else payload,
        "error": "db down",
        "error_type": "retryable",
        "retry_count": 5,
        "max_retry": 5,
        "ts": TS,
    }
    env.update(fields)
    return json.dumps(env).encode()


def _run(
    data: bytes,
    subject: str = "v1.dlq.acme",
    n: int = 1,
    registry: Registry = DEMO,
    limits: Limits = LIMITS,
) -> Outcome:
    return reprocess(Delivery(7, subject, data, n), registry, limits)


def _failed(out: Outcome, kind: FailureKind, reason: Reason) -> None:
    assert isinstance(out, Failed) and out.ok is False
    assert out.kind is kind
    assert out.reason is reason
    assert out.error


def test_demo_ok_is_one_upsert() -> None:
    data = _body()
    out = _run(data)
    assert out.ok is True
    assert out.token == 7
    assert isinstance(out, Ok)
    assert out.base == "demo.ok"
    assert out.rows == encode(
        (
            RowOp(
                op="upsert",
                table="demo_events",
                key=("id",),
                values={"id": "e1", "company_id": "acme", "text": "hello"},
            ),
        ),
    )
    assert out.handler_seconds >= 0
    s = out.stored
    assert s.company_id == "acme"
    assert s.source_subject == "demo.ok.acme"
    assert s.envelope_json == data
    assert s.original_json is not None
    assert json.loads(s.original_json) == {"id": "e1", "text": "hello"}
    assert s.event_timestamp is not None
    assert datetime.fromisoformat(s.event_timestamp) == datetime.fromisoformat(
        "2024-05-01T10:00:00+00:00"
    )


@pytest.mark.parametrize(("n", "ok"), [(1, False), (2, False), (3, True), (4, True), (12, True)])
def test_demo_flaky_fails_fail_times_deliveries(n: int, ok: bool) -> None:
    data = _body({"id": "f1", "fail_times": 2}, source_subject="demo.flaky.acme")
    out = _run(data, n=n)
    if ok:
        assert out.ok is True
        assert len(out.rows) == 1
        assert msgspec.json.decode(out.rows[0].rows[0])["id"] == "f1"
    else:
        _failed(out, FailureKind.TRANSIENT, Reason.HANDLER_ERROR)
        assert out.base == "demo.flaky"
        assert out.stored.envelope_json == data


def test_demo_update_is_an_update_row() -> None:
    out = _run(_body({"id": "u1", "text": "t"}, source_subject="demo.update.acme"))
    assert out.ok is True
    assert [r.op for r in out.rows] == ["update"]


@pytest.mark.parametrize("payload", [{"id": 1}, [], "text", 0, {"text": "no id"}])
def test_demo_bad_payload_is_permanent_validation(payload: Any) -> None:
    out = _run(_body(payload))
    _failed(out, FailureKind.PERMANENT, Reason.VALIDATION)
    assert out.base == "demo.ok"


def test_null_payload_reaches_the_handler_as_null() -> None:
    out = _run(_body(None, original_payload=None))
    _failed(out, FailureKind.PERMANENT, Reason.VALIDATION)
    assert out.stored.original_json == b"null"


def test_unknown_subject_base() -> None:
    data = _body(source_subject="v1.nothing.here.acme")
    out = _run(data)
    _failed(out, FailureKind.PERMANENT, Reason.UNKNOWN_SUBJECT)
    assert out.base == "v1.nothing.here"
    assert out.stored.envelope_json == data
    assert out.stored.company_id == "acme"


@pytest.mark.parametrize(
    ("subject", "company"),
    [
        ("v1.dlq.acme", "acme"),
        ("v1.dlq.Other-1", "Other-1"),
        ("weird", "_invalid"),
        ("v1.dlq.a.b", "_invalid"),
    ],
)
@pytest.mark.parametrize("data", [b"\xffgarbage", b"not json", b"", b"{"])
def test_garbage_is_permanent_not_json_stored_bare(subject: str, company: str, data: bytes) -> None:
    out = _run(data, subject=subject)
    _failed(out, FailureKind.PERMANENT, Reason.NOT_JSON)
    s = out.stored
    assert s.envelope_json is None
    assert s.original_json is None
    assert s.event_timestamp is None
    assert s.company_id == company
    assert s.source_subject == subject
    assert out.base == ""


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"[1, 2]", Reason.BAD_ENVELOPE),
        (b'{"company": "acme"}', Reason.BAD_ENVELOPE),
        (_body(company='a";DROP SCHEMA x;--'), Reason.INVALID_TENANT),
        (b"[" * 100_000 + b"]" * 100_000, Reason.BAD_ENVELOPE),
    ],
)
def test_bad_envelope_is_permanent_and_stored_bare(data: bytes, reason: Reason) -> None:
    out = _run(data)
    _failed(out, FailureKind.PERMANENT, reason)
    assert out.stored.company_id == "acme"
    assert out.stored.envelope_json is None


def test_too_big() -> None:
    data = _body()
    out = _run(data, limits=Limits("v1.dlq", len(data) - 1))
    _failed(out, FailureKind.PERMANENT, Reason.TOO_BIG)
    assert _run(data, limits=Limits("v1.dlq", len(data))).ok is True


def test_deep_original_payload_is_too_deep() -> None:
    data = (
        b'{"source_subject":"demo.ok.acme","company":"acme","original_payload":'
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}"
    )
    _failed(_run(data), FailureKind.PERMANENT, Reason.TOO_DEEP)


def test_envelope_company_differs_from_dlq_tenant() -> None:
    data = _body(source_subject="demo.ok.acme", company="acme")
    out = _run(data, subject="v1.dlq.other")
    _failed(out, FailureKind.PERMANENT, Reason.INVALID_TENANT)
    assert out.rows == ()
    # stored under the envelope's own tenant, never written as rows anywhere
    assert out.stored.company_id == "acme"
    assert out.stored.envelope_json == data


def test_dlq_tenant_match_is_case_sensitive() -> None:
    out = _run(_body(), subject="v1.dlq.ACME")
    _failed(out, FailureKind.PERMANENT, Reason.INVALID_TENANT)


@pytest.mark.parametrize(
    "source", ["demo.ok.other", "acme", "demo.ok", "demo.ok.acme.x", ".acme", "demo.ok.ACME"]
)
def test_source_subject_not_ending_with_tenant(source: str) -> None:
    out = _run(_body(source_subject=source))
    _failed(out, FailureKind.PERMANENT, Reason.UNKNOWN_SUBJECT)
    assert out.stored.source_subject == source


def test_other_dlq_prefix_uses_the_envelope() -> None:
    out = _run(_body(), subject="v2.dead.acme", limits=Limits("v2.dead", 1 << 20))
    assert out.ok is True
    out = _run(_body(), subject="v2.dead.other", limits=Limits("v2.dead", 1 << 20))
    _failed(out, FailureKind.PERMANENT, Reason.INVALID_TENANT)


# --- custom registries --------------------------------------------------------------


def _registry(handler: Any) -> Registry:
    return Registry("x", {"x.do": handler}, ())


def _x_body(payload: Any = None) -> bytes:
    return _body({"a": 1} if payload is None else payload, source_subject="x.do.acme")


def test_handler_sees_the_event() -> None:
    seen: list[Event] = []

    def handler(event: Event) -> list[RowOp]:
        seen.append(event)
        return [RowOp("upsert", "t", ("k",), {"k": 1}), RowOp("update", "t", ("k",), {"k": 2})]

    before = time.time()
    out = _run(_x_body({"a": [1, 2]}), n=4, registry=_registry(handler))
    after = time.time()
    assert out.ok is True
    assert isinstance(out.rows, tuple) and len(out.rows) == 2
    (ev,) = seen
    assert ev == Event(
        subject="x.do.acme",
        base="x.do",
        tenant="acme",
        payload=b'{"a": [1, 2]}',
        attempt=4,
        not_after=ev.not_after,
    )
    # The worker's clock plus the default horizon of 7 days.
    assert int(before) + 7 * 86400 <= ev.not_after <= after + 7 * 86400


def test_handler_plain_exception_is_transient_handler_error() -> None:
    def handler(event: Event) -> list[RowOp]:
        raise ValueError("kaput")

    out = _run(_x_body(), registry=_registry(handler))
    _failed(out, FailureKind.TRANSIENT, Reason.HANDLER_ERROR)
    assert "ValueError" in out.error and "kaput" in out.error
    assert out.base == "x.do"
    assert out.stored.envelope_json is not None


def test_handler_returning_garbage_is_transient_handler_error() -> None:
    out = _run(_x_body(), registry=_registry(lambda event: None))
    _failed(out, FailureKind.TRANSIENT, Reason.HANDLER_ERROR)


def test_handler_recursion_error_is_permanent_too_deep() -> None:
    def handler(event: Event) -> list[RowOp]:
        raise RecursionError("maximum recursion depth exceeded")

    out = _run(_x_body(), registry=_registry(handler))
    _failed(out, FailureKind.PERMANENT, Reason.TOO_DEEP)


def test_handler_real_recursion_is_permanent_too_deep() -> None:
    def handler(event: Event) -> list[RowOp]:
        def down(n: int) -> int:
            return down(n + 1) + 1

        down(0)
        return []

    out = _run(_x_body(), registry=_registry(handler))
    _failed(out, FailureKind.PERMANENT, Reason.TOO_DEEP)


@pytest.mark.parametrize(
    ("exc", "kind", "reason"),
    [
        (PermanentError("no"), FailureKind.PERMANENT, Reason.VALIDATION),
        (PermanentError("no", Reason.INVALID_TENANT), FailureKind.PERMANENT, Reason.INVALID_TENANT),
        (TransientError("later"), FailureKind.TRANSIENT, Reason.HANDLER_ERROR),
        (TransientError("later", Reason.NOT_FOUND), FailureKind.TRANSIENT, Reason.NOT_FOUND),
    ],
)
def test_handler_errors_keep_their_classification(
    exc: Exception, kind: FailureKind, reason: Reason
) -> None:
    def handler(event: Event) -> list[RowOp]:
        raise exc

    _failed(_run(_x_body(), registry=_registry(handler)), kind, reason)


def test_long_error_text_is_truncated() -> None:
    def handler(event: Event) -> list[RowOp]:
        raise ValueError("x" * 100_000)

    out = _run(_x_body(), registry=_registry(handler))
    assert 0 < len(out.error) <= 2000


# --- ts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01T10:00:00.123456+02:00", "2024-05-01T08:00:00.123456+00:00"),
        ("2024-05-01T10:00:00-03:30", "2024-05-01T13:30:00+00:00"),
        # Offsets PostgreSQL refuses but Python parses: folded into UTC.
        ("2024-05-01T10:00:00+20:00", "2024-04-30T14:00:00+00:00"),
        ("2024-05-01T10:00:00+05:30:15.123456", "2024-05-01T04:29:44.876544+00:00"),
        # Naive: taken as UTC.
        ("2024-05-01T10:00:00", "2024-05-01T10:00:00+00:00"),
        ("2024-05-01", "2024-05-01T00:00:00+00:00"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00+00:00"),
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999+00:00"),
        ("0001-01-01T00:00:00-01:00", "0001-01-01T01:00:00+00:00"),
        # Their UTC form leaves years 1..9999 (OverflowError).
        ("0001-01-01T00:00:00+01:00", None),
        ("9999-12-31T23:00:00-05:00", None),
        ("garbage", None),
        ("", None),
        ("+20:00", None),
        ("2024-13-01T00:00:00Z", None),
        ("2024-02-30T00:00:00Z", None),
        ("2024-05-01T10:00:60Z", None),
        ("2024-05-01T10:00:00+24:00", None),
        ("12345", None),
        ("2024-05-01T10:00:00Z" + " " * 100, None),
        ("2024-05-01T10:00:00." + "1" * 50 + "Z", None),  # parseable, but over the cap
        ("\ud800", None),
        (None, None),
    ],
)
def test_ts_is_utc_when_valid_and_none_when_garbage(ts: str | None, expected: str | None) -> None:
    assert _timestamp(ts) == expected
    if ts is None or "\ud800" not in ts:  # an envelope cannot carry a lone surrogate
        out = _run(_body(ts=ts))
        assert out.ok is True
        assert out.stored.event_timestamp == expected


def test_ts_longer_than_the_cap_is_refused_before_parsing() -> None:
    ts = "2024-05-01T10:00:00+00:00"
    padded = ts[:19] + "." + "0" * (MAX_TS_CHARS - len(ts) - 1) + ts[19:]
    assert len(padded) == MAX_TS_CHARS
    assert _timestamp(padded) == "2024-05-01T10:00:00+00:00"
    assert _timestamp(padded[:20] + "0" + padded[20:]) is None
    assert _timestamp("9" * 10_000_000) is None


def _utc(ts: str | None) -> datetime | None:
    if ts is None:
        return None
    parsed = datetime.fromisoformat(ts)
    assert ts.endswith("+00:00")
    assert parsed.utcoffset() == timedelta(0)
    assert 1 <= parsed.year <= 9999
    return parsed


@given(value=st.text(st.characters(codec=None, exclude_categories=()), max_size=80))
def test_ts_of_any_string_is_none_or_aware_utc(value: str) -> None:
    _utc(_timestamp(value))


@given(
    when=st.datetimes(),
    # CPython 3.11 reads "+00:00:00.5" as UTC: a sub-second offset needs a whole
    # second beside it to be parsed, and no producer sends one anyway.
    offset=st.integers(min_value=-86399 * 10**6, max_value=86399 * 10**6).filter(
        lambda us: us == 0 or abs(us) >= 10**6
    ),
    naive=st.booleans(),
    sep=st.sampled_from(["T", " "]),
)
def test_ts_is_the_same_instant_in_utc(when: datetime, offset: int, naive: bool, sep: str) -> None:
    zone = timezone(timedelta(microseconds=offset))
    text = when.isoformat(sep) if naive else when.replace(tzinfo=zone).isoformat(sep)
    out = _utc(_timestamp(text))
    try:
        instant = when.replace(tzinfo=UTC if naive else zone).astimezone(UTC)
    except OverflowError:
        assert out is None
    else:
        assert out == instant


def test_missing_ts_is_none() -> None:
    data = json.dumps(
        {"source_subject": "demo.ok.acme", "company": "acme", "original_payload": {"id": "1"}}
    ).encode()
    assert _run(data).stored.event_timestamp is None


# --- hypothesis ------------------------------------------------------------------------

_outcomes = msgspec.msgpack.Decoder(list[Outcome])
_encoder = msgspec.msgpack.Encoder()


def _check(out: Outcome, delivery: Delivery) -> None:
    assert out.token == delivery.token
    if out.ok:
        assert out.kind is None and out.reason is None
        assert out.stored.envelope_json == delivery.data
    else:
        assert isinstance(out.kind, FailureKind)
        assert isinstance(out.reason, Reason)
        assert out.rows == ()
        assert len(out.error) <= 2000
    _utc(out.stored.event_timestamp)
    # the outcome crosses the worker pipe as msgpack
    assert _outcomes.decode(_encoder.encode([out])) == [out]


@given(
    data=st.binary(max_size=1000),
    subject=st.text(max_size=60),
    n=st.integers(min_value=0, max_value=10**6),
    token=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_reprocess_never_raises_for_arbitrary_bytes_and_subjects(
    data: bytes, subject: str, n: int, token: int
) -> None:
    delivery = Delivery(token, subject, data, n)
    out = reprocess(delivery, DEMO, LIMITS)
    _check(out, delivery)
    assert out.ok is False


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
tenants = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True) | st.text(max_size=12)
bases = st.sampled_from(["demo.ok", "demo.flaky", "demo.update", "nope"]) | st.text(max_size=12)


@settings(max_examples=200)
@given(
    tenant=tenants,
    dlq_tenant=tenants,
    base=bases,
    payload=json_values
    | st.fixed_dictionaries(
        {"id": st.text(max_size=10)},
        optional={"text": st.text(max_size=10), "fail_times": st.integers(-5, 5)},
    ),
    ts=st.none() | st.text(max_size=40) | st.datetimes().map(lambda d: d.isoformat()),
    n=st.integers(min_value=1, max_value=20),
)
def test_reprocess_never_raises_for_structured_envelopes(
    tenant: str, dlq_tenant: str, base: str, payload: Any, ts: str | None, n: int
) -> None:
    data = json.dumps(
        {
            "source_subject": f"{base}.{tenant}",
            "company": tenant,
            "original_payload": payload,
            "ts": ts,
        }
    ).encode()
    delivery = Delivery(1, f"v1.dlq.{dlq_tenant}", data, n)
    out = reprocess(delivery, DEMO, LIMITS)
    _check(out, delivery)
    if out.ok:
        assert out.stored.company_id == tenant
        assert all(
            msgspec.json.decode(row).get("company_id", tenant) == tenant
            for block in out.rows
            for row in block.rows
        )
        assert base in DEMO.handlers


# --- main lanes: the body is the event -------------------------------------------------

DEEP = 100_000
HOSTILE: list[tuple[bytes, Reason, str]] = [
    (b"", Reason.NOT_JSON, "empty"),
    (b"NaN", Reason.NOT_JSON, "NaN"),
    (b'{"id": "e1", "n": Infinity}', Reason.NOT_JSON, "Infinity"),
    (b"\xff\xfe", Reason.NOT_JSON, "invalid character"),
    (b'["\xff\xfe"]', Reason.NOT_JSON, "invalid UTF-8 at byte 2"),
    (b'{"id": "\xed\xa0\x80"}', Reason.NOT_JSON, "UTF-8"),
    (b'{"id": "e1"} trailing', Reason.NOT_JSON, "trailing"),
    (b'{"id": "\\ud800"}', Reason.NOT_JSON, "lone UTF-16 surrogate escape \\ud800"),
    (b'{"id": "e1", "text": "\\udc00"}', Reason.NOT_JSON, "surrogate"),
    (b"[" * DEEP + b"]" * DEEP, Reason.TOO_DEEP, "nests too deeply"),
    (b'{"id": "e1", "x": ' + b"[" * DEEP, Reason.TOO_DEEP, "nests too deeply"),
]


def _spy() -> tuple[Registry, list[Event]]:
    seen: list[Event] = []

    def handler(event: Event) -> list[RowOp]:
        seen.append(event)
        return [RowOp("upsert", "t", ("k",), {"k": 1})]

    return Registry("x", {"x.do": handler}, ()), seen


def _main(
    data: bytes,
    lane: Lane = Lane.REALTIME,
    registry: Registry = DEMO,
    subject: str = "demo.ok.acme",
) -> Outcome:
    return handle(Delivery(9, subject, data, 1, lane=lane), registry, LIMITS)


@pytest.mark.parametrize("lane", [Lane.REALTIME, Lane.HISTORICAL])
@pytest.mark.parametrize(("data", "reason", "text"), HOSTILE)
def test_main_lane_classifies_the_body_before_any_handler(
    lane: Lane, data: bytes, reason: Reason, text: str
) -> None:
    registry, seen = _spy()
    out = _main(data, lane, registry, "x.do.acme")
    _failed(out, FailureKind.PERMANENT, reason)
    assert text in out.error
    assert seen == []
    assert out.base == "x.do"
    assert out.stored.original_raw == data
    assert (out.stored.original_json, out.stored.envelope_json) == (None, None)
    assert out.stored.company_id == "acme"


def test_main_lane_json_reaches_the_handler_with_a_horizon() -> None:
    registry, seen = _spy()
    before = time.time()
    out = _main(b'{"a": "\\ud83d\\ude00"}', registry=registry, subject="x.do.acme")
    assert out.ok is True
    assert out.stored.original_raw is None
    (event,) = seen
    assert event.payload == b'{"a": "\\ud83d\\ude00"}'
    assert before + 7 * 86400 - 1 <= event.not_after <= time.time() + 7 * 86400


def test_main_lane_checks_size_and_tenant_before_the_body() -> None:
    big = Delivery(1, "demo.ok.acme", b"NaN" * 10, 1, lane=Lane.REALTIME)
    _failed(handle(big, DEMO, Limits("v1.dlq", 29)), FailureKind.PERMANENT, Reason.TOO_BIG)
    bad_tenant = Delivery(1, "demo.ok.a;b", b"NaN", 1, lane=Lane.REALTIME)
    _failed(handle(bad_tenant, DEMO, LIMITS), FailureKind.PERMANENT, Reason.INVALID_TENANT)


@settings(max_examples=200)
@given(data=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_main_lane_fails_as_not_json_exactly_when_the_body_is_not_json(data: bytes) -> None:
    delivery = Delivery(3, "demo.ok.acme", data, 1, lane=Lane.REALTIME)
    out = handle(delivery, DEMO, LIMITS)
    _check(out, delivery)
    bad = classify_json(data)
    if bad is None:
        assert out.reason not in (Reason.NOT_JSON, Reason.TOO_DEEP)
        assert out.stored.original_raw is None
    else:
        assert (out.kind, out.reason) == (FailureKind.PERMANENT, bad.reason)
        assert out.stored.original_raw == data


# --- the trip through the DLQ keeps the reason and the bytes -------------------------


def _dead_letter(main: Outcome, data: bytes, subject: str = "demo.ok.acme") -> bytes:
    """The DLQ envelope the supervisor publishes for a failed main-lane event."""
    return build(
        source_subject=subject,
        company="acme",
        original_json=main.stored.original_json,
        raw=data,
        error=main.error,
        fatal=True,
        retry_count=1,
        max_retry=5,
        ts="2025-11-29T07:06:40+00:00",
    )


@pytest.mark.parametrize(("data", "reason", "text"), HOSTILE)
def test_dlq_lane_keeps_the_main_lane_reason_and_bytes(
    data: bytes, reason: Reason, text: str
) -> None:
    main = _main(data)
    envelope = _dead_letter(main, data)
    assert classify_json(envelope) is None
    out = _run(envelope)
    _failed(out, FailureKind.PERMANENT, reason)
    assert text in out.error
    assert f"; main consumer: {main.error}" in out.error
    assert out.base == "demo.ok"
    s = out.stored
    assert s.original_raw == data
    assert s.original_json is None
    assert s.envelope_json == envelope
    assert s.company_id == "acme"
    assert s.event_timestamp == "2025-11-29T07:06:40+00:00"


@settings(max_examples=200)
@given(data=st.binary(max_size=300))
def test_any_body_that_is_not_json_keeps_reason_and_bytes_through_the_dlq(data: bytes) -> None:
    main = _main(data)
    if main.reason not in (Reason.NOT_JSON, Reason.TOO_DEEP):
        return
    out = _run(_dead_letter(main, data))
    assert (out.kind, out.reason) == (FailureKind.PERMANENT, main.reason)
    assert out.stored.original_raw == data


def _wrapped(raw: bytes) -> bytes:
    return _body({"base64": base64.b64encode(raw).decode()}, error="earlier")


def test_dlq_lane_runs_the_handler_on_wrapped_bytes_that_are_json() -> None:
    # e.g. judged too deep by the supervisor's deeper stack, or wrapped by a producer.
    registry, seen = _spy()
    raw = b'{"a": [1, 2]}'
    out = _run(_wrapped(raw).replace(b"demo.ok.acme", b"x.do.acme"), registry=registry)
    assert out.ok is True
    assert [e.payload for e in seen] == [raw]
    assert (out.stored.original_json, out.stored.original_raw) == (raw, raw)


def test_dlq_lane_error_keeps_the_envelope_error() -> None:
    out = _run(_wrapped(b"NaN"))
    _failed(out, FailureKind.PERMANENT, Reason.NOT_JSON)
    assert (
        out.error == "body is not JSON: NaN at byte 0 is not a JSON number; main consumer: earlier"
    )


def test_dlq_lane_error_without_an_envelope_error() -> None:
    out = _run(_body({"base64": base64.b64encode(b"").decode()}, error=""))
    _failed(out, FailureKind.PERMANENT, Reason.NOT_JSON)
    assert out.error == "body is not JSON: it is empty"
    assert out.stored.original_raw == b""


@pytest.mark.parametrize("text", ["a", "!!!!", "aGk", "é"])
def test_dlq_lane_wrapper_that_is_not_base64_is_a_bad_envelope(text: str) -> None:
    out = _run(_body({"base64": text}))
    _failed(out, FailureKind.PERMANENT, Reason.BAD_ENVELOPE)
    assert out.base == "demo.ok"
    assert out.stored.original_raw is None


@pytest.mark.parametrize(
    "payload",
    [{"base64": "aGk=", "id": "e1"}, {"id": "e1", "base64": "aGk="}, {"id": "e1", "b": "aGk="}],
)
def test_dlq_lane_other_objects_are_not_unwrapped(payload: dict[str, str]) -> None:
    out = _run(_body(payload))
    assert out.ok is True
    assert out.stored.original_raw is None


# --- the timestamp horizon -------------------------------------------------------------


@pytest.mark.parametrize("horizon", [0.0, 60.0, 7 * 86400.0, -3600.0])
def test_not_after_is_the_clock_plus_the_horizon(horizon: float) -> None:
    limits = Limits("v1.dlq", 1 << 20, timestamp_horizon=horizon)
    before = time.time()
    bound = not_after(limits)
    assert math.floor(before + horizon) <= bound <= time.time() + horizon


@pytest.mark.parametrize("horizon", [math.inf, math.nan])
def test_not_after_of_an_unbounded_horizon_is_no_bound(horizon: float) -> None:
    assert not_after(Limits("v1.dlq", 1 << 20, timestamp_horizon=horizon)) == 0


def test_dlq_lane_event_gets_the_configured_horizon() -> None:
    registry, seen = _spy()
    limits = Limits("v1.dlq", 1 << 20, timestamp_horizon=120)
    before = time.time()
    assert _run(_x_body(), registry=registry, limits=limits).ok
    assert int(before) + 120 <= seen[0].not_after <= time.time() + 120
