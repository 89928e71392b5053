"""The worker process: receives batches of deliveries, returns batches of outcomes.

Runs in a child process started by dlqproc.pool. It does no network or
database I/O: bytes in over its pipe, reprocess each delivery, bytes out.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing.connection import Connection

import msgspec

from dlqproc.handlers import RegistryError, load
from dlqproc.metrics import WorkerMetrics
from dlqproc.model import Delivery, FailureKind, Outcome, Reason
from dlqproc.reprocess import Limits, handle

# Exit code of a worker whose handlers module does not load: the supervisor
# stops instead of respawning it in a loop.
EXIT_CANNOT_START = 78


class Hello(msgspec.Struct, frozen=True, array_like=True):
    pid: int


def _encodable(encoder: msgspec.msgpack.Encoder, outcome: Outcome) -> Outcome:
    """The outcome, or a handler_error failure when its rows cannot be sent."""
    try:
        encoder.encode(outcome)
    except (TypeError, ValueError, OverflowError) as exc:
        return msgspec.structs.replace(
            outcome,
            ok=False,
            rows=(),
            kind=FailureKind.TRANSIENT,
            reason=Reason.HANDLER_ERROR,
            error=f"handler returned values that cannot be stored: {exc}"[:2000],
        )
    return outcome


def main(conn: Connection, module: str, limits: Limits) -> None:
    # Ctrl-C reaches the whole process group; only the supervisor decides
    # how to shut down, and it does so by closing this pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        registry = load(module)
    except RegistryError as exc:
        print(f"dlqproc worker cannot start: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_CANNOT_START)
    # PROMETHEUS_MULTIPROC_DIR is inherited: these series go to this pid's files.
    handler_seconds = WorkerMetrics().handler_seconds
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(list[Delivery])
    conn.send_bytes(encoder.encode(Hello(os.getpid())))
    while True:
        try:
            batch = decoder.decode(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the supervisor closed the pipe or went away
        outcomes: list[Outcome] = [handle(d, registry, limits) for d in batch]
        for o in outcomes:
            if o.ok:
                handler_seconds.labels(o.base).observe(o.handler_seconds)
        try:
            reply = encoder.encode(outcomes)
        except (TypeError, ValueError, OverflowError):
            reply = encoder.encode([_encodable(encoder, o) for o in outcomes])
        try:
            conn.send_bytes(reply)
        except (BrokenPipeError, OSError):
            return
