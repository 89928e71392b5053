"""Handler rows as the store writes them: encoded once, in the worker.

A handler returns RowOps. The worker turns them into Rows blocks here:
consecutive upserts of one shape become one block, each row a JSON object,
which the store hands PostgreSQL as a single jsonb array. So the supervisor,
the one process every message passes through, never decodes, adapts or
re-encodes a row value; it only concatenates bytes.

`plan` orders the blocks of a whole commit group into steps: upserts of one
shape from many messages share a statement, each message's own blocks keep
their order, and a key that appears twice in a step is split into rounds, since
PostgreSQL refuses to upsert one row twice in one statement.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def encode(ops: Sequence[RowOp]) -> tuple[Rows, ...]:
    """Blocks for a handler's rows, in order.

    An update is always a block of its own: the store tells that it found its
    row from the statement's row count. Raises TypeError (or ValueError,
    UnicodeEncodeError) for a value that cannot be stored.
    """
    blocks: list[Rows] = []
    rows: list[bytes] = []
    keys: list[bytes] = []
    months: list[str] = []
    head: RowOp | None = None
    head_shape: Shape | None = None

    def flush() -> None:
        if head is not None:
            blocks.append(
                Rows(
                    op=head.op,
                    table=head.table,
                    key=head.key,
                    columns=tuple(head.values),
                    monotonic=head.monotonic,
                    insert_only=head.insert_only,
                    partitions=tuple(dict.fromkeys(m for m in months if m)),
                    keys=tuple(keys),
                    rows=tuple(rows),
                )
            )

    for op in ops:
        op_shape = (op.op, op.table, op.key, tuple(op.values), op.monotonic, op.insert_only)
        if op.op != "upsert" or op_shape != head_shape:
            flush()
            head, head_shape = op, op_shape
            rows, keys, months = [], [], []
        rows.append(_json.encode(op.values))
        keys.append(_json.encode([op.values[k] for k in op.key]))
        months.append(op.partition)
    flush()
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
    """The steps that write every item's blocks, each item's in its own order.

    An item's block joins the first later step of its shape (upserts only), or
    starts a new step; so item order is kept and steps stay few: one per shape
    for the usual commit group.
    """
    members: list[list[Rows]] = []
    shapes: list[Shape | None] = []  # None: an update step, never shared
    for blocks in items:
        pos = -1
        for block in blocks:
            key = shape(block) if block.op == "upsert" else None
            at = next(
                (i for i in range(pos + 1, len(shapes)) if key is not None and shapes[i] == key),
                None,
            )
            if at is None:
                members.append([])
                shapes.append(key)
                at = len(shapes) - 1
            members[at].append(block)
            pos = at
    return [Step(block=group[0], rounds=rounds(group)) for group in members]


def payload(rows: Sequence[bytes]) -> bytes:
    """A round's rows as one JSON array."""
    return b"[" + b",".join(rows) + b"]"
