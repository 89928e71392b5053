"""The test handlers (support.handlers) plus what lifecycle tests need to observe.

t.barrier    writes "<TEST_BARRIER_DIR>/started-<id>" when it starts, then waits
             (60 s at most) for "<TEST_BARRIER_DIR>/release" before it upserts its
             row: work in flight is a fact a test can see, never a guess made
             with a sleep.
t.surrogate  fails with an error text holding a lone surrogate ("\\ud800"),
             permanently (or transiently with "transient": true in the payload).

In a worker process the module refuses to load once the file named by
TEST_HANDLERS_GONE exists: workers started until then run, a replacement
started after it cannot (exit 3: a worker that cannot be replaced).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec

from dlqproc.model import Event, PermanentError, RowOp, TransientError
from support.handlers import HANDLERS as BASE_HANDLERS
from support.handlers import TENANT_DDL

_gone = os.environ.get("TEST_HANDLERS_GONE")
if multiprocessing.parent_process() is not None and _gone and Path(_gone).exists():
    raise RuntimeError("these handlers are gone")

BARRIER_SECONDS = 60.0
LONE_SURROGATE = "\ud800"


class _Barrier(msgspec.Struct, frozen=True):
    id: str


class _Surrogate(msgspec.Struct, frozen=True):
    id: str
    transient: bool = False


def barrier(event: Event) -> Sequence[RowOp]:
    p = msgspec.json.decode(event.payload, type=_Barrier)
    folder = Path(os.environ["TEST_BARRIER_DIR"])
    (folder / f"started-{p.id}").touch()
    deadline = time.monotonic() + BARRIER_SECONDS
    while not (folder / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    values = {"id": p.id, "company_id": event.tenant, "attempt": event.attempt}
    return (RowOp(op="upsert", table="test_rows", key=("id",), values=values),)


def surrogate(event: Event) -> Sequence[RowOp]:
    p = msgspec.json.decode(event.payload, type=_Surrogate)
    text = f"bad text {LONE_SURROGATE} in {p.id}"
    raise TransientError(text) if p.transient else PermanentError(text)


HANDLERS = {**BASE_HANDLERS, "t.barrier": barrier, "t.surrogate": surrogate}

__all__ = ["HANDLERS", "TENANT_DDL"]
