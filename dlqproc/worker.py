"""The worker process: receives batches of deliveries, returns batches of outcomes.

Runs in a child process started by dlqproc.pool. It does no network or
database I/O: length-prefixed frames in over a socketpair with the supervisor,
reprocess each delivery, frames out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

import msgspec

from dlqproc.handlers import Registry, RegistryError, load
from dlqproc.metrics import WorkerMetrics
from dlqproc.model import Delivery, Failed, FailureKind, Ok, Outcome, Reason, failure
from dlqproc.reprocess import Limits, handle

# Exit code of a worker whose handlers module does not load: the supervisor
# stops instead of respawning it in a loop.
EXIT_CANNOT_START = 78


class Hello(msgspec.Struct, frozen=True, array_like=True):
    pid: int


def _encodable(encoder: msgspec.msgpack.Encoder, outcome: Outcome) -> Outcome:
    """The outcome, or a handler_error failure when its rows cannot be sent.

    A failure whose text cannot be sent (an exception's message holding a lone
    surrogate) stays that failure, the unencodable characters escaped.
    """
    try:
        encoder.encode(outcome)
        return outcome
    except (TypeError, ValueError, OverflowError) as exc:
        problem = exc
    if isinstance(outcome, Failed):
        escaped = outcome.error.encode("utf-8", "backslashreplace").decode("utf-8")
        same = failure(
            outcome.token, outcome.stored, outcome.kind, outcome.reason, escaped, outcome.base
        )
        with contextlib.suppress(TypeError, ValueError, OverflowError):
            encoder.encode(same)
            return same
    return failure(
        outcome.token,
        outcome.stored,
        FailureKind.TRANSIENT,
        Reason.HANDLER_ERROR,
        f"handler returned values that cannot be stored: {problem}",
        outcome.base,
    )


def send_frame(sock: socket.socket, payload: bytes) -> None:
    """One message: a 4-byte big-endian length, then the bytes."""
    sock.sendall(len(payload).to_bytes(4, "big") + payload)


def recv_frame(sock: socket.socket) -> bytes:
    """One message, or EOFError when the other side closed the socket."""
    size = int.from_bytes(_recv_exact(sock, 4), "big")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view, got = memoryview(buf), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return bytes(buf)


def main(sock: socket.socket, module: str, limits: Limits) -> None:
    # Ctrl-C reaches the whole process group; only the supervisor decides
    # how to shut down, and it does so by closing this socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        registry = load(module)
    except RegistryError as exc:
        print(f"dlqproc worker cannot start: {exc}", file=sys.stderr, flush=True)
        os._exit(EXIT_CANNOT_START)
    try:
        _serve(sock, registry, limits)
    except (EOFError, OSError):
        # The supervisor closed the socket or died (SIGKILL): an orphan has
        # nobody to answer, and a traceback would only litter the service's log.
        return


def _serve(sock: socket.socket, registry: Registry, limits: Limits) -> None:
    # PROMETHEUS_MULTIPROC_DIR is inherited: these series go to this pid's files.
    handler_seconds = WorkerMetrics().handler_seconds
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(list[Delivery])
    send_frame(sock, encoder.encode(Hello(os.getpid())))
    while True:
        batch = decoder.decode(recv_frame(sock))
        outcomes: list[Outcome] = [handle(d, registry, limits) for d in batch]
        for o in outcomes:
            if isinstance(o, Ok):
                handler_seconds.labels(o.base).observe(o.handler_seconds)
        try:
            reply = encoder.encode(outcomes)
        except (TypeError, ValueError, OverflowError):
            reply = encoder.encode([_encodable(encoder, o) for o in outcomes])
        send_frame(sock, reply)
