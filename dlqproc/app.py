"""Running the service: its resources on one exit stack, signals, exit codes.

Every resource the service holds is an async context manager entered on one
AsyncExitStack, in the order written in `_serve`, and released in reverse.
Start-up failures raise StartupError carrying the exit code; `serve` catches it
once, after the stack has released what was already acquired. SIGTERM/SIGINT
are handled from the first step: during start-up a stop cancels it (the stack
unwinds the same way), afterwards it asks the supervisor to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from dlqproc import redact, retry, topology
from dlqproc.broker import Broker, ConnectRefused
from dlqproc.config import Config
from dlqproc.handlers import Registry, RegistryError, load
from dlqproc.health import HealthServer
from dlqproc.metrics import Metrics, MetricsDir
from dlqproc.model import Lane
from dlqproc.pool import InlinePool, Pool, WorkerPool, WorkerStartError
from dlqproc.probes import Probes
from dlqproc.reprocess import Limits
from dlqproc.settle import LaneRuntime
from dlqproc.store import Store, StoreUnavailable
from dlqproc.supervisor import Supervisor, dlq_policy, event_policy

log = logging.getLogger("dlqproc")

EXIT_OK = 0
EXIT_ERROR = 1  # a dependency failed at start-up, or an unexpected error
EXIT_CONFIG = 2  # bad configuration
EXIT_WORKERS = 3  # worker processes cannot start: respawning would only loop
EXIT_FORCED = 130  # a second signal: exit at once


class StartupError(Exception):
    """Start-up cannot go on: the log line that says why, its fields, the exit code."""

    def __init__(self, message: str, code: int, **fields: object) -> None:
        super().__init__(message)
        self.message, self.code, self.fields = message, code, fields


async def _retrying(call: Callable[[], Awaitable[list[str]]], deadline: float) -> list[str]:
    return await retry.until_deadline(
        call, deadline, log=log, message="NATS topology not ready, retrying"
    )


async def build_lanes(
    cfg: Config, broker: Broker, startup_timeout: float = 0.0
) -> list[LaneRuntime]:
    """Create or reconcile every stream and consumer, and bind a puller to each.

    Failing JetStream API requests are retried for `startup_timeout` seconds.
    """
    n = cfg.nats
    plan = [
        (
            Lane.DLQ,
            topology.dlq_stream(cfg),
            True,
            topology.dlq_consumer(cfg),
            dlq_policy(cfg),
            n.dlq_fetch_batch,
            n.dlq_max_deliver,
        )
    ]
    for lane, main, historical in (
        (Lane.REALTIME, n.realtime, False),
        (Lane.HISTORICAL, n.historical, True),
    ):
        if main.enabled:
            plan.append(
                (
                    lane,
                    topology.events_stream(main, historical, n.stream_replicas),
                    # The producers' streams: created when missing, never altered.
                    False,
                    topology.events_consumer(cfg, main, historical),
                    event_policy(main, n.retry_jitter),
                    main.fetch_batch,
                    main.max_deliver,
                )
            )
    # Every stream and consumer first, with retries: a JetStream API request
    # may go unanswered for a while (a leader election, a consumer another
    # replica has just created); a start-up that gives up at once would only
    # crash-loop the pod.
    deadline = time.monotonic() + max(0.0, startup_timeout)
    for _, stream, reconcile, consumer, *_ in plan:
        changes = await _retrying(
            functools.partial(broker.ensure_stream, stream, reconcile=reconcile), deadline
        )
        changes += await _retrying(functools.partial(broker.ensure_consumer, consumer), deadline)
        for change in changes:
            log.info("NATS topology reconciled", extra={"change": change})
    lanes = []
    for lane, stream, reconcile, consumer, policy, fetch_batch, max_deliver in plan:
        lanes.append(
            LaneRuntime(
                lane=lane,
                puller=await broker.puller(consumer),
                policy=policy,
                fetch_batch=fetch_batch,
                ack_wait=consumer.ack_wait,
                max_deliver=max_deliver,
                stream=stream,
                owns_stream=reconcile,
            )
        )
    return lanes


# -- the resources, in the order _serve enters them ------------------------------------


def _handlers(cfg: Config) -> Registry:
    """The handlers, loaded in the supervisor first: workers would fail the same way."""
    try:
        return load(cfg.handlers.module)
    except RegistryError as exc:
        raise StartupError(
            "cannot start: handlers do not load", EXIT_WORKERS, error=str(exc)
        ) from exc


@contextlib.contextmanager
def _metrics_dir(cfg: Config) -> Iterator[MetricsDir]:
    metrics_dir = MetricsDir(cfg.server.metrics_dir)
    try:
        yield metrics_dir
    finally:
        metrics_dir.close()


@contextlib.asynccontextmanager
async def _health_server(
    cfg: Config, metrics: Metrics, metrics_dir: MetricsDir
) -> AsyncIterator[HealthServer]:
    # Alive while starting up, not yet ready; the probes come with the supervisor.
    health = HealthServer(
        cfg.server.host,
        cfg.server.port,
        alive=lambda: True,
        problems=lambda: ["starting"],
        render=lambda: metrics_dir.render(metrics.registry),
        on_refused=metrics.health_refused.inc,
    )
    try:
        try:
            await health.start()
        except OSError as exc:
            raise StartupError(
                "cannot start: health port", EXIT_ERROR, port=cfg.server.port, error=str(exc)
            ) from exc
        yield health
    finally:
        # Also when start-up was cancelled half way through binding.
        await health.close()


@contextlib.asynccontextmanager
async def _store(cfg: Config, tenant_ddl: tuple[str, ...]) -> AsyncIterator[Store]:
    problem = redact.dsn_problem(cfg.postgres.dsn)
    if problem is not None:
        # A configuration error, not an outage; libpq's reason comes scrubbed.
        raise StartupError("cannot start: postgres.dsn does not parse", EXIT_CONFIG, error=problem)
    # Where, never how: no connection string, no credentials.
    log.info(
        "connecting",
        extra={
            "postgres": redact.postgres_target(cfg.postgres.dsn),
            "nats": redact.nats_targets(cfg.nats.url),
        },
    )
    store = Store(
        cfg.postgres.dsn,
        cfg.postgres.statement_timeout,
        tenant_ddl,
        partition_horizon=cfg.handlers.timestamp_horizon,
        max_new_partitions=cfg.postgres.max_new_partitions,
        allow=cfg.tenants.allowed,
        max_new_tenants_per_hour=cfg.tenants.max_new_per_hour,
    )
    try:
        try:
            # Retried for postgres.startupTimeout: a database starting beside us is not down.
            applied = await store.start(
                migrate=cfg.postgres.auto_migrate, timeout=cfg.postgres.startup_timeout
            )
            if applied:
                log.info("applied migrations", extra={"migrations": applied})
        except StoreUnavailable as exc:
            raise StartupError(
                "cannot start: Postgres unavailable",
                EXIT_ERROR,
                error=str(exc),
                gave_up_after=cfg.postgres.startup_timeout,
            ) from exc
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _broker(cfg: Config) -> AsyncIterator[Broker]:
    try:
        # Every server of nats.url is tried (nats-py's server list), until one accepts.
        broker = await Broker.connect(
            cfg.nats.url,
            timeout=cfg.nats.startup_timeout,
            api_timeout=cfg.nats.api_timeout,
            credentials=cfg.nats,
        )
    except Exception as exc:
        # Refused credentials end the wait at once, and say so.
        what = "refused the credentials" if isinstance(exc, ConnectRefused) else "unavailable"
        raise StartupError(
            f"cannot start: NATS {what}", EXIT_ERROR, error=str(exc) or type(exc).__name__
        ) from exc
    try:
        yield broker
    finally:
        await broker.close()


async def _lanes(cfg: Config, broker: Broker) -> list[LaneRuntime]:
    try:
        return await build_lanes(cfg, broker, cfg.nats.startup_timeout)
    except Exception as exc:
        raise StartupError(
            "cannot start: NATS topology",
            EXIT_ERROR,
            error=str(exc) or type(exc).__name__,
            gave_up_after=cfg.nats.startup_timeout,
        ) from exc


@contextlib.asynccontextmanager
async def _pool(cfg: Config, metrics: Metrics, metrics_dir: MetricsDir) -> AsyncIterator[Pool]:
    def worker_lost(reason: str, pid: int | None) -> None:
        metrics.worker_restarts.labels(reason).inc()
        if pid is not None:
            # File work that may wait for a scrape: off the event loop.
            done = asyncio.get_running_loop().run_in_executor(None, metrics_dir.process_exited, pid)
            done.add_done_callback(_log_failure)

    limits = Limits(
        cfg.nats.dlq_subject,
        cfg.nats.max_payload_bytes,
        timestamp_horizon=cfg.handlers.timestamp_horizon,
        allow=cfg.tenants.allowed,
    )
    pool: Pool = (
        WorkerPool(
            cfg.nats.dlq_workers,
            cfg.handlers.module,
            limits,
            cfg.nats.worker_task_timeout,
            on_restart=worker_lost,
        )
        if cfg.nats.dlq_workers > 0
        else InlinePool(cfg.handlers.module, limits)
    )
    try:
        try:
            await pool.start()
        except WorkerStartError as exc:
            raise StartupError(
                "cannot start: worker processes do not start", EXIT_WORKERS, error=str(exc)
            ) from exc
        yield pool
    finally:
        # Also when start-up was cancelled while workers were spawning: none
        # may outlive the supervisor.
        pids = pool.pids()
        await pool.close()
        for pid in pids:
            await asyncio.to_thread(metrics_dir.process_exited, pid)


class _Signals:
    """SIGTERM/SIGINT, handled on the event loop rather than inside a signal handler.

    The first asks the service to stop; a second exits at once, after
    `on_forced_exit` (the demo stops its embedded servers there). The handlers
    found at install are put back at removal: the demo's own, for one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_forced_exit: Callable[[], None] | None) -> None:
        self._on_forced_exit = on_forced_exit
        self._received = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self, loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
        self._loop = loop
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, self._handle, stop)

    def remove(self) -> None:
        if self._loop is not None:
            for sig in self.SIGNALS:
                self._loop.remove_signal_handler(sig)
                previous = self._previous.get(sig)
                if callable(previous) or previous in (signal.SIG_IGN, signal.SIG_DFL):
                    signal.signal(sig, previous)  # type: ignore[arg-type]

    def _handle(self, stop: Callable[[], None]) -> None:
        self._received += 1
        if self._received == 1:
            stop()
            return
        if self._on_forced_exit is not None:
            self._on_forced_exit()
        # Nothing is lost: unsettled messages come back after the ack wait, and
        # every write is idempotent.
        os._exit(EXIT_FORCED)


class _Stop:
    """Where a stop request goes: the start-up until the supervisor serves, then the supervisor.

    Start-up can wait a minute for PostgreSQL or NATS; a pod terminated meanwhile
    must not wait it out, nor be killed with its resources held. Cancelling the
    start-up task unwinds the exit stack like any start-up failure.
    """

    def __init__(self, task: asyncio.Task[int]) -> None:
        self._task = task
        self._target: Callable[[], None] | None = None
        self.during_startup = False
        self.step = "handlers"  # what start-up is doing: logged if stopped there

    def __call__(self) -> None:
        if self._target is not None:
            self._target()
        elif not self.during_startup:
            self.during_startup = True
            self._task.cancel("stop requested during start-up")

    def serving(self, target: Callable[[], None]) -> None:
        self._target = target
        if self.during_startup:
            # The cancellation was absorbed on its way (a library that caught
            # it): the stop request still stands.
            target()


async def serve(
    cfg: Config,
    ready: asyncio.Event | None = None,
    on_forced_exit: Callable[[], None] | None = None,
) -> int:
    """Run the service until a signal; return the process exit code."""
    task = asyncio.current_task()
    assert task is not None
    signals = _Signals(on_forced_exit)
    stop = _Stop(task)
    # Before the first resource: a signal at any later moment is a clean stop.
    signals.install(asyncio.get_running_loop(), stop)
    try:
        code = await _serve(cfg, ready, stop)
    except StartupError as exc:
        log.error(exc.message, extra=exc.fields)
        return exc.code
    except asyncio.CancelledError:
        if not stop.during_startup or task.cancelling() != 1:
            raise  # cancelled by our caller, not by a signal
        task.uncancel()
        log.info("stopped during start-up", extra={"exit_code": EXIT_OK, "step": stop.step})
        return EXIT_OK
    finally:
        # Only now: a second signal must still force the exit while resources close.
        signals.remove()
    log.info("stopped", extra={"exit_code": code})
    return code


async def _serve(cfg: Config, ready: asyncio.Event | None, stop: _Stop) -> int:
    async with contextlib.AsyncExitStack() as stack:
        registry = _handlers(cfg)
        # 1. The metrics directory, before any metric exists: every series, the
        #    workers' too, goes there. Removed last.
        stop.step = "metrics directory"
        metrics_dir = stack.enter_context(_metrics_dir(cfg))
        metrics = Metrics(cfg.server.metrics_max_tenants)
        # 2. The health port, listening from the start (a probe must tell
        #    "starting" from "dead") and until the end.
        stop.step = "health port"
        health = await stack.enter_async_context(_health_server(cfg, metrics, metrics_dir))
        # 3. PostgreSQL, migrated; closed after everything that writes to it.
        stop.step = "postgres"
        store = await stack.enter_async_context(_store(cfg, registry.tenant_ddl))
        # 4. NATS, and every stream and consumer; closed (flushing the last
        #    settles) once the pool is gone.
        stop.step = "nats"
        broker = await stack.enter_async_context(_broker(cfg))
        stop.step = "nats topology"
        lanes = await _lanes(cfg, broker)
        # 5. The worker pool, stopped once the supervisor no longer hands it work.
        stop.step = "worker pool"
        pool = await stack.enter_async_context(_pool(cfg, metrics, metrics_dir))
        # 6. The supervisor: its own ordered shutdown (Supervisor.shutdown) runs
        #    first when the stack unwinds, the probes' task just after it.
        sup = Supervisor(cfg, broker, store, pool, metrics, lanes)
        probes = Probes(
            broker, store, pool, lanes, metrics, flow=sup, stall_after=cfg.server.ready_stall_after
        )
        probing = asyncio.create_task(probes.run(), name="probes")
        stack.push_async_callback(_cancel, probing)
        stack.push_async_callback(sup.shutdown)
        health.set_checks(alive=lambda: sup.alive, problems=probes.problems)
        stop.serving(sup.stop_requested.set)
        if ready is not None:
            ready.set()
        return await _supervise(sup, pool)
    raise AssertionError("unreachable")  # mypy: an exit stack may swallow exceptions


async def _supervise(sup: Supervisor, pool: Pool) -> int:
    """Serve until asked to stop; the exit code says why it stopped."""
    try:
        await sup.serve()
    except Exception:
        log.exception("supervisor failed")
        return EXIT_ERROR
    if pool.failed is not None and pool.failed.done():
        log.error(
            "worker processes cannot be replaced, stopping",
            extra={"error": str(pool.failed.result())},
        )
        return EXIT_WORKERS
    return EXIT_OK


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("folding a dead worker's metrics failed", exc_info=future.exception())


def run(cfg: Config) -> int:
    import uvloop

    return uvloop.run(serve(cfg))
