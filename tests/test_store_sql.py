"""The store's pure parts, without a server: rendered SQL, error classes, failures,
the exhausted row's normalisation, the partition window and the result union."""

from __future__ import annotations

import datetime as dt
import math
import re

import msgspec
import psycopg
import psycopg.errors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlqproc.model import FailureKind, Reason
from dlqproc.rows import Shape
from dlqproc.store import (
    ExhaustedRow,
    Failure,
    ItemFailed,
    NotWritten,
    WriteResult,
    Written,
    classify,
    partitions,
    schema_name,
    sql,
)
from dlqproc.store import exhausted as ex

# -- rendered statements --------------------------------------------------------

# Any text may name a table or column: the store must quote it, whatever it holds.
names = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1, max_size=12)
QUOTED = re.compile(r'"(?:[^"]|"")*"')


@st.composite
def shapes(draw: st.DrawFn, names: st.SearchStrategy[str] = names) -> Shape:
    columns = tuple(draw(st.lists(names, min_size=2, max_size=6, unique=True)))
    key = tuple(columns[: draw(st.integers(1, len(columns) - 1))])
    rest = columns[len(key) :]
    monotonic = tuple(c for c in rest if draw(st.booleans()))
    insert_only = tuple(c for c in rest if c not in monotonic and draw(st.booleans()))
    op = draw(st.sampled_from(["upsert", "update"]))
    return (op, draw(names), key, columns, monotonic, insert_only)


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@settings(deadline=None)  # a loaded machine is not a failure
@given(shapes(), names)
def test_every_name_reaches_sql_quoted(shape: Shape, schema: str) -> None:
    stmt = sql.statement(schema, shape).decode()
    skeleton = QUOTED.sub("I", stmt)
    # Outside quoted identifiers only the store's own words remain: no name
    # can end the statement, open a string or start a comment.
    assert re.fullmatch(r"[A-Za-z_ (),.=%>:]+", skeleton), skeleton
    assert skeleton.count("%s") == 1  # the one parameter: the rows as jsonb


@settings(deadline=None)  # a loaded machine is not a failure
@given(shapes(st.text("ab_0", min_size=1, max_size=4)))
def test_statement_writes_what_the_shape_says(shape: Shape) -> None:
    op, table, key, columns, monotonic, insert_only = shape
    stmt = sql.statement("daisi_acme", shape).decode()
    target = f'"daisi_acme".{ident(table)}'
    if op == "upsert":
        head, sets = stmt.split(" DO UPDATE SET ")
        assert head.startswith(f"INSERT INTO {target} ({', '.join(map(ident, columns))})")
        assert f"ON CONFLICT ({', '.join(map(ident, key))})" in head
        source = '"excluded"'
        settable = [c for c in columns if c not in key and c not in insert_only]
    else:
        assert stmt.startswith(f"UPDATE {target} SET ")
        head, where = stmt.split(" WHERE ")
        sets = head.split(" SET ", 1)[1].split(" FROM jsonb_populate_recordset(")[0]
        assert where == " AND ".join(f"{target}.{ident(k)} = r.{ident(k)}" for k in key)
        source = '"r"'
        settable = [c for c in columns if c not in key]
    for c in settable:
        value = f"{source}.{ident(c)}"
        if c in monotonic:
            assert f"{ident(c)} = GREATEST({target}.{ident(c)}, {value})" in sets
        else:
            assert f"{ident(c)} = {value}" in sets
    for c in key if op == "update" else (*key, *insert_only):
        assert f"{ident(c)} = " not in sets  # keys and insert-only columns never change
    assert sets.endswith("updated_at = now()")


def test_jsonb_parameter_is_the_rows_as_one_array_unchanged() -> None:
    rows = (b'{"id": "a"}', b'{"id": "\\u0000"}')
    assert sql.jsonb(rows).dumps(sql.jsonb(rows).obj) == b'[{"id": "a"},{"id": "\\u0000"}]'


# -- what an error means --------------------------------------------------------

KNOWN_STATES = sorted(
    {
        c.sqlstate
        for c in vars(psycopg.errors).values()
        if isinstance(c, type) and issubclass(c, psycopg.Error) and c.sqlstate
    }
)
states = st.sampled_from(KNOWN_STATES) | st.text(
    st.sampled_from("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=5, max_size=5
)


def server_error(state: str) -> psycopg.Error:
    cls = type("ServerError", (psycopg.errors.DatabaseError,), {"sqlstate": state})
    return cls("from the server")


@settings(deadline=None)  # a loaded machine is not a failure
@given(states)
def test_classify_by_sqlstate_class(state: str) -> None:
    exc = server_error(state)
    assert classify(exc, conn_ok=False) == "outage"  # a connection that did not survive
    got = classify(exc, conn_ok=True)
    if state[:2] == "08" or state in {"57P01", "57P02", "57P03", "57P04", "57P05"}:
        assert got == "outage"
    elif state[:2] in {"22", "23", "42", "54"}:
        assert got == "data"
    else:
        assert got == "resource"


@settings(deadline=None)  # a loaded machine is not a failure
@given(states, st.text(max_size=10_000))
def test_item_failure_follows_the_class(state: str, text: str) -> None:
    exc = server_error(state)
    failure = sql.item_failure(type(exc)(text))
    match classify(exc, conn_ok=True):
        case "data":
            assert (failure.kind, failure.reason) == (FailureKind.PERMANENT, Reason.VALIDATION)
        case _:  # an outage never reaches item_failure; were it to, it is transient
            assert (failure.kind, failure.reason) == (FailureKind.TRANSIENT, Reason.DATABASE)
    assert len(failure.message) <= 4003 and failure.message == failure.message.strip()


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text(max_size=10_000))
def test_a_bug_is_a_transient_internal_error(text: str) -> None:
    failure = sql.item_failure(ValueError(text))
    assert (failure.kind, failure.reason) == (FailureKind.TRANSIENT, Reason.HANDLER_ERROR)
    assert failure.message.startswith("internal error: ValueError:")
    assert len(failure.message) <= 4003


def test_item_failed_keeps_its_own_failure() -> None:
    raised = ItemFailed(FailureKind.TRANSIENT, Reason.TENANT_LIMIT, "later")
    assert sql.item_failure(raised) == Failure(FailureKind.TRANSIENT, Reason.TENANT_LIMIT, "later")
    assert ItemFailed.of(raised.failure).failure == raised.failure
    assert str(raised.failure) == str(raised) == "later"


def test_preparing_a_tenant_names_its_schema() -> None:
    failure = sql.prepare_failure("Acme", server_error("42501"))
    assert failure == Failure(
        FailureKind.TRANSIENT, Reason.DATABASE, "preparing daisi_Acme: from the server"
    )
    bug = sql.prepare_failure("Acme", KeyError("nope"))
    assert (bug.reason, bug.message) == (Reason.HANDLER_ERROR, "internal error: KeyError: 'nope'")


def test_refused_credentials_are_told_from_an_outage() -> None:
    assert sql.credentials_refused(
        'connection failed: FATAL:  password authentication failed for user "app"'
    )
    assert sql.credentials_refused("fe_sendauth: no password supplied")
    assert not sql.credentials_refused("connection failed: Connection refused")
    assert not sql.credentials_refused("FATAL:  the database system is starting up")


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text(max_size=70))
def test_schema_name_only_for_a_valid_tenant(tenant: str) -> None:
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,56}", tenant):
        assert schema_name(tenant) == "daisi_" + tenant
    else:
        with pytest.raises(ItemFailed) as raised:
            schema_name(tenant)
        assert raised.value.failure.reason is Reason.INVALID_TENANT
        assert raised.value.failure.kind is FailureKind.PERMANENT


# -- the exhausted row's values ---------------------------------------------------


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text())
def test_text_is_what_postgres_text_holds(value: str) -> None:
    cleaned = ex.text(value)
    assert "\x00" not in cleaned
    cleaned.encode("utf-8")  # no lone surrogate left
    if "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        assert cleaned == value


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text(), st.integers(0, 64))
def test_cut_keeps_a_prefix_within_the_byte_limit(value: str, limit: int) -> None:
    value = ex.text(value)
    short = ex.cut(value, limit)
    assert len(short.encode("utf-8")) <= limit and value.startswith(short)
    assert len(value.encode("utf-8")) - len(short.encode("utf-8")) >= 0
    if len(value.encode("utf-8")) <= limit:
        assert short == value


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text(max_size=40) | st.datetimes().map(dt.datetime.isoformat) | st.none())
def test_timestamp_is_utc_or_none_never_an_error(value: str | None) -> None:
    parsed = ex.timestamp(value)
    assert parsed is None or parsed.utcoffset() == dt.timedelta(0)


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.text(max_size=300), st.binary(max_size=64), st.integers())
def test_minimal_row_is_plain_and_keyed_like_the_full_row(
    subject: str, raw: bytes, retries: int
) -> None:
    row = ExhaustedRow(
        company_id=subject,
        source_subject=subject,
        last_error=subject,
        retry_count=retries,
        reason="retries_exhausted",
        event_timestamp=subject,
        envelope_json=None,
        original_json=None,
        raw=raw,
        dlq_stream="DLQ",
        dlq_sequence=7,
        dlq_subject=subject,
    )
    minimal = ex.minimal_row(row, ValueError(subject))
    full = ex.as_stand_in(row)
    # The row's key (dlq_stream, dlq_sequence, payload_digest) is the full row's.
    assert (minimal[8], minimal[9], minimal[11]) == ("DLQ", 7, full[11])
    for value in (minimal[1], minimal[10]):
        assert value.isascii() and len(value) <= 256
    assert -(2**31) <= minimal[3] <= 2**31 - 1
    assert msgspec.json.decode(minimal[5])["minimal"] is True


# -- the partition window ---------------------------------------------------------


@settings(deadline=None)  # a loaded machine is not a failure
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2e9))
def test_last_month_is_always_a_month_dates_can_end(horizon: float, now: float) -> None:
    year, month = partitions.last_month(horizon, now)
    assert 1970 <= year <= 9999 and 1 <= month <= 12 and (year, month) != (9999, 12)
    if math.isfinite(horizon) and 0 <= now + horizon <= 253_000_000_000:
        when = dt.datetime.fromtimestamp(now + horizon, dt.UTC)
        assert (year, month) == (when.year, when.month)


def test_the_budget_admits_2009_to_its_last_month() -> None:
    budget = partitions.PartitionBudget(3, (2026, 5))
    assert not budget.admits(dt.date(2008, 12, 1))
    assert budget.admits(dt.date(2009, 1, 1)) and budget.admits(dt.date(2026, 5, 1))
    assert not budget.admits(dt.date(2026, 6, 1))


# -- the result union -----------------------------------------------------------


def test_a_result_is_written_or_failed_never_both() -> None:
    failure = Failure(FailureKind.PERMANENT, Reason.VALIDATION, "bad row")
    for result in (Written(), Written(inserted=True), NotWritten(failure)):
        encoded = msgspec.json.encode(result)
        assert msgspec.json.decode(encoded, type=WriteResult) == result
    with pytest.raises(TypeError):
        NotWritten()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Written(failure=failure)  # type: ignore[call-arg]
    for bad in (b'{"type": "not_written"}', b'{"type": "failed"}', b'{"inserted": true}'):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(bad, type=WriteResult)
