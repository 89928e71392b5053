"""The COPY write path (dlqproc.bulk, dlqproc.copyrows) against the jsonb path it replaces.

The same sequence of commit groups goes through two stores on one real
PostgreSQL, one per row form, each into its own tenant's schema; both must
leave identical tables and fail the same items.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqproc.model import FailureKind, Reason, RowOp
from dlqproc.rows import Form, encode
from dlqproc.store import Store, Write, Written

DDL = (
    """CREATE TABLE IF NOT EXISTS {schema}.t (
        k bigint PRIMARY KEY,
        s text,
        n bigint,
        first text,
        j jsonb,
        b boolean,
        req text NOT NULL DEFAULT 'd',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS {schema}.p (
        k bigint NOT NULL,
        d date NOT NULL,
        s text,
        n bigint,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (k, d)) PARTITION BY RANGE (d)""",
    "CREATE TABLE IF NOT EXISTS {schema}.p_default PARTITION OF {schema}.p DEFAULT",
)
_tenants = itertools.count(1)

text_ = st.text(max_size=12) | st.sampled_from(["", "a\tb\nc\\d\re", "\\N", "x\x00y", "çé😀"])
json_ = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | text_,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_, inner, max_size=3),
    max_leaves=6,
)
key_ = st.integers(0, 4)


@st.composite
def op_(draw: st.DrawFn) -> RowOp:
    table = draw(st.sampled_from(["t", "t", "p"]))
    kind = draw(st.sampled_from(["upsert", "upsert", "upsert", "update"]))
    k = draw(key_)
    if table == "p":
        month = draw(st.sampled_from(["2024-01", "2024-02", "2024-03"]))
        values: dict[str, Any] = {"k": k, "d": f"{month}-{draw(st.integers(1, 28)):02d}"}
        if draw(st.booleans()):
            values["s"] = draw(text_ | st.none())
        values["n"] = draw(st.integers(-5, 5))
        return RowOp(
            op=kind,  # type: ignore[arg-type]
            table="p",
            key=("k", "d"),
            values=values,
            monotonic=("n",),
            partition=month if draw(st.booleans()) else "",
        )
    values = {"k": k}
    # jsonb takes objects, arrays and null (RowOp's contract): a bare string
    # would be JSON text to COPY, see dlqproc.copyrows.
    for col, strategy in (
        ("s", text_ | st.none()),
        ("n", st.integers(-5, 5) | st.none()),
        ("first", text_),
        ("j", st.dictionaries(text_, json_, max_size=3) | st.lists(json_, max_size=3) | st.none()),
        ("b", st.booleans() | st.none()),
    ):
        if draw(st.booleans()):
            values[col] = draw(strategy)
    return RowOp(
        op=kind,  # type: ignore[arg-type]
        table="t",
        key=("k",),
        values=values,
        monotonic=("n",),
        insert_only=("first",),
    )


groups_ = st.lists(st.lists(st.lists(op_(), min_size=1, max_size=5), max_size=4), max_size=4)


def _snapshot(dsn: str, schema: str) -> dict[str, list[Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        out: dict[str, list[Any]] = {}
        for table, order in (("t", "k"), ("p", "k, d")):
            cur = conn.execute(
                "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text))",
                (schema, table),
            )
            if (cur.fetchone() or (None,))[0] is None:  # nothing was written
                out[table] = []
                continue
            cur = conn.execute(
                f"SELECT to_jsonb(x) - 'created_at' - 'updated_at', tableoid::regclass::text"
                f' FROM "{schema}".{table} x ORDER BY {order}'
            )
            # The partition a row sits in, without its schema.
            out[table] = [(r[0], r[1].rsplit(".", 1)[-1]) for r in cur.fetchall()]
        return out


def _outcome(w: Written) -> tuple[str, str] | None:
    if w.failure is None:
        return None
    return (w.failure.kind.value, w.failure.reason.value)


async def _apply(
    dsn: str, form: Form, tenant: str, groups: list[list[list[RowOp]]]
) -> list[list[tuple[str, str] | None]]:
    store = Store(dsn, statement_timeout=10.0, tenant_ddl=DDL, rows_form=form)
    try:
        await store.migrate()
        results = []
        for group in groups:
            writes = [Write(tenant=tenant, rows=encode(item, form)) for item in group]
            results.append([_outcome(w) for w in await store.write(writes)])
        return results
    finally:
        await store.close()


def both(dsn: str, groups: list[list[list[RowOp]]]) -> tuple[Any, Any]:
    n = next(_tenants)
    done = {}
    for form in ("json", "copy"):
        tenant = f"{form}{n}"
        outcomes = asyncio.run(_apply(dsn, form, tenant, groups))
        done[form] = (outcomes, _snapshot(dsn, f"daisi_{tenant}"))
    return done["json"], done["copy"]


def _same(dsn: str, groups: list[list[list[RowOp]]]) -> None:
    (json_outcomes, json_tables), (copy_outcomes, copy_tables) = both(dsn, groups)
    assert copy_outcomes == json_outcomes
    assert copy_tables == json_tables
    # Only the rows' own faults fail items here: never the database as such.
    reasons = {o[1] for group in copy_outcomes for o in group if o is not None}
    assert reasons <= {Reason.NOT_FOUND.value, Reason.VALIDATION.value}, reasons


# Each example makes two tenants' schemas and tables: a few seconds on a busy
# machine, so the quick suite tries a dozen and the slow one many more.
_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=12, deadline=None, suppress_health_check=_HEALTH)
@given(groups_)
def test_copy_path_leaves_the_tables_the_jsonb_path_leaves(
    dsn: str, groups: list[list[list[RowOp]]]
) -> None:
    _same(dsn, groups)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=_HEALTH)
@given(groups_)
def test_copy_path_leaves_the_same_tables_many_cases(
    dsn: str, groups: list[list[list[RowOp]]]
) -> None:
    _same(dsn, groups)


def test_same_tables_in_a_known_tricky_case(dsn: str) -> None:
    """Duplicate keys in one group, monotonic and insert-only columns, a missing
    row, NUL and escapes, jsonb, partitions: one case pinned beside the property."""
    t = {
        "op": "upsert",
        "table": "t",
        "key": ("k",),
        "monotonic": ("n",),
        "insert_only": ("first",),
    }
    groups = [
        [
            [
                RowOp(**t, values={"k": 1, "s": "a\tb\\c\nd", "n": 5, "first": "one"}),  # type: ignore[arg-type]
                RowOp(**t, values={"k": 1, "s": "é😀", "n": 3, "first": "two", "j": {"x": [1]}}),  # type: ignore[arg-type]
            ],
            [RowOp(op="update", table="t", key=("k",), values={"k": 9, "s": "gone"})],
            [RowOp(**t, values={"k": 2, "s": "x\x00y"})],  # type: ignore[arg-type]
            [
                RowOp(
                    op="upsert",
                    table="p",
                    key=("k", "d"),
                    values={"k": 1, "d": "2024-02-03", "n": 1},
                    monotonic=("n",),
                    partition="2024-02",
                )
            ],
            [RowOp(**t, values={"k": 1, "n": 9, "j": {"v": "\\N\x01"}})],  # type: ignore[arg-type]
        ]
    ]
    (json_outcomes, json_tables), (copy_outcomes, copy_tables) = both(dsn, groups)
    assert copy_outcomes == json_outcomes
    assert copy_tables == json_tables
    # The missing row and the NUL failed alone; the rest committed.
    assert copy_outcomes[0][1] == (FailureKind.TRANSIENT.value, Reason.NOT_FOUND.value)
    assert copy_outcomes[0][2] == (FailureKind.PERMANENT.value, Reason.VALIDATION.value)
    assert [o for i, o in enumerate(copy_outcomes[0]) if i not in (1, 2)] == [None, None, None]
    assert [r[1] for r in copy_tables["p"]] == ["p_2024_02"]
    row = copy_tables["t"][0][0]
    assert (row["s"], row["n"], row["first"]) == ("é😀", 9, "one")


def test_a_failing_row_fails_alone_on_the_copy_path(dsn: str) -> None:
    ok = RowOp(op="upsert", table="t", key=("k",), values={"k": 1, "s": "fine"})
    bad = RowOp(op="upsert", table="t", key=("k",), values={"k": 2, "b": "not a boolean"})
    also = RowOp(op="upsert", table="t", key=("k",), values={"k": 3, "s": "fine too"})
    outcomes = asyncio.run(_apply(dsn, "copy", "alone", [[[ok], [bad], [also]]]))
    assert outcomes == [[None, (FailureKind.PERMANENT.value, Reason.VALIDATION.value), None]]
    assert [r[0]["k"] for r in _snapshot(dsn, "daisi_alone")["t"]] == [1, 3]


def test_a_table_the_schema_lacks_fails_its_item_as_data(dsn: str) -> None:
    ok = RowOp(op="upsert", table="t", key=("k",), values={"k": 1})
    nowhere = RowOp(op="upsert", table="nope", key=("k",), values={"k": 1})
    odd = RowOp(op="upsert", table="t", key=("k",), values={"k": 2, "nope": 1})
    outcomes = asyncio.run(_apply(dsn, "copy", "lacks", [[[ok], [nowhere], [odd]]]))
    assert outcomes[0][0] is None
    for failed in outcomes[0][1:]:
        assert failed == (FailureKind.PERMANENT.value, Reason.VALIDATION.value)
