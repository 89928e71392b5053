"""Decoding DLQ bodies: valid envelopes, classified BadInput, and never anything else."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlqproc.envelope import (
    BadInput,
    build,
    classify_json,
    decode,
    is_json,
    split_source,
    tenant_of_subject,
    tenant_schema,
    unwrap_base64,
    valid_tenant,
)
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


def test_invalid_utf8_inside_original_payload_is_not_json() -> None:
    # msgspec leaves a Raw field's strings unchecked; the envelope must be UTF-8.
    for bad in (b"\xff", b"\xed\xa0\x80", b"\xc3"):
        data = b'{"source_subject":"a.acme","company":"acme","original_payload":"' + bad + b'"}'
        with pytest.raises(BadInput, match="UTF-8") as info:
            decode(data, MAX)
        assert info.value.reason is Reason.NOT_JSON


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
    # its schema fits PostgreSQL's 63-byte identifier limit
    assert len(tenant_schema("a" * 57).encode()) == 63


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


# --- classify_json -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason", "text"),
    [
        (b"", Reason.NOT_JSON, "empty"),
        (b" \n\t ", Reason.NOT_JSON, "empty"),
        (b"NaN", Reason.NOT_JSON, "NaN at byte 0"),
        (b'{"a": [1, NaN]}', Reason.NOT_JSON, "NaN at byte 10"),
        (b"Infinity", Reason.NOT_JSON, "Infinity"),
        (b'{"x": -Infinity}', Reason.NOT_JSON, "Infinity"),
        (b"not json", Reason.NOT_JSON, "not JSON"),
        (b'{"a": 1} x', Reason.NOT_JSON, "trailing"),
        (b'{"a": 1}{"b": 2}', Reason.NOT_JSON, "trailing"),
        (b'{"a": 1', Reason.NOT_JSON, "truncated"),
        (b"\xef\xbb\xbf{}", Reason.NOT_JSON, "not JSON"),  # a BOM
        (b'"\xff"', Reason.NOT_JSON, "invalid UTF-8 at byte 1"),
        (b'{"a": "ok\xc3"}', Reason.NOT_JSON, "invalid UTF-8 at byte 9"),
        (b'"\xed\xa0\x80"', Reason.NOT_JSON, "UTF-8"),  # a surrogate, UTF-8 encoded
        (b'"\\ud800"', Reason.NOT_JSON, "lone UTF-16 surrogate escape \\ud800 at byte 1"),
        (b'{"k": "a\\uDBFFb"}', Reason.NOT_JSON, "surrogate escape \\uDBFF at byte 8"),
        (b'["\\udc00"]', Reason.NOT_JSON, "surrogate escape \\udc00"),
        (b'"\\ud800\\u0041"', Reason.NOT_JSON, "surrogate escape \\ud800"),
        (b'"\\ud800\\ud800"', Reason.NOT_JSON, "surrogate escape \\ud800 at byte 1"),
        (b'"\\ude00\\ud83d"', Reason.NOT_JSON, "surrogate escape \\ude00 at byte 1"),
        (b'{"\\ud800": 1}', Reason.NOT_JSON, "surrogate escape"),
        (b'"\x00"', Reason.NOT_JSON, "not JSON"),
        (b"[" * DEEP + b"]" * DEEP, Reason.TOO_DEEP, "nests too deeply"),
        (b'{"a":' * DEEP + b"1" + b"}" * DEEP, Reason.TOO_DEEP, "nests too deeply"),
        (b"[" * DEEP, Reason.TOO_DEEP, "nests too deeply"),
    ],
)
def test_classify_json_names_each_hostile_case(data: bytes, reason: Reason, text: str) -> None:
    bad = classify_json(data)
    assert isinstance(bad, BadInput)
    assert bad.reason is reason
    assert text in str(bad)
    assert not is_json(data)


@pytest.mark.parametrize(
    "data",
    [
        b"null",
        b" {} \n",
        b'"\\ud83d\\ude00"',  # a surrogate pair is one character
        b'"\\uDBFF\\uDFFF"',
        b'"\\\\ud800"',  # an escaped backslash, then the text "ud800"
        b'"\\u0000"',  # JSON, though jsonb refuses it (the store copes)
        '{"texto": "ação 😀"}'.encode(),
        b"1e400",
        b"1" * 5000,
        b"[" * 200 + b"]" * 200,
    ],
)
def test_classify_json_accepts_json(data: bytes) -> None:
    assert classify_json(data) is None
    assert is_json(data)


def test_lone_surrogate_far_into_a_big_body_is_still_not_json() -> None:
    data = b'["' + b"a" * (2 << 20) + b'\\ud800"]'
    bad = classify_json(data)
    assert bad is not None and bad.reason is Reason.NOT_JSON  # explained only in the first MiB


def _lone_surrogate_text() -> st.SearchStrategy[str]:
    lone = st.integers(0xD800, 0xDFFF).map(chr)
    return st.tuples(st.text(max_size=20), lone, st.text(max_size=20)).map("".join)


@given(data=st.binary(max_size=2000))
def test_classify_json_arbitrary_bytes_only_bad_input(data: bytes) -> None:
    bad = classify_json(data)
    if bad is None:
        json.loads(data)  # what classify_json accepts, a strict parser reads
    else:
        assert isinstance(bad, BadInput)
        assert bad.reason in {Reason.NOT_JSON, Reason.TOO_DEEP}
        assert str(bad)


@given(value=json_values, ascii_only=st.booleans())
def test_classify_json_accepts_any_json_value(value: Any, ascii_only: bool) -> None:
    assert classify_json(json.dumps(value, ensure_ascii=ascii_only).encode()) is None


@given(text=_lone_surrogate_text(), as_key=st.booleans())
def test_lone_surrogate_escapes_are_not_json(text: str, as_key: bool) -> None:
    # Python's json writes a lone surrogate as its \\uXXXX escape.
    data = json.dumps({text: 1} if as_key else [text]).encode()
    bad = classify_json(data)
    assert bad is not None and bad.reason is Reason.NOT_JSON
    assert "lone UTF-16 surrogate escape" in str(bad)


INVALID_UTF8 = [
    b"\xff",
    b"\x80",
    b"\xc3",  # a lead byte without its continuation
    b"\xc0\xaf",  # overlong "/"
    b"\xed\xa0\x80",  # a surrogate
    b"\xf4\x90\x80\x80",  # past U+10FFFF
]


@given(value=json_values, text=st.text(max_size=20), junk=st.sampled_from(INVALID_UTF8))
def test_invalid_utf8_inside_a_string_is_not_json(value: Any, text: str, junk: bytes) -> None:
    # Inside a string is where msgspec's syntax pass does not look.
    data = json.dumps({"v": value, "s": text}, ensure_ascii=False).encode()
    at = data.rindex(b'"s": "') + len(b'"s": "')
    bad = classify_json(data[:at] + junk + data[at:])
    assert bad is not None and bad.reason is Reason.NOT_JSON
    assert "invalid UTF-8" in str(bad)


# --- build and unwrap_base64 ---------------------------------------------------------


def _built(raw: bytes, original_json: bytes | None = None) -> dict[str, Any]:
    body = build(
        source_subject="v1.chats.upsert.acme",
        company="acme",
        original_json=original_json,
        raw=raw,
        error="boom",
        fatal=True,
        retry_count=1,
        max_retry=5,
        ts="2025-11-29T07:06:40+00:00",
    )
    assert classify_json(body) is None  # the DLQ message itself is always JSON
    parsed: dict[str, Any] = json.loads(body)
    assert decode(body, MAX).company == "acme"
    return parsed


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"NaN",
        b'"\\ud800"',
        b'{"a": "\xff"}',
        b'"\xed\xa0\x80"',
        b"[" * DEEP + b"]" * DEEP,
        b'{"a": 1} trailing',
        b"\x00\x01\x02",
    ],
)
def test_build_wraps_what_is_not_json_in_base64(raw: bytes) -> None:
    original = _built(raw)["original_payload"]
    assert original == {"base64": base64.b64encode(raw).decode()}
    assert unwrap_base64(json.dumps(original).encode()) == raw


def test_build_wraps_raw_when_the_given_original_json_is_not_json() -> None:
    raw = b'["\\ud800"]'
    assert _built(raw, original_json=raw)["original_payload"] == {
        "base64": base64.b64encode(raw).decode()
    }


def test_build_embeds_json_as_is() -> None:
    assert _built(b'{"chat_id": "c1"}')["original_payload"] == {"chat_id": "c1"}
    assert _built(b"x", original_json=b"[1]")["original_payload"] == [1]


@given(raw=st.binary(max_size=500))
def test_build_round_trips_any_body(raw: bytes) -> None:
    original = _built(raw)["original_payload"]
    if classify_json(raw) is None:
        assert original == json.loads(raw)
    else:
        assert unwrap_base64(json.dumps(original).encode()) == raw


@pytest.mark.parametrize(
    "original",
    [
        b"null",
        b"[]",
        b'"base64"',
        b"{}",
        b'{"base64": 1}',
        b'{"base64": null}',
        b'{"base64": "aGk=", "extra": 1}',
        b'{"chat_id": "c1", "base64": "aGk="}',
        b'{"Base64": "aGk="}',
        b'{"base64": {"base64": "aGk="}}',
        b'{"\\u0062ase64": "aGk="}',  # not how dlqproc writes its wrapper
        b"[" * DEEP + b"]" * DEEP,
    ],
)
def test_unwrap_base64_leaves_other_payloads(original: bytes) -> None:
    assert unwrap_base64(original) is None


@pytest.mark.parametrize(
    ("original", "raw"),
    [
        (b'{"base64": "aGk="}', b"hi"),
        (b'{"base64":""}', b""),
        (b'{"base64" : "TmFO"}', b"NaN"),
        (b'{\n  "base64": "TmFO"\n}', b"NaN"),
    ],
)
def test_unwrap_base64(original: bytes, raw: bytes) -> None:
    assert unwrap_base64(original) == raw


@pytest.mark.parametrize(
    "original", [b'{"base64": "a"}', b'{"base64": "!!!!"}', b'{"base64": "a\\u00e9bc"}']
)
def test_unwrap_base64_that_is_not_base64_is_a_bad_envelope(original: bytes) -> None:
    with pytest.raises(BadInput) as info:
        unwrap_base64(original)
    assert info.value.reason is Reason.BAD_ENVELOPE
    assert "base64" in str(info.value)


@given(original=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_unwrap_base64_raises_only_bad_input(original: bytes) -> None:
    try:
        unwrap_base64(original)
    except BadInput as exc:
        assert exc.reason is Reason.BAD_ENVELOPE
