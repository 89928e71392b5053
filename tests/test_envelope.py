"""Decoding DLQ bodies: valid envelopes, classified BadInput, and never anything else."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlqproc.envelope import BadInput, decode, split_source, tenant_of_subject, valid_tenant
from dlqproc.model import Envelope, Reason

MAX = 1 << 20

BAD_TENANTS = ['a";DROP SCHEMA x;--', "../x", "a" * 200, "ação", "", "-abc", "_abc", "a b", "a.b"]


def _body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "source_subject": "demo.ok.acme",
        "company": "acme",
        "original_payload": {"id": "1"},
    }
    base.update(fields)
    return json.dumps(base).encode()


def _reason(data: bytes, max_bytes: int = MAX) -> Reason:
    with pytest.raises(BadInput) as info:
        decode(data, max_bytes)
    return info.value.reason


def test_valid_envelope_decodes_every_field() -> None:
    data = _body(
        error="boom",
        error_type="retryable",
        retry_count=5,
        max_retry=5,
        next_retry_at=None,
        ts="2024-05-01T10:00:00Z",
    )
    env = decode(data, MAX)
    assert isinstance(env, Envelope)
    assert env.source_subject == "demo.ok.acme"
    assert env.company == "acme"
    assert env.error == "boom"
    assert env.error_type == "retryable"
    assert (env.retry_count, env.max_retry) == (5, 5)
    assert env.next_retry_at is None
    assert env.ts == "2024-05-01T10:00:00Z"
    assert json.loads(bytes(env.original_payload)) == {"id": "1"}


def test_optional_fields_default() -> None:
    env = decode(_body(), MAX)
    assert (env.error, env.error_type, env.retry_count, env.max_retry) == ("", "", 0, 0)
    assert env.ts is None and env.next_retry_at is None


def test_original_payload_is_kept_byte_identical() -> None:
    payload = b'{"b" : [1, 2.50,  "x\\u00e9", null, true] ,\n "a":{}}'
    data = (
        b'{"source_subject":"demo.ok.acme", "original_payload": '
        + payload
        + b' , "company":"acme","ts":"2024-01-01T00:00:00Z"}'
    )
    env = decode(data, MAX)
    assert bytes(env.original_payload) == payload


@pytest.mark.parametrize("payload", [b"null", b"0", b'"text"', b"[]", b"{}", b"-1.5e10"])
def test_original_payload_any_json_value(payload: bytes) -> None:
    data = b'{"source_subject":"a.acme","company":"acme","original_payload":' + payload + b"}"
    assert bytes(decode(data, MAX).original_payload) == payload


def test_unknown_envelope_fields_are_ignored() -> None:
    env = decode(_body(extra={"x": 1}, company_id="other"), MAX)
    assert env.company == "acme"


# --- classified errors ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff\xfe", b"not json", b"{", b'{"a":', b"{'a': 1}", b'{"a": 1,}', b"NaN", b"\x00"],
)
def test_not_json(data: bytes) -> None:
    assert _reason(data) is Reason.NOT_JSON


@pytest.mark.parametrize(
    "data",
    [
        b"null",
        b"1",
        b'"a string"',
        b"[]",
        b"[1, 2]",
        b"{}",
        b'{"company": "acme", "original_payload": 1}',
        b'{"source_subject": "a.acme", "original_payload": 1}',
        b'{"source_subject": "a.acme", "company": "acme"}',
        _body(source_subject=5),
        _body(company=["acme"]),
        _body(company=None),
        _body(retry_count="5"),
        _body(retry_count=1.5),
        _body(ts=12345),
        _body(error=None),
        _body(next_retry_at=7),
    ],
)
def test_bad_envelope(data: bytes) -> None:
    assert _reason(data) is Reason.BAD_ENVELOPE


def test_too_big() -> None:
    data = _body()
    assert decode(data, len(data)).company == "acme"
    assert _reason(data, len(data) - 1) is Reason.TOO_BIG
    assert _reason(b"x" * 100, 10) is Reason.TOO_BIG  # checked before parsing


DEEP = 100_000


@pytest.mark.parametrize(
    "data",
    [
        b"[" * DEEP + b"]" * DEEP,
        b'{"a":' * DEEP + b"1" + b"}" * DEEP,
        b'{"source_subject":"a.acme","company":"acme","original_payload":'
        + b"[" * DEEP
        + b"]" * DEEP
        + b"}",
        b'{"original_payload":' + b"[" * DEEP + b"]" * DEEP + b',"source_subject":"a.acme"}',
        b'{"x":' + b'{"y":' * DEEP + b"1" + b"}" * DEEP + b',"source_subject":"a.acme"}',
        b'{"source_subject":"a.acme","company":"acme","original_payload":' + b"[" * DEEP,
    ],
)
def test_deep_nesting_is_classified(data: bytes) -> None:
    assert _reason(data) in {Reason.TOO_DEEP, Reason.BAD_ENVELOPE}


def test_deep_original_payload_is_too_deep() -> None:
    data = (
        b'{"source_subject":"a.acme","company":"acme","original_payload":'
        + b"[" * DEEP
        + b"]" * DEEP
        + b"}"
    )
    assert _reason(data) is Reason.TOO_DEEP


def test_moderate_nesting_is_fine() -> None:
    payload = b"[" * 200 + b"]" * 200
    data = b'{"source_subject":"a.acme","company":"acme","original_payload":' + payload + b"}"
    assert bytes(decode(data, MAX).original_payload) == payload


@pytest.mark.parametrize("tenant", BAD_TENANTS)
def test_invalid_tenant(tenant: str) -> None:
    assert _reason(_body(company=tenant, source_subject=f"demo.ok.{tenant}")) is (
        Reason.INVALID_TENANT
    )
    assert not valid_tenant(tenant)


@pytest.mark.parametrize(
    "tenant",
    ["acme", "A", "0", "a" * 57, "3f2b8c1e-0d9a-4c1b-9a7e-1234567890ab", "Acme_Corp-2"],
)
def test_valid_tenant(tenant: str) -> None:
    assert valid_tenant(tenant)
    assert decode(_body(company=tenant), MAX).company == tenant


def test_tenant_length_limit_is_57() -> None:
    assert valid_tenant("a" * 57)
    assert not valid_tenant("a" * 58)
    # daisi_<tenant> fits PostgreSQL's 63-byte identifier limit
    assert len("daisi_" + "a" * 57) <= 63


def test_tenant_with_trailing_newline_is_invalid() -> None:
    assert not valid_tenant("acme\n")
    assert _reason(_body(company="acme\n")) is Reason.INVALID_TENANT


def test_bad_input_message_is_bounded_for_long_tenant() -> None:
    with pytest.raises(BadInput) as info:
        decode(_body(company="x" * 100_000), 10 * MAX)
    assert len(str(info.value)) < 200


# --- hypothesis ------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@given(data=st.binary(max_size=2000))
def test_decode_arbitrary_bytes_raises_only_bad_input(data: bytes) -> None:
    try:
        env = decode(data, MAX)
    except BadInput as exc:
        assert isinstance(exc.reason, Reason)
    else:
        assert valid_tenant(env.company)


@given(data=st.binary(max_size=200), limit=st.integers(min_value=0, max_value=200))
def test_decode_respects_max_bytes(data: bytes, limit: int) -> None:
    try:
        decode(data, limit)
    except BadInput as exc:
        if len(data) > limit:
            assert exc.reason is Reason.TOO_BIG
        else:
            assert exc.reason is not Reason.TOO_BIG
    else:
        assert len(data) <= limit


@given(value=json_values, ascii_only=st.booleans())
def test_decode_arbitrary_json_raises_only_bad_input(value: Any, ascii_only: bool) -> None:
    data = json.dumps(value, ensure_ascii=ascii_only).encode()
    try:
        decode(data, MAX)
    except BadInput as exc:
        assert exc.reason in {Reason.BAD_ENVELOPE, Reason.INVALID_TENANT}


envelope_extras = st.fixed_dictionaries(
    {},
    optional={
        "error": st.text(),
        "error_type": st.sampled_from(["retryable", "fatal", ""]),
        "retry_count": st.integers(min_value=0, max_value=2**31),
        "max_retry": st.integers(min_value=0, max_value=2**31),
        "next_retry_at": st.none() | st.text(),
        "ts": st.none() | st.text(),
        "unknown": json_values,
    },
)
tenants = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,56}", fullmatch=True)
bases = st.from_regex(r"[a-z0-9]+(\.[a-z0-9]+){0,3}", fullmatch=True)


@given(
    tenant=tenants,
    base=bases,
    payload=json_values,
    extras=envelope_extras,
    ascii_only=st.booleans(),
)
def test_valid_envelope_round_trips_original_payload(
    tenant: str, base: str, payload: Any, extras: dict[str, Any], ascii_only: bool
) -> None:
    fields = {
        "source_subject": f"{base}.{tenant}",
        "company": tenant,
        "original_payload": payload,
        **extras,
    }
    data = json.dumps(fields, ensure_ascii=ascii_only).encode()
    env = decode(data, len(data))
    assert env.company == tenant
    assert env.source_subject == f"{base}.{tenant}"
    raw = bytes(env.original_payload)
    assert raw == json.dumps(payload, ensure_ascii=ascii_only).encode()
    assert json.loads(raw) == payload
    assert split_source(env.source_subject, env.company) == base
    for key, value in extras.items():
        if key != "unknown":
            assert getattr(env, key) == value


@settings(deadline=None, max_examples=25)
@given(depth=st.integers(min_value=1, max_value=50_000), opener=st.sampled_from([b"[", b'{"k":']))
def test_any_depth_is_decoded_or_classified(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    inner = b"1" if opener != b"[" else b""
    payload = opener * depth + inner + closer * depth
    data = b'{"source_subject":"a.acme","company":"acme","original_payload":' + payload + b"}"
    try:
        env = decode(data, len(data))
    except BadInput as exc:
        assert exc.reason is Reason.TOO_DEEP
        assert depth > 100
    else:
        assert bytes(env.original_payload) == payload


# --- subjects --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "tenant", "base"),
    [
        ("v1.messages.upsert.acme", "acme", "v1.messages.upsert"),
        ("demo.ok.acme", "acme", "demo.ok"),
        ("x.T-1", "T-1", "x"),
        ("a.b.c.d.e.t", "t", "a.b.c.d.e"),
    ],
)
def test_split_source(subject: str, tenant: str, base: str) -> None:
    assert split_source(subject, tenant) == base


@pytest.mark.parametrize(
    ("subject", "tenant"),
    [
        ("acme", "acme"),
        (".acme", "acme"),
        ("", "acme"),
        ("demo.ok.other", "acme"),
        ("demo.ok.acme.", "acme"),
        ("demo.ok.acme.x", "acme"),
        ("demo.ok.ACME", "acme"),
        ("demo.ok.acme2", "acme"),
        ("demo.ok.xacme", "acme"),
    ],
)
def test_split_source_rejects(subject: str, tenant: str) -> None:
    with pytest.raises(BadInput) as info:
        split_source(subject, tenant)
    assert info.value.reason is Reason.UNKNOWN_SUBJECT


def test_split_source_error_is_bounded() -> None:
    with pytest.raises(BadInput) as info:
        split_source("x" * 100_000, "acme")
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("subject", "prefix", "tenant"),
    [
        ("v1.dlq.acme", "v1.dlq", "acme"),
        ("v1.dlq.Acme-1_x", "v1.dlq", "Acme-1_x"),
        ("v2.dead.t", "v2.dead", "t"),
        ("v1.dlq", "v1.dlq", ""),
        ("v1.dlq.", "v1.dlq", ""),
        ("v1.dlq.a.b", "v1.dlq", ""),
        ("v1.dlqx.acme", "v1.dlq", ""),
        ("x.v1.dlq.acme", "v1.dlq", ""),
        ("v1.other.acme", "v1.dlq", ""),
        ("v1.dlq.a;b", "v1.dlq", ""),
        ("v1.dlq.ação", "v1.dlq", ""),
        ("v1.dlq." + "a" * 58, "v1.dlq", ""),
        ("", "v1.dlq", ""),
    ],
)
def test_tenant_of_subject(subject: str, prefix: str, tenant: str) -> None:
    assert tenant_of_subject(subject, prefix) == tenant


@given(subject=st.text(), prefix=st.text(min_size=1))
def test_tenant_of_subject_is_valid_or_empty(subject: str, prefix: str) -> None:
    tenant = tenant_of_subject(subject, prefix)
    assert tenant == "" or (valid_tenant(tenant) and subject == f"{prefix}.{tenant}")


@given(subject=st.text(), tenant=st.text())
def test_split_source_total(subject: str, tenant: str) -> None:
    try:
        base = split_source(subject, tenant)
    except BadInput as exc:
        assert exc.reason is Reason.UNKNOWN_SUBJECT
    else:
        assert base and subject == f"{base}.{tenant}"
