"""Blocks that send their rows' shared values once (Rows.shared) write what whole rows wrote.

dlqproc.rows.encode leaves out of a big upsert block's rows the columns whose
value is the same on every row, and the store joins them back in PostgreSQL
(dlqproc.store.sql.statement). Here the same sequence of commit groups goes
through the store twice on a real PostgreSQL: once encoded as before (every
row whole) into one tenant's schema, once with sharing from two rows on into
another's; both must leave the same tables and the same result per item.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Sequence
from typing import Any

import hypothesis.strategies as st
import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from test_bench_copypath import tables

from bench.writepath import heavy_blocks
from dlqproc.handlers.whatsapp import TENANT_DDL
from dlqproc.model import FailureKind, Reason, RowOp, Rows
from dlqproc.rows import SHARED_MIN_ROWS, encode, plan
from dlqproc.store import NotWritten, Store, Write, WriteResult, Written

DDL = (
    """CREATE TABLE IF NOT EXISTS {schema}.t (
        k bigint PRIMARY KEY,
        s text,
        n bigint,
        first text,
        j jsonb,
        m jsonb,
        b boolean,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS {schema}.p (
        k bigint NOT NULL,
        d date NOT NULL,
        s text,
        m jsonb,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (k, d)) PARTITION BY RANGE (d)""",
    "CREATE TABLE IF NOT EXISTS {schema}.p_default PARTITION OF {schema}.p DEFAULT",
)

WHOLE = sys.maxsize  # encode's shared_min_rows that never shares: the path before sharing

# Text PostgreSQL holds, and text it refuses (NUL: the item fails as data).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6) | st.sampled_from(
    ["é😀", "a\tb\\c\nd", "\\N", "nul\x00", '"quoted"', ""]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
json_objects = st.dictionaries(texts, json_values, max_size=4)
DATES = ("2024-01-15", "2024-01-31", "2024-02-03", "2009-01-01")
# The columns an item may share: one value for all its rows, or one per row.
SHAREABLE = (
    ("s", texts),
    ("n", st.integers(0, 99)),
    ("first", texts),
    ("m", json_objects),
    ("b", st.booleans()),
)


class Pattern(msgspec.Struct, frozen=True):
    """How an item's rows look: which columns share a value, which optional ones appear."""

    common: frozenset[str]
    j: bool  # t rows carry j: another shape
    b: bool
    copies: bool  # a common "m" as equal copies, one per row: never shared


patterns = st.builds(
    Pattern,
    st.frozensets(st.sampled_from([c for c, _ in SHAREABLE])),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)


def per_row(draw: st.DrawFn, col: str, values: st.SearchStrategy[Any], i: int) -> Any:
    """A value of row `i` for a column the item does not share (no other row has it, but b)."""
    if col == "n":  # as often above a shared n as below it: monotonic matters
        return draw(st.integers(0, 9)) * 10 + i % 10
    if col == "m":
        return {**draw(values), "row": i}
    if col == "b":
        return i % 2 == 0  # two values only: a block may still share it by chance
    return f"{draw(values)}{i}"


@st.composite
def items(draw: st.DrawFn, pattern: Pattern | None = None) -> list[RowOp]:
    """One message's rows: values an item shares on some columns, others its own.

    A common column has one value (one object, as a handler passes its
    last_metadata) on all the item's rows; the others differ from row to row.
    """
    p = pattern if pattern is not None else draw(patterns)
    common = {c: draw(v) for c, v in SHAREABLE if c in p.common}
    ops = []
    for i in range(draw(st.integers(1, 10))):
        k = draw(st.integers(0, 4))  # few keys: duplicates within items and groups
        own = {c: common[c] if c in common else per_row(draw, c, v, i) for c, v in SHAREABLE}
        if p.copies and "m" in common:
            own["m"] = msgspec.json.decode(msgspec.json.encode(common["m"]))
        kind = draw(st.sampled_from(("t", "t", "t", "p", "update")))
        if kind == "t":
            values = {"k": k, "s": own["s"], "n": own["n"], "first": own["first"], "m": own["m"]}
            if p.j:
                values["j"] = draw(json_values)
            if p.b:
                values["b"] = own["b"]
            ops.append(
                RowOp(
                    op="upsert",
                    table="t",
                    key=("k",),
                    values=values,
                    monotonic=("n",),
                    insert_only=("first",),
                )
            )
        elif kind == "p":
            d = draw(st.sampled_from(DATES))
            ops.append(
                RowOp(
                    op="upsert",
                    table="p",
                    key=("k", "d"),
                    values={"k": k, "d": d, "s": own["s"], "m": own["m"]},
                    partition=d[:7],
                )
            )
        else:  # its row may be missing: not_found
            ops.append(
                RowOp(
                    op="update",
                    table="t",
                    key=("k",),
                    values={"k": k, "s": own["s"], "n": own["n"], "m": own["m"]},
                    monotonic=("n",),
                )
            )
    return ops


def untangled(group: list[list[RowOp]]) -> list[list[RowOp]]:
    """The group without the rows whose end state depends on the order of its items.

    A commit group promises no order between its messages except for rows of
    one shape (rows.plan), and sharing values changes which steps blocks land
    in: a row two items write in different shapes, or one item updates and
    another upserts, is left to the first item that writes it.
    """
    writers: dict[tuple[str, str], list[tuple[int, object]]] = {}
    for i, ops in enumerate(group):
        for op in ops:
            row = (op.table, repr([op.values[k] for k in op.key]))
            how = "update" if op.op == "update" else frozenset(op.values)
            writers.setdefault(row, []).append((i, how))
    owner = {
        row: found[0][0]
        for row, found in writers.items()
        if len({i for i, _ in found}) > 1 and len({how for _, how in found}) > 1
    }
    return [
        [op for op in ops if owner.get((op.table, repr([op.values[k] for k in op.key])), i) == i]
        for i, ops in enumerate(group)
    ]


@st.composite
def groups(draw: st.DrawFn) -> list[list[RowOp]]:
    """A commit group; often its items look alike, so their blocks share a shape
    (and only their shared values tell them apart)."""
    pattern = draw(st.none() | patterns)
    return untangled(draw(st.lists(items(pattern), min_size=1, max_size=4)))


sequences = st.lists(groups(), min_size=1, max_size=3)


def verdict(result: WriteResult) -> tuple[str, FailureKind | None, Reason | None]:
    # Not the message: PostgreSQL quotes the JSON it refused, which differs.
    if isinstance(result, NotWritten):
        return ("not_written", result.failure.kind, result.failure.reason)
    return ("written", None, None)


def write_groups(
    dsn: str,
    ddl: Sequence[str],
    tenant: str,
    sequence: Sequence[Sequence[Sequence[RowOp]]],
    shared_min_rows: int,
) -> list[list[tuple[str, FailureKind | None, Reason | None]]]:
    async def main() -> list[list[tuple[str, FailureKind | None, Reason | None]]]:
        store = Store(dsn, statement_timeout=10.0, tenant_ddl=ddl)
        try:
            await store.migrate()
            out = []
            for group in sequence:
                writes = [Write(tenant=tenant, rows=encode(ops, shared_min_rows)) for ops in group]
                out.append([verdict(r) for r in await store.write(writes)])
            return out
        finally:
            await store.close()

    return asyncio.run(main())


def drop(dsn: str, *tenants: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for tenant in tenants:
            conn.execute(
                psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    psycopg.sql.Identifier(f"daisi_{tenant}")
                )
            )


def assert_same(
    dsn: str,
    ddl: Sequence[str],
    sequence: Sequence[Sequence[Sequence[RowOp]]],
    tenants: tuple[str, str],
    shared_min_rows: int = 2,
) -> dict[str, list[str]]:
    """Both encodings of `sequence` leave the same results and tables; the tables."""
    whole, shared = tenants
    try:
        by_whole = write_groups(dsn, ddl, whole, sequence, WHOLE)
        by_shared = write_groups(dsn, ddl, shared, sequence, shared_min_rows)
        assert by_shared == by_whole
        before, after = tables(dsn, f"daisi_{whole}"), tables(dsn, f"daisi_{shared}")
        assert after == before
        return after
    finally:
        drop(dsn, whole, shared)


_example = itertools.count()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequences)
def test_shared_values_leave_the_tables_whole_rows_leave(
    dsn: str, sequence: list[list[list[RowOp]]]
) -> None:
    n = next(_example)
    assert_same(dsn, DDL, sequence, (f"whole{n}", f"shared{n}"))


def test_a_block_of_one_metadata_is_written_once_per_statement_and_rows_get_it(dsn: str) -> None:
    """Two messages of one shape, each its own metadata: never one statement, never mixed."""
    meta = [{"msg_id": "a", "seq": 1}, {"msg_id": "b", "seq": 2}]
    group = [
        [
            RowOp(op="upsert", table="t", key=("k",), values={"k": 10 * i + k, "s": "x", "m": m})
            for k in range(3)
        ]
        for i, m in enumerate(meta)
    ]
    items_ = [encode(ops, shared_min_rows=2) for ops in group]
    assert [b.shared_columns for [b] in items_] == [("s", "m"), ("s", "m")]
    assert len(plan(items_)) == 2  # the same shape, but not the same shared values
    found = assert_same(dsn, DDL, [group], ("onewhole", "oneshared"))
    by_key = {r["k"]: r for r in map(msgspec.json.decode, found["t"])}
    assert {k: r["m"]["msg_id"] for k, r in by_key.items()} == {
        0: "a",
        1: "a",
        2: "a",
        10: "b",
        11: "b",
        12: "b",
    }


def test_shared_monotonic_and_insert_only_columns_keep_their_meaning(dsn: str) -> None:
    def item(n: int, first: str, s: str) -> list[RowOp]:
        return [
            RowOp(
                op="upsert",
                table="t",
                key=("k",),
                values={"k": k, "n": n, "first": first, "s": s},
                monotonic=("n",),
                insert_only=("first",),
            )
            for k in range(SHARED_MIN_ROWS)
        ]

    sequence = [[item(50, "one", "a")], [item(3, "two", "b")], [item(70, "three", "c")]]
    assert [b.shared_columns for b in encode(sequence[1][0])] == [("n", "first", "s")]
    found = assert_same(dsn, DDL, sequence, ("monowhole", "monoshared"), SHARED_MIN_ROWS)
    rows = [msgspec.json.decode(r) for r in found["t"]]
    assert {(r["n"], r["first"], r["s"]) for r in rows} == {(70, "one", "c")}
    found = assert_same(dsn, DDL, sequence[:2], ("monowhole", "monoshared"), SHARED_MIN_ROWS)
    rows = [msgspec.json.decode(r) for r in found["t"]]
    assert {(r["n"], r["first"], r["s"]) for r in rows} == {(50, "one", "b")}


def test_an_update_block_with_shared_values_updates_as_its_whole_rows(dsn: str) -> None:
    """encode never shares an update's values (it stands alone), but the statement can."""
    up = [
        RowOp(op="upsert", table="t", key=("k",), values={"k": 1, "n": 5, "s": "a"}),
        RowOp(op="update", table="t", key=("k",), values={"k": 1, "n": 2, "s": "b", "m": {"x": 1}}),
    ]
    [insert, whole] = encode(up, shared_min_rows=WHOLE)
    shared = msgspec.structs.replace(
        whole,
        columns=("k",),
        rows=(b'{"k":1}',),
        shared_columns=("n", "s", "m"),
        shared=b'{"n":2,"s":"b","m":{"x":1}}',
    )

    async def main(tenant: str, block: Rows) -> list[WriteResult]:
        store = Store(dsn, statement_timeout=10.0, tenant_ddl=DDL)
        try:
            await store.migrate()
            return await store.write([Write(tenant=tenant, rows=(insert, block))])
        finally:
            await store.close()

    assert asyncio.run(main("updwhole", whole)) == [Written()]
    assert asyncio.run(main("updshared", shared)) == [Written()]
    found = tables(dsn, "daisi_updshared")
    assert found == tables(dsn, "daisi_updwhole")
    [row] = [msgspec.json.decode(r) for r in found["t"]]
    assert (row["n"], row["s"], row["m"]) == (2, "b", {"x": 1})


def test_a_heavy_whatsapp_group_shares_its_metadata_and_leaves_the_same_tables(dsn: str) -> None:
    """The benchmark's history batches, with the default threshold, twice (the DO UPDATE path)."""
    blocks = heavy_blocks(3, 30, seed=11)
    encoded = encode(blocks[0])
    assert all("last_metadata" in b.shared_columns for b in encoded if len(b.rows) >= 8)
    assert any(b.shared_columns for b in encoded)
    assert_same(dsn, TENANT_DDL, [blocks, blocks], ("heavywhole", "heavyshared"), SHARED_MIN_ROWS)


def test_an_item_whose_shared_value_is_refused_fails_alone(dsn: str) -> None:
    """A NUL in a shared jsonb value fails its item as data; its group commits."""

    def item(first: int, m: dict[str, Any]) -> list[RowOp]:
        return [
            RowOp(op="upsert", table="t", key=("k",), values={"k": first + k, "m": m})
            for k in range(SHARED_MIN_ROWS)
        ]

    sequence = [[item(0, {"ok": 1}), item(100, {"bad": "\x00"}), item(200, {"ok": 2})]]
    assert [b.shared_columns for b in encode(sequence[0][1])] == [("m",)]
    results = write_groups(dsn, DDL, "nulshared", sequence, SHARED_MIN_ROWS)
    assert results == [
        [
            ("written", None, None),
            ("not_written", FailureKind.PERMANENT, Reason.VALIDATION),
            ("written", None, None),
        ]
    ]
    found = tables(dsn, "daisi_nulshared")["t"]
    assert sorted(msgspec.json.decode(r)["k"] for r in found) == [
        *range(SHARED_MIN_ROWS),
        *range(200, 200 + SHARED_MIN_ROWS),
    ]


# The worker's part, pure: what a block shares.


@given(st.lists(st.tuples(st.integers(0, 3), json_values, st.booleans()), min_size=1, max_size=12))
def test_rows_and_their_shared_values_are_the_values_each_row_had(
    raw: list[tuple[int, Any, bool]],
) -> None:
    one = {"x": [1, "y"]}
    ops = [
        RowOp(
            op="upsert",
            table="t",
            key=("k",),
            # c: per row; o: one object (shared); e: equal copies (never shared by identity).
            values={"k": k, "c": v, "o": one, "e": {"x": [1, "y"]}, "t": "same", "f": flag},
        )
        for k, v, flag in raw
    ]
    [block] = encode(ops, shared_min_rows=2)
    shared = msgspec.json.decode(block.shared) if block.shared_columns else {}
    assert set(block.shared_columns).isdisjoint(block.columns)
    assert "k" not in block.shared_columns
    for op, row in zip(ops, block.rows, strict=True):
        decoded = msgspec.json.decode(row)
        assert list(decoded) == list(block.columns)
        assert {**decoded, **shared} == op.values
    if len(ops) >= 2:
        assert {"o", "t"} <= set(block.shared_columns)
        assert "e" not in block.shared_columns
    else:
        assert block.shared_columns == ()


@pytest.mark.parametrize(("a", "b"), [(1, True), (0, False), (1, 1.0), ("1", 1)])
def test_values_python_calls_equal_but_postgres_reads_apart_are_not_shared(a: Any, b: Any) -> None:
    ops = [
        RowOp(op="upsert", table="t", key=("k",), values={"k": k, "v": v})
        for k, v in enumerate((a, b))
    ]
    [block] = encode(ops, shared_min_rows=2)
    assert block.shared_columns == ()
