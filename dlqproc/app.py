"""Running the service: wire the parts together, handle signals, map failures to exit codes.

Start-up order: logging, Postgres (migrate), NATS (topology), worker pool,
supervisor. Shutdown is Supervisor.shutdown, then the pool, NATS and Postgres
are closed in reverse order of start-up.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

from dlqproc import redact, topology
from dlqproc.broker import Broker, ConnectRefused
from dlqproc.config import Config
from dlqproc.handlers import RegistryError, load
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


async def _retrying(call: Callable[[], Awaitable[list[str]]], deadline: float) -> list[str]:
    """`call` until it succeeds, backing off from 0.1 s to 2 s; past `deadline`, its error."""
    delay = 0.1
    while True:
        try:
            return await call()
        except Exception as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "NATS topology not ready, retrying",
                extra={"error": str(exc) or type(exc).__name__, "retry_in": delay},
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


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
                    event_policy(main, n.dlq_jitter),
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


class _Signals:
    """The first SIGTERM/SIGINT sets a flag; a second one exits at once."""

    def __init__(self) -> None:
        self.received = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.event: asyncio.Event | None = None

    def install(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self.loop, self.event = loop, event
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        if self.received > 1:
            if on_forced_exit is not None:
                on_forced_exit()
            # Nothing is lost: unsettled messages come back after the ack wait,
            # and every write is idempotent.
            os._exit(EXIT_FORCED)
        assert self.loop is not None and self.event is not None
        self.loop.call_soon_threadsafe(self.event.set)


# Called before a forced exit (second signal); the demo stops its servers here.
on_forced_exit: Callable[[], None] | None = None


async def serve(cfg: Config, ready: asyncio.Event | None = None) -> int:
    """Run the service until a signal; return the process exit code."""
    try:
        registry = load(cfg.handlers.module)
    except RegistryError as exc:
        log.error("cannot start: handlers do not load", extra={"error": str(exc)})
        return EXIT_WORKERS
    # Before any metric exists: every series, the workers' too, goes to this directory.
    metrics_dir = MetricsDir(cfg.server.metrics_dir)
    try:
        return await _serve(cfg, registry.tenant_ddl, metrics_dir, ready)
    finally:
        metrics_dir.close()


async def _serve(
    cfg: Config, tenant_ddl: tuple[str, ...], metrics_dir: MetricsDir, ready: asyncio.Event | None
) -> int:
    metrics = Metrics(cfg.server.metrics_max_tenants)
    # Listening from the start: alive while starting up, not yet ready.
    health = HealthServer(
        cfg.server.host,
        cfg.server.port,
        alive=lambda: True,
        problems=lambda: ["starting"],
        render=lambda: metrics_dir.render(metrics.registry),
    )
    try:
        await health.start()
    except OSError as exc:
        log.error("cannot start: health port", extra={"port": cfg.server.port, "error": str(exc)})
        return EXIT_ERROR
    try:
        return await _run(cfg, tenant_ddl, metrics_dir, metrics, ready, health)
    finally:
        await health.close()


async def _run(
    cfg: Config,
    tenant_ddl: tuple[str, ...],
    metrics_dir: MetricsDir,
    metrics: Metrics,
    ready: asyncio.Event | None,
    health: HealthServer,
) -> int:
    store = Store(
        cfg.postgres.dsn,
        cfg.postgres.statement_timeout,
        tenant_ddl,
        partition_horizon=cfg.handlers.timestamp_horizon,
        max_new_partitions=cfg.postgres.max_new_partitions,
        allow=cfg.tenants.allowed,
        max_new_tenants_per_hour=cfg.tenants.max_new_per_hour,
    )
    problem = redact.dsn_problem(cfg.postgres.dsn)
    if problem is not None:
        # A configuration error, not an outage; libpq's reason comes scrubbed.
        log.error("cannot start: postgres.dsn does not parse", extra={"error": problem})
        return EXIT_CONFIG
    # Where, never how: no connection string, no credentials.
    log.info(
        "connecting",
        extra={
            "postgres": redact.postgres_target(cfg.postgres.dsn),
            "nats": redact.nats_targets(cfg.nats.url),
        },
    )
    try:
        # Retried for postgres.startupTimeout: a database starting beside us is not down.
        applied = await store.start(
            migrate=cfg.postgres.auto_migrate, timeout=cfg.postgres.startup_timeout
        )
        if applied:
            log.info("applied migrations", extra={"migrations": applied})
    except StoreUnavailable as exc:
        log.error(
            "cannot start: Postgres unavailable",
            extra={"error": str(exc), "gave_up_after": cfg.postgres.startup_timeout},
        )
        return EXIT_ERROR
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
        log.error(f"cannot start: NATS {what}", extra={"error": str(exc) or type(exc).__name__})
        await store.close()
        return EXIT_ERROR

    def worker_lost(reason: str, pid: int | None) -> None:
        metrics.worker_restarts.labels(reason).inc()
        if pid is not None:
            # File work that may wait for a scrape: off the event loop.
            done = asyncio.get_running_loop().run_in_executor(None, metrics_dir.process_exited, pid)
            done.add_done_callback(_log_failure)

    limits = Limits(
        cfg.nats.dlq_subject,
        cfg.nats.dlq_max_payload_bytes,
        timestamp_horizon=cfg.handlers.timestamp_horizon,
        allow=cfg.tenants.allowed,
    )
    pool: Pool = (
        WorkerPool(
            cfg.nats.dlq_workers,
            cfg.handlers.module,
            limits,
            cfg.nats.dlq_task_timeout,
            on_restart=worker_lost,
        )
        if cfg.nats.dlq_workers > 0
        else InlinePool(cfg.handlers.module, limits)
    )
    try:
        lanes = await build_lanes(cfg, broker, cfg.nats.startup_timeout)
        await pool.start()
    except WorkerStartError as exc:
        log.error("cannot start: worker processes do not start", extra={"error": str(exc)})
        await broker.close()
        await store.close()
        return EXIT_WORKERS
    except Exception as exc:
        log.error(
            "cannot start: NATS topology",
            extra={
                "error": str(exc) or type(exc).__name__,
                "gave_up_after": cfg.nats.startup_timeout,
            },
        )
        pool.close()
        await broker.close()
        await store.close()
        return EXIT_ERROR
    sup = Supervisor(cfg, broker, store, pool, metrics, lanes)
    probes = Probes(
        broker, store, pool, lanes, metrics, flow=sup, stall_after=cfg.server.ready_stall_after
    )
    health.set_checks(alive=lambda: sup.alive, problems=probes.problems)
    probing = asyncio.create_task(probes.run(), name="probes")
    signals = _Signals()
    signals.install(asyncio.get_running_loop(), sup.stop_requested)
    code = EXIT_OK
    if ready is not None:
        ready.set()
    try:
        await sup.serve()
        if pool.failed is not None and pool.failed.done():
            log.error(
                "worker processes cannot be replaced, stopping",
                extra={"error": str(pool.failed.result())},
            )
            code = EXIT_WORKERS
    except Exception:
        log.exception("supervisor failed")
        code = EXIT_ERROR
    finally:
        # The supervisor's own order first (see Supervisor.shutdown), then what
        # it used, in reverse order of start-up.
        await sup.shutdown()
        probing.cancel()
        await asyncio.gather(probing, return_exceptions=True)
        pids = pool.pids()
        pool.close()
        for pid in pids:
            metrics_dir.process_exited(pid)
        await broker.close()
        await store.close()
        log.info("stopped", extra={"exit_code": code})
    return code


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("folding a dead worker's metrics failed", exc_info=future.exception())


def run(cfg: Config) -> int:
    import uvloop

    return uvloop.run(serve(cfg))
