"""The test handlers (support.handlers, t.barrier included) plus what lifecycle tests need.

t.surrogate  fails with an error text holding a lone surrogate ("\\ud800"),
             permanently (or transiently with "transient": true in the payload).

In a worker process the module refuses to load once the file named by
TEST_HANDLERS_GONE exists: workers started until then run, a replacement
started after it cannot (exit 3: a worker that cannot be replaced).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path

import msgspec

from dlqproc.model import Event, PermanentError, RowOp, TransientError
from support.handlers import HANDLERS as BASE_HANDLERS
from support.handlers import TENANT_DDL

_gone = os.environ.get("TEST_HANDLERS_GONE")
if multiprocessing.parent_process() is not None and _gone and Path(_gone).exists():
    raise RuntimeError("these handlers are gone")

LONE_SURROGATE = "\ud800"


class _Surrogate(msgspec.Struct, frozen=True):
    id: str
    transient: bool = False


def surrogate(event: Event) -> Sequence[RowOp]:
    p = msgspec.json.decode(event.payload, type=_Surrogate)
    text = f"bad text {LONE_SURROGATE} in {p.id}"
    raise TransientError(text) if p.transient else PermanentError(text)


HANDLERS = {**BASE_HANDLERS, "t.surrogate": surrogate}

__all__ = ["HANDLERS", "TENANT_DDL"]
