"""Deterministic test handlers: behaviour chosen by the payload and the attempt number.

t.ok     upsert test_rows
t.flaky  transient failure on deliveries 1..fail_times, then upsert
t.fail   transient failure on every delivery
t.perm   permanent failure
t.slow   sleep `sleep` seconds, then upsert
t.hang   sleep an hour on deliveries 1..hang_times, then upsert
t.crash  the worker process dies (os._exit or SIGSEGV) on deliveries 1..crash_times
t.update update a test_rows row (not found is transient)
t.badop, t.badkey  buggy handlers returning RowOps the store cannot apply
t.badvalue  a buggy handler returning a value no column can hold
t.big    an upsert of 2,000 padded rows (megabyte replies)
t.record append "<id> <attempt>" to <record>/<pid> (one line per run), sleep, then upsert
t.barrier  append the attempt to <TEST_BARRIER_DIR>/<id>.started, wait for
           <TEST_BARRIER_DIR>/release (at most 120 s, then fail transiently), then
           upsert: work in flight is a fact a test sees (support.barrier.Barrier)
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence

import msgspec

from dlqproc.model import Event, PermanentError, RowOp, TransientError


class Payload(msgspec.Struct, frozen=True):
    id: str
    fail_times: int = 0
    sleep: float = 0.0
    hang_times: int = 0
    crash_times: int = 0
    segfault: bool = False
    record: str = ""  # a directory: every run of the handler leaves a line there


def _payload(event: Event) -> Payload:
    try:
        return msgspec.json.decode(event.payload, type=Payload)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"bad test payload: {exc}") from None


def _row(event: Event, p: Payload) -> RowOp:
    return RowOp(
        op="upsert",
        table="test_rows",
        key=("id",),
        values={"id": p.id, "company_id": event.tenant, "attempt": event.attempt},
    )


def ok(event: Event) -> Sequence[RowOp]:
    return (_row(event, _payload(event)),)


def flaky(event: Event) -> Sequence[RowOp]:
    p = _payload(event)
    if event.attempt <= p.fail_times:
        raise TransientError(f"flaky {p.id} failing delivery {event.attempt}")
    return (_row(event, p),)


def fail(event: Event) -> Sequence[RowOp]:
    raise TransientError(f"always failing {_payload(event).id}")


def perm(event: Event) -> Sequence[RowOp]:
    raise PermanentError(f"permanently bad {_payload(event).id}")


def slow(event: Event) -> Sequence[RowOp]:
    p = _payload(event)
    time.sleep(p.sleep)
    return (_row(event, p),)


def hang(event: Event) -> Sequence[RowOp]:
    p = _payload(event)
    if event.attempt <= p.hang_times:
        time.sleep(3600)
    return (_row(event, p),)


def crash(event: Event) -> Sequence[RowOp]:
    p = _payload(event)
    if event.attempt <= p.crash_times:
        if p.segfault:
            ctypes.string_at(0)  # SIGSEGV: the process dies without any Python cleanup
        os._exit(9)
    return (_row(event, p),)


def record(event: Event) -> Sequence[RowOp]:
    """A side effect per run, beside the idempotent upsert that would hide a second run."""
    p = _payload(event)
    with open(os.path.join(p.record, str(os.getpid())), "a") as f:
        f.write(f"{p.id} {event.attempt}\n")
    time.sleep(p.sleep)
    return (_row(event, p),)


def barrier(event: Event) -> Sequence[RowOp]:
    """In flight for certain: running, and known to be, until the test releases it."""
    p = _payload(event)
    folder = os.environ["TEST_BARRIER_DIR"]
    with open(os.path.join(folder, f"{p.id}.started"), "a") as f:
        f.write(f"{event.attempt}\n")
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(folder, "release")):
        if time.monotonic() > deadline:
            raise TransientError(f"barrier {p.id} never released")
        time.sleep(0.02)
    return (_row(event, p),)


def update(event: Event) -> Sequence[RowOp]:
    p = _payload(event)
    return (RowOp(op="update", table="test_rows", key=("id",), values={"id": p.id, "attempt": 0}),)


def badop(event: Event) -> Sequence[RowOp]:
    """A buggy handler: an operation the store does not know."""
    p = _payload(event)
    return (RowOp(op="delete", table="test_rows", key=("id",), values={"id": p.id}),)  # type: ignore[arg-type]


def badkey(event: Event) -> Sequence[RowOp]:
    """A buggy handler: the key column has no value."""
    return (RowOp(op="update", table="test_rows", key=("id",), values={"attempt": 1}),)


def badvalue(event: Event) -> Sequence[RowOp]:
    """A buggy handler: a value no column can hold (a complex number)."""
    p = _payload(event)
    values = {"id": p.id, "company_id": event.tenant, "attempt": complex(1, 2)}
    return (RowOp(op="upsert", table="test_rows", key=("id",), values=values),)


def big(event: Event) -> Sequence[RowOp]:
    """A reply far larger than a pipe's buffer: 2,000 rows."""
    p = _payload(event)
    return tuple(
        RowOp(
            op="upsert",
            table="test_rows",
            key=("id",),
            values={
                "id": f"{p.id}-{i}",
                "company_id": event.tenant,
                "attempt": i,
                "pad": "x" * 1000,
            },
        )
        for i in range(2000)
    )


HANDLERS = {
    "t.big": big,
    "t.badvalue": badvalue,
    "t.badop": badop,
    "t.badkey": badkey,
    "t.ok": ok,
    "t.flaky": flaky,
    "t.fail": fail,
    "t.perm": perm,
    "t.slow": slow,
    "t.hang": hang,
    "t.crash": crash,
    "t.update": update,
    "t.record": record,
    "t.barrier": barrier,
}

TENANT_DDL = (
    """CREATE TABLE IF NOT EXISTS {schema}.test_rows (
        id text PRIMARY KEY,
        company_id text NOT NULL,
        attempt integer NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
)
