"""reprocess(): one DLQ delivery in, one classified Outcome out, never an exception."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlqproc.handlers import Registry, load
from dlqproc.model import (
    Delivery,
    Event,
    FailureKind,
    Outcome,
    PermanentError,
    Reason,
    RowOp,
    TransientError,
)
from dlqproc.reprocess import Limits, reprocess
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
    assert out.ok is False
    assert out.rows == ()
    assert out.kind is kind
    assert out.reason is reason
    assert out.error


def test_demo_ok_is_one_upsert() -> None:
    data = _body()
    out = _run(data)
    assert out.ok is True
    assert out.token == 7
    assert out.kind is None and out.reason is None and out.error == ""
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
        ("weird", "unknown"),
        ("v1.dlq.a.b", "unknown"),
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

    out = _run(_x_body({"a": [1, 2]}), n=4, registry=_registry(handler))
    assert out.ok is True
    assert isinstance(out.rows, tuple) and len(out.rows) == 2
    assert seen == [
        Event(
            subject="x.do.acme",
            base="x.do",
            tenant="acme",
            payload=b'{"a": [1, 2]}',
            attempt=4,
        )
    ]


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
        ("2024-05-01T10:00:00.123456+02:00", "2024-05-01T10:00:00.123456+02:00"),
        ("2024-05-01T10:00:00-03:30", "2024-05-01T10:00:00-03:30"),
        ("garbage", None),
        ("", None),
        ("2024-13-01T00:00:00Z", None),
        ("2024-02-30T00:00:00Z", None),
        ("12345", None),
        (None, None),
    ],
)
def test_ts_is_kept_when_valid_and_none_when_garbage(ts: str | None, expected: str | None) -> None:
    out = _run(_body(ts=ts))
    assert out.ok is True
    assert out.stored.event_timestamp == expected


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
    ts = out.stored.event_timestamp
    assert ts is None or isinstance(datetime.fromisoformat(ts), datetime)
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
