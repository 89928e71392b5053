"""dlqproc.rows: handler rows encoded once, and the write plan of a commit group."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.model import RowOp
from dlqproc.rows import encode, payload, plan

# An op: (table, op, key, seq); seq is unique across a test case, so a row in
# the plan can be traced back to the item and position it came from.
ops_ = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["upsert", "upsert", "update"]),
    st.integers(0, 3),
)
items_ = st.lists(st.lists(ops_, max_size=6), max_size=6)


def build(items: list[list[tuple[str, str, int]]]) -> list[list[RowOp]]:
    seq = iter(range(10_000))
    return [
        [
            RowOp(op=op, table=table, key=("k",), values={"k": k, "seq": next(seq)})  # type: ignore[arg-type]
            for table, op, k in item
        ]
        for item in items
    ]


def executed(items: list[list[RowOp]]) -> list[tuple[int, int, str, dict[str, Any]]]:
    """(step, round, table, row) for every row the plan writes, in execution order."""
    out = []
    for s, step in enumerate(plan([encode(item) for item in items])):
        for r, rows in enumerate(step.rounds):
            for row in msgspec.json.decode(payload(rows)):
                out.append((s, r, step.block.table, row))
    return out


@given(items_)
def test_plan_writes_every_row_once_and_keeps_the_order_that_matters(
    raw: list[list[tuple[str, str, int]]],
) -> None:
    items = build(raw)
    done = executed(items)
    assert sorted(row["seq"] for *_, row in done) == [
        op.values["seq"] for item in items for op in item
    ]
    where = {row["seq"]: (s, r) for s, r, _, row in done}
    for item in items:
        for i, a in enumerate(item):
            for b in item[i + 1 :]:
                at_a, at_b = where[a.values["seq"]], where[b.values["seq"]]
                if "update" in (a.op, b.op):
                    # An update is ordered against everything else its message writes.
                    assert at_a[0] < at_b[0]
                elif (a.table, a.values["k"]) == (b.table, b.values["k"]):
                    # A row written twice is written in order, never in one statement.
                    assert at_a < at_b


def test_interleaved_shapes_make_one_block_each() -> None:
    # A history batch whose items alternate between two column sets.
    ops = [
        RowOp(
            op="upsert",
            table="t",
            key=("k",),
            values={"k": i, "x": 1} | ({"y": 2} if i % 2 else {}),
        )
        for i in range(10)
    ]
    blocks = encode(ops)
    assert [len(b.rows) for b in blocks] == [5, 5]
    assert len(plan([blocks, blocks])) == 2


@given(items_)
def test_no_statement_writes_a_key_twice(raw: list[list[tuple[str, str, int]]]) -> None:
    seen: set[tuple[int, int, int]] = set()
    for s, r, _, row in executed(build(raw)):
        assert (s, r, row["k"]) not in seen
        seen.add((s, r, row["k"]))


@given(st.lists(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 9)), max_size=8), max_size=8))
def test_one_shape_ends_as_if_written_item_by_item(items: list[list[tuple[int, int]]]) -> None:
    ops = [
        [RowOp(op="upsert", table="t", key=("k",), values={"k": k, "v": v}) for k, v in item]
        for item in items
    ]
    expected: dict[int, int] = {}
    for item in items:
        expected.update(dict(item))
    state: dict[int, int] = {}
    for step in plan([encode(item) for item in ops]):
        # A block of equal values sends them once (Rows.shared).
        shared = msgspec.json.decode(step.block.shared) if step.block.shared_columns else {}
        for rows in step.rounds:
            for row in msgspec.json.decode(payload(rows)):
                state[row["k"]] = {**row, **shared}["v"]
    assert state == expected


def test_consecutive_upserts_of_a_shape_share_a_block_updates_stand_alone() -> None:
    up = RowOp(op="upsert", table="t", key=("k",), values={"k": 1}, partition="2025-09")
    up2 = RowOp(op="upsert", table="t", key=("k",), values={"k": 2}, partition="2025-10")
    upd = RowOp(op="update", table="t", key=("k",), values={"k": 1})
    blocks = encode([up, up2, upd, upd, up])
    assert [(b.op, len(b.rows)) for b in blocks] == [
        ("upsert", 2),
        ("update", 1),
        ("update", 1),
        ("upsert", 1),
    ]
    assert blocks[0].partitions == ("2025-09", "2025-10")
    assert blocks[0].keys == (b"[1]", b"[2]")


def test_values_are_json_with_iso_dates() -> None:
    op = RowOp(
        op="upsert",
        table="t",
        key=("k",),
        values={"k": "x", "d": dt.date(2025, 9, 8), "j": {"a": [1, None]}, "n": None},
    )
    [block] = encode([op])
    assert msgspec.json.decode(block.rows[0]) == {
        "k": "x",
        "d": "2025-09-08",
        "j": {"a": [1, None]},
        "n": None,
    }


@pytest.mark.parametrize("value", [object(), complex(1, 2), "\ud800"])
def test_unstorable_values_raise(value: object) -> None:
    op = RowOp(op="upsert", table="t", key=("k",), values={"k": 1, "v": value})
    with pytest.raises((TypeError, ValueError)):
        encode([op])
