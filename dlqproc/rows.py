"""Handler rows as the store writes them: encoded once, in the worker.

A handler returns RowOps. The worker turns them into Rows blocks here:
consecutive upserts of one shape become one block, each row a JSON object,
which the store hands PostgreSQL as a single jsonb array. So the supervisor,
the one process every message passes through, never decodes, adapts or
re-encodes a row value; it only concatenates bytes.

A block of many upserts sends the columns whose value is the same on every
row (a history batch's last_metadata, company_id and agent_id) once, apart
from the rows: PostgreSQL then parses them once per statement instead of once
per row (bench/README.md, "Write paths": ~20% of its CPU per heavy row).

`plan` orders the blocks of a whole commit group into steps: upserts of one
shape from many messages share a statement, each message's segments keep their
order, and a key that appears twice in a step is split into rounds, since
PostgreSQL refuses to upsert one row twice in one statement. Messages of one
commit group arrived together, so no order between them is promised.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

import msgspec

from dlqproc.model import RowOp, Rows

Shape = tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def _refuse(value: Any) -> Any:
    raise TypeError(f"cannot store a {type(value).__name__} value")


# Dates, datetimes, UUIDs and decimals become their ISO/text forms, which
# PostgreSQL parses for columns of those types; anything else is refused.
_json = msgspec.json.Encoder(enc_hook=_refuse)


def shape(block: Rows) -> Shape:
    return (
        block.op,
        block.table,
        block.key,
        block.columns,
        block.monotonic,
        block.insert_only,
    )


# Below this many rows a block sends every value in its rows: a block with
# shared values gets a statement of its own, and a few rows save PostgreSQL
# less than that statement costs; light messages' one-row blocks keep sharing
# one statement across a commit group.
SHARED_MIN_ROWS = 8


def _shared_columns(ops: Sequence[RowOp]) -> tuple[str, ...]:
    """The columns, key aside, whose value encodes alike on every row.

    The same object on every row (a handler's one last_metadata), or for a
    str or int an equal value of the same type: Python's 1 == True == 1.0
    would join values PostgreSQL reads differently, and equal containers may
    hold them. Columns are compared whole, in C loops (map, count): rows of
    one chat often agree for a while, so a row-by-row scan costs more.
    """
    head = ops[0].values
    names = [c for c in head if c not in ops[0].key]
    if not names:
        return ()
    get = itemgetter(*names)
    rows = map(get, map(attrgetter("values"), ops))
    columns = zip(*rows, strict=True) if len(names) > 1 else [tuple(rows)]
    shared = []
    for name, column in zip(names, columns, strict=True):
        first = column[0]
        kind = type(first)
        if kind is str or kind is int:
            same = column.count(first) == len(column) and set(map(type, column)) == {kind}
        else:
            same = all(map(is_, column, repeat(first)))
        if same:
            shared.append(name)
    return tuple(shared)


def _encode_without(values: dict[str, Any], shared: tuple[str, ...]) -> bytes:
    row = values.copy()  # a copy and a few deletions cost less than rebuilding it
    for c in shared:
        del row[c]
    return _json.encode(row)


class _Block:
    """A block being filled: rows of one shape within one segment."""

    def __init__(self, op: RowOp) -> None:
        self.head = op
        self.ops: list[RowOp] = []
        self.keys: list[bytes] = []
        self.months: dict[str, None] = {}

    def build(self, segment: int, shared_min_rows: int) -> Rows:
        op = self.head
        ops = self.ops
        shared: tuple[str, ...] = ()
        if op.op == "upsert" and len(ops) >= shared_min_rows:
            shared = _shared_columns(ops)
        if shared:
            rows = tuple(_encode_without(o.values, shared) for o in ops)
            common = _json.encode({c: op.values[c] for c in shared})
        else:
            rows = tuple(_json.encode(o.values) for o in ops)
            common = b""
        return Rows(
            op=op.op,
            table=op.table,
            key=op.key,
            columns=tuple(c for c in op.values if c not in shared),
            monotonic=op.monotonic,
            insert_only=op.insert_only,
            partitions=tuple(m for m in self.months if m),
            keys=tuple(self.keys),
            rows=rows,
            segment=segment,
            shared_columns=shared,
            shared=common,
        )


def encode(ops: Sequence[RowOp], shared_min_rows: int = SHARED_MIN_ROWS) -> tuple[Rows, ...]:
    """Blocks for a handler's rows, one per shape and segment.

    Upserts of distinct rows commute, so within a segment the upserts of each
    shape form one block whatever their interleaving (handlers leave out
    absent optional columns, so a history batch mixes a few shapes). Order is
    kept where it matters: an update is a segment of its own (its key may not
    be the upsert key, so it is ordered against everything), and a row that
    comes back in another shape starts a new segment. An update also stands
    alone so that the store can tell from the row count whether it matched.
    An upsert block of `shared_min_rows` rows or more sends the values its
    rows share once (Rows.shared).
    Raises TypeError (or ValueError) for a value that cannot be stored.
    """
    blocks: list[Rows] = []
    segment = 0
    open_: dict[Shape, _Block] = {}
    owner: dict[tuple[str, bytes], Shape] = {}  # a row's shape in this segment

    def close() -> None:
        nonlocal segment
        if open_:
            blocks.extend(b.build(segment, shared_min_rows) for b in open_.values())
            segment += 1
        open_.clear()
        owner.clear()

    for op in ops:
        op_shape = (op.op, op.table, op.key, tuple(op.values), op.monotonic, op.insert_only)
        key = _json.encode([op.values[k] for k in op.key])
        if op.op != "upsert" or owner.get((op.table, key), op_shape) != op_shape:
            close()
        owner[(op.table, key)] = op_shape
        block = open_.get(op_shape)
        if block is None:
            block = open_[op_shape] = _Block(op)
        block.ops.append(op)
        block.keys.append(key)
        block.months[op.partition] = None
        if op.op != "upsert":
            close()
    close()
    return tuple(blocks)


class Step(msgspec.Struct, frozen=True):
    """One statement shape of a commit group: `rounds` of rows, each with distinct keys."""

    block: Rows  # the first block of the step: its shape is every block's
    rounds: tuple[tuple[bytes, ...], ...]


def rounds(blocks: Sequence[Rows]) -> tuple[tuple[bytes, ...], ...]:
    """The blocks' rows split so that no key repeats within a round.

    The n-th occurrence of a key goes to round n, so running the rounds in
    order writes every key's rows in their original order.
    """
    if len(blocks) == 1 and len(set(blocks[0].keys)) == len(blocks[0].keys):
        return (blocks[0].rows,)  # the common case: nothing to split
    seen: dict[bytes, int] = {}
    out: list[list[bytes]] = []
    for block in blocks:
        for key, row in zip(block.keys, block.rows, strict=True):
            n = seen.get(key, 0)
            seen[key] = n + 1
            if n == len(out):
                out.append([])
            out[n].append(row)
    return tuple(tuple(r) for r in out)


def plan(items: Sequence[Sequence[Rows]]) -> list[Step]:
    """The steps that write every item's blocks, keeping each item's segments in order.

    A block joins the last step of its shape (upserts only) if that step comes
    after every step of its item's previous segment and shares the block's
    shared values, or starts a new step; so steps stay few, about one per shape
    for a commit group of light messages, and one per block that shares values.
    Blocks of one shape are written in the order of the items, however their
    values are shared, so a key written twice ends as its last item left it.
    """
    members: list[list[Rows]] = []
    # None: an update step, never shared. A block's shared values are its
    # statement's parameter, so only blocks sharing the same ones join.
    steps: list[tuple[Shape, tuple[str, ...], bytes] | None] = []
    last: dict[tuple[object, ...], int] = {}  # the last step of each shape, shared or not
    for blocks in items:
        floor, top, segment = -1, -1, None
        for block in blocks:
            if block.segment != segment:
                floor, segment = top, block.segment
            key = base = None
            at = -1
            if block.op == "upsert":
                key = (shape(block), block.shared_columns, block.shared)
                base = _whole_shape(block)
                at = last.get(base, -1)
            if at <= floor or steps[at] != key:
                members.append([])
                steps.append(key)
                at = len(steps) - 1
                if base is not None:
                    last[base] = at
            members[at].append(block)
            top = max(top, at)
    return [Step(block=group[0], rounds=rounds(group)) for group in members]


def _whole_shape(block: Rows) -> tuple[object, ...]:
    """The block's shape as if it shared nothing (its columns in any order)."""
    columns = frozenset(block.columns + block.shared_columns)
    return (block.table, block.key, columns, block.monotonic, block.insert_only)


def payload(rows: Sequence[bytes]) -> bytes:
    """A round's rows as one JSON array."""
    return b"[" + b",".join(rows) + b"]"
