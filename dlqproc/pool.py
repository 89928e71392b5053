"""The pool of worker processes, as the supervisor's event loop sees it.

Owns process lifecycle: start (explicit spawn context), hand a batch to an
idle worker, notice a worker that died or overran its timeout, kill and
replace it, and retry what it held one message at a time so a poison message
costs only itself. Batches and replies travel as length-prefixed frames over a
socketpair driven by asyncio streams, so the supervisor never blocks on a
worker, whatever the size of a batch or a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
from collections.abc import Callable, Sequence
from multiprocessing.context import SpawnContext, SpawnProcess

import msgspec

from dlqproc import worker
from dlqproc.model import Delivery, FailureKind, Ok, Outcome, Reason, Stored, failure
from dlqproc.reprocess import Limits, bare_stored

log = logging.getLogger("dlqproc.pool")

_encoder = msgspec.msgpack.Encoder()
_outcomes = msgspec.msgpack.Decoder(list[Outcome])
_hello = msgspec.msgpack.Decoder(worker.Hello)


# A worker that died while starting (a signal, the OOM killer) is retried
# after a pause that doubles up to this cap; only one that says its handlers
# do not load (worker.EXIT_CANNOT_START) is given up on.
_START_BACKOFF = 0.2
_START_BACKOFF_MAX = 5.0


class WorkerStartError(Exception):
    """A worker process could not start (its handlers do not load)."""


class WorkerLost(Exception):
    def __init__(self, reason: str) -> None:  # "crash" or "timeout"
        super().__init__(reason)
        self.reason = reason


class _Worker:
    """One child process and the socketpair to it, read by an asyncio stream."""

    def __init__(
        self,
        ctx: SpawnContext,
        index: int,
        module: str,
        limits: Limits,
        on_lost: Callable[[_Worker], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        parent, child = socket.socketpair()
        self.process: SpawnProcess = ctx.Process(
            target=worker.main,
            args=(child, module, limits),
            name=f"dlqproc-worker-{index}",
            daemon=True,
        )
        self.process.start()
        # Kept: the process handle refuses every question once closed.
        self._pid = self.process.pid
        child.close()
        self.index = index
        self.sock = parent
        self.dead = False
        self.ready = False  # said hello: its handlers loaded
        self.closing = False  # the pool is stopping it on purpose
        self.closed = False  # its process handle is released: never touch it again
        # One close at a time: the pool's shutdown and a failed start may both ask.
        self._close: asyncio.Future[None] | None = None
        self.lost_reason = "crash"
        self._on_lost = on_lost
        self._writer: asyncio.StreamWriter | None = None
        self._opening = False  # _read_frames is handing the socket to a transport
        self._waiter: asyncio.Future[bytes] = self.loop.create_future()
        self._reading = self.loop.create_task(self._read_frames())
        self.loop.add_reader(self.process.sentinel, self._exited)

    @property
    def pid(self) -> int | None:
        return self._pid

    async def _read_frames(self) -> None:
        """Deliver each reply to whoever waits for it; EOF means the worker is gone."""
        try:
            # While this await runs, the event loop's transport holds the
            # socket's descriptor without owning the socket yet: close() must
            # not close it then (uvloop would close it a second time, maybe
            # someone else's by then, and abort in libuv). Cancelled there,
            # the transport closes the descriptor itself.
            self._opening = True
            try:
                # A small limit makes the reader pause and resume the socket many
                # times per frame, and replies of heavy events run to megabytes.
                reader, self._writer = await asyncio.open_unix_connection(
                    sock=self.sock, limit=1 << 20
                )
            finally:
                self._opening = False
                if self._writer is None:
                    self.sock.close()  # detached already if a transport had it
            while True:
                size = int.from_bytes(await reader.readexactly(4), "big")
                data = await reader.readexactly(size)
                if not self._waiter.done():
                    self._waiter.set_result(data)
        except (asyncio.IncompleteReadError, OSError):
            pass
        self._exited()

    def _exited(self) -> None:
        if self.dead:
            return
        self.dead = True
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.process.sentinel)
        if not self._waiter.done():
            self._waiter.set_exception(WorkerLost(self.lost_reason))
            # Nobody may be waiting (the worker died idle): not an unhandled error.
            self._waiter.exception()
        if self.ready and not self.closing:
            self._on_lost(self)

    async def hello(self, timeout: float) -> None:
        try:
            _hello.decode(await asyncio.wait_for(self._waiter, timeout))
        except (WorkerLost, TimeoutError, msgspec.DecodeError) as exc:
            self.closing = True
            self.kill("timeout" if isinstance(exc, TimeoutError) else "crash")
            await _reaped(self.process, 1)
            code = self.process.exitcode
            raise WorkerStartError(
                f"worker {self.index} did not start (exit code {code}): {exc!r}"
            ) from None
        self.ready = True

    async def call(self, payload: bytes, timeout: float) -> bytes:
        if self.dead or self._writer is None:
            raise WorkerLost(self.lost_reason)
        self._waiter = self.loop.create_future()
        try:
            self._writer.write(len(payload).to_bytes(4, "big") + payload)
            return await asyncio.wait_for(
                self._drain_then_wait(self._writer, self._waiter), timeout
            )
        except TimeoutError:
            self.kill("timeout")
            raise WorkerLost("timeout") from None
        except WorkerLost:
            raise
        except Exception:
            # Whatever broke the exchange (a write to a dead peer, a reply
            # that is not a frame), the batch must be retried one by one.
            self.kill()
            raise WorkerLost(self.lost_reason) from None

    @staticmethod
    async def _drain_then_wait(
        writer: asyncio.StreamWriter, waiter: asyncio.Future[bytes]
    ) -> bytes:
        await writer.drain()
        return await asyncio.shield(waiter)

    def kill(self, reason: str = "crash") -> None:
        if not self.dead:
            self.lost_reason = reason
        # Closed by the pool's replacement already: the process is gone.
        if not self.closed and self.process.is_alive():
            self.process.kill()
        self._exited()

    async def close(self, timeout: float) -> None:
        """Ask the worker to exit by closing its socket; kill it if it lingers."""
        if self._close is not None:
            await asyncio.shield(self._close)  # another caller is closing it
            return
        # The first caller closes at once (the socket now, not on a later loop
        # turn); any other waits for it.
        self._close = asyncio.get_running_loop().create_future()
        try:
            await self._closed(timeout)
        finally:
            self._close.set_result(None)

    async def _closed(self, timeout: float) -> None:
        if self.closed:
            return
        self.closing = True
        self._exited()
        self._reading.cancel()
        # Now, not on the loop's next turn: the worker must see EOF before we wait for it.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self._writer is not None:
            self._writer.close()
        if not self._opening:
            self.sock.close()  # else _read_frames closes it once cancelled
        if not await _reaped(self.process, timeout):
            self.process.kill()
            await _reaped(self.process, timeout)
        if self.process.exitcode is not None:
            self.closed = True
            self.process.close()


async def _reaped(process: SpawnProcess, timeout: float) -> bool:
    """Whether `process` exited within `timeout`, reaped; never blocks the loop.

    Waits on the process's sentinel (the worker's own reader of it must be
    gone, see `_Worker._exited`). The sentinel turns readable as the child
    closes its files, a moment before the kernel can report its exit, so the
    final wait for its status runs in a thread: it returns at once then.
    """
    if process.exitcode is None:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not exited.done():
                exited.set_result(None)

        sentinel = process.sentinel
        loop.add_reader(sentinel, wake)
        try:
            await asyncio.wait_for(exited, timeout)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(sentinel)
        await asyncio.to_thread(process.join, timeout)
    return process.exitcode is not None


class WorkerPool:
    def __init__(
        self,
        size: int,
        module: str,
        limits: Limits,
        task_timeout: float,
        start_timeout: float = 60.0,
        on_restart: Callable[[str, int | None], None] | None = None,
    ) -> None:
        self.size = size
        self._module = module
        self._limits = limits
        self._task_timeout = task_timeout
        self._start_timeout = start_timeout
        self._on_restart = on_restart
        # spawn: a fresh interpreter per worker; never a fork of a process that
        # holds an event loop, sockets and threads.
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._workers: dict[int, _Worker] = {}
        self._replacing: set[asyncio.Task[None]] = set()
        self._closing = False
        self.failed: asyncio.Future[WorkerStartError] | None = None

    @property
    def alive(self) -> int:
        """Workers that have said hello and not died: a spawned one does not count yet."""
        return sum(1 for w in self._workers.values() if w.ready and not w.dead)

    def pids(self) -> list[int]:
        return [
            w.pid
            for w in self._workers.values()
            if w.pid is not None and not w.dead and not w.closed
        ]

    async def start(self) -> None:
        """Start every worker and wait until each has loaded its handlers."""
        self.failed = asyncio.get_running_loop().create_future()
        try:
            workers = await asyncio.gather(*(self._start_one(i) for i in range(self.size)))
        except WorkerStartError:
            await self.close()
            raise
        for w in workers:
            self._idle.put_nowait(w)

    async def _start_one(self, index: int) -> _Worker:
        """A ready worker in slot `index`, however many tries it takes.

        A worker whose handlers do not load (its own exit code) will never
        start: give up at once. One that died otherwise while starting (a
        signal, the OOM killer) or never said hello is a restart like any
        other: counted, and tried again after a growing pause.
        """
        pause = _START_BACKOFF
        while True:
            w = self._spawn(index)
            try:
                await w.hello(self._start_timeout)
                return w
            except WorkerStartError:
                code = w.process.exitcode
                if code == worker.EXIT_CANNOT_START:
                    raise
                self._restarted(w, "died while starting, trying again")
                await w.close(timeout=5)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _START_BACKOFF_MAX)

    def _spawn(self, index: int) -> _Worker:
        w = _Worker(self._ctx, index, self._module, self._limits, self._lost)
        self._workers[index] = w
        return w

    def _restarted(self, lost: _Worker, what: str) -> None:
        """Count and log a worker that has to be started again (its files are folded)."""
        if self._on_restart is not None:
            # A worker records metrics only after its hello: one that never
            # said it left no files to fold.
            self._on_restart(lost.lost_reason, lost.pid if lost.ready else None)
        log.warning(
            f"worker {what}",
            extra={
                "worker": lost.index,
                "pid": lost.pid,
                "reason": lost.lost_reason,
                "exitcode": None if lost.closed else lost.process.exitcode,
            },
        )

    def _lost(self, lost: _Worker) -> None:
        """A ready worker died or was killed, busy or idle: replace it, exactly once."""
        if self._closing:
            return
        self._restarted(lost, "lost, replacing it")
        task = asyncio.create_task(self._replace(lost))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, lost: _Worker) -> None:
        try:
            await lost.close(timeout=5)
            fresh = await self._start_one(lost.index)
        except Exception as exc:  # cannot start, or cannot even spawn (EMFILE, EAGAIN)
            failure = exc if isinstance(exc, WorkerStartError) else WorkerStartError(repr(exc))
            log.error("worker could not be replaced", extra={"error": str(failure)})
            if self.failed is not None and not self.failed.done():
                self.failed.set_result(failure)
            return
        log.info("worker replaced", extra={"worker": fresh.index, "pid": fresh.pid})
        self._idle.put_nowait(fresh)

    async def run(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """Outcomes for `batch`, in order; never raises for a worker's death or hang."""
        try:
            return await self._run_once(batch)
        except WorkerLost as lost:
            if len(batch) == 1:
                return [_lost_outcome(batch[0], lost.reason, self._limits)]
            # Isolate the culprit: every message of the lost batch runs alone.
            singles = await asyncio.gather(*(self.run([d]) for d in batch))
            return [o for single in singles for o in single]

    async def _run_once(self, batch: Sequence[Delivery]) -> list[Outcome]:
        w = await self._idle.get()
        while w.dead:  # died while idle: its replacement is on the way
            w = await self._idle.get()
        # Lost workers are replaced by _lost; nothing to do here but report it.
        data = await w.call(_encoder.encode(list(batch)), self._task_timeout)
        self._idle.put_nowait(w)
        return _outcomes.decode(data)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every worker at once, each given `timeout` to exit before it is killed."""
        self._closing = True
        for task in self._replacing:
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(w.close(timeout) for w in self._workers.values()))
        self._workers.clear()


class InlinePool:
    """The pool's interface with no processes: handlers run on the event loop.

    nats.dlqWorkers = 0. For small deployments and as the benchmark's baseline
    for what the worker processes cost; a hung handler cannot be interrupted here.
    """

    size = 0
    alive = 0

    def __init__(self, module: str, limits: Limits) -> None:
        self._module = module
        self._limits = limits
        self.failed: asyncio.Future[WorkerStartError] | None = None

    def pids(self) -> list[int]:
        return []

    async def start(self) -> None:
        from dlqproc.handlers import RegistryError, load
        from dlqproc.metrics import WorkerMetrics
        from dlqproc.reprocess import handle

        self.failed = asyncio.get_running_loop().create_future()
        try:
            registry = load(self._module)
        except RegistryError as exc:
            raise WorkerStartError(str(exc)) from exc
        seconds = WorkerMetrics().handler_seconds
        limits = self._limits

        def run(batch: Sequence[Delivery]) -> list[Outcome]:
            outcomes = [handle(d, registry, limits) for d in batch]
            for o in outcomes:
                if isinstance(o, Ok):
                    seconds.labels(o.base).observe(o.handler_seconds)
            return outcomes

        self._run = run

    async def run(self, batch: Sequence[Delivery]) -> list[Outcome]:
        return self._run(batch)

    async def close(self, timeout: float = 5.0) -> None:
        pass


Pool = WorkerPool | InlinePool


def _lost_outcome(delivery: Delivery, reason: str, limits: Limits) -> Outcome:
    stored: Stored = bare_stored(delivery, limits, as_json=True)
    why = Reason.TIMEOUT if reason == "timeout" else Reason.WORKER_CRASHED
    return failure(
        delivery.token,
        stored,
        FailureKind.TRANSIENT,
        why,
        f"worker {'timed out' if reason == 'timeout' else 'died'} processing this message",
    )
