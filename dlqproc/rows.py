"""Handler rows as the store writes them: encoded once, in the worker.

A handler returns RowOps. The worker turns them into Rows blocks here:
consecutive upserts of one shape become one block, each row a JSON object,
which the store hands PostgreSQL as a single jsonb array. So the supervisor,
the one process every message passes through, never decodes, adapts or
re-encodes a row value; it only concatenates bytes.

`form="copy"` encodes each row as a line of PostgreSQL's COPY text format
instead (dlqproc.copyrows), for the store's COPY path (dlqproc.bulk). It gives
the same tables (tests/test_bulk.py) but was not faster on the heavy blocks
the service writes (bench/README.md, "Write paths"), so JSON stays the default
and both sides must agree on the form (Store's `rows_form`).

`plan` orders the blocks of a whole commit group into steps: upserts of one
shape from many messages share a statement, each message's segments keep their
order, and a key that appears twice in a step is split into rounds, since
PostgreSQL refuses to upsert one row twice in one statement. Messages of one
commit group arrived together, so no order between them is promised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from dlqproc.copyrows import line
from dlqproc.model import RowOp, Rows

Form = Literal["copy", "json"]

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


class _Block:
    """A block being filled: rows of one shape within one segment."""

    def __init__(self, op: RowOp) -> None:
        self.head = op
        self.rows: list[bytes] = []
        self.keys: list[bytes] = []
        self.months: dict[str, None] = {}

    def build(self, segment: int) -> Rows:
        op = self.head
        return Rows(
            op=op.op,
            table=op.table,
            key=op.key,
            columns=tuple(op.values),
            monotonic=op.monotonic,
            insert_only=op.insert_only,
            partitions=tuple(m for m in self.months if m),
            keys=tuple(self.keys),
            rows=tuple(self.rows),
            segment=segment,
        )


def encode(ops: Sequence[RowOp], form: Form = "json") -> tuple[Rows, ...]:
    """Blocks for a handler's rows, one per shape and segment.

    Upserts of distinct rows commute, so within a segment the upserts of each
    shape form one block whatever their interleaving (handlers leave out
    absent optional columns, so a history batch mixes a few shapes). Order is
    kept where it matters: an update is a segment of its own (its key may not
    be the upsert key, so it is ordered against everything), and a row that
    comes back in another shape starts a new segment. An update also stands
    alone so that the store can tell from the row count whether it matched.
    Raises TypeError (or ValueError) for a value that cannot be stored.
    `form` is how each row is encoded: a COPY text line, or a JSON object.
    """
    as_copy = form == "copy"
    blocks: list[Rows] = []
    segment = 0
    open_: dict[Shape, _Block] = {}
    owner: dict[tuple[str, bytes], Shape] = {}  # a row's shape in this segment

    def close() -> None:
        nonlocal segment
        if open_:
            blocks.extend(b.build(segment) for b in open_.values())
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
        block.rows.append(line(op.values.values()) if as_copy else _json.encode(op.values))
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

    A block joins the first step of its shape (upserts only) after every step
    of its item's previous segment, or starts a new step; so steps stay few,
    about one per shape for the usual commit group.
    """
    members: list[list[Rows]] = []
    shapes: list[Shape | None] = []  # None: an update step, never shared
    for blocks in items:
        floor, top, segment = -1, -1, None
        for block in blocks:
            if block.segment != segment:
                floor, segment = top, block.segment
            key = shape(block) if block.op == "upsert" else None
            at = None
            if key is not None:
                at = next((i for i in range(floor + 1, len(shapes)) if shapes[i] == key), None)
            if at is None:
                members.append([])
                shapes.append(key)
                at = len(shapes) - 1
            members[at].append(block)
            top = max(top, at)
    return [Step(block=group[0], rounds=rounds(group)) for group in members]


def payload(rows: Sequence[bytes]) -> bytes:
    """A round's rows as one JSON array."""
    return b"[" + b",".join(rows) + b"]"
