"""`dlqproc demo`: the whole pipeline on an embedded NATS and Postgres, with generated events.

Starts a real nats-server and PostgreSQL under a state folder and runs the
service with the WhatsApp handlers and fast retry delays. It publishes
generated events of every type for three tenants, a few of them invalid and a
few updates that overtake their upserts, waits until everything is settled and
prints what happened: rows per tenant table, what went to the DLQ, what the DLQ
worker retried and what it exhausted. It then keeps serving until Ctrl-C, which
stops the service and both servers. A Ctrl-C or SIGTERM at any earlier moment,
while the servers start included, stops what has started and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dlqproc import app, logs, topology
from dlqproc.broker import Broker
from dlqproc.config import Config, ConfigError, load
from dlqproc.embedded import NatsServer, PostgresServer, StartAborted, free_port
from dlqproc.envelope import tenant_schema
from dlqproc.generate import Generator
from dlqproc.publish import publish

TENANTS = ("acme", "globex", "initech")
TABLES = ("chats", "messages", "contacts", "agents")


def demo_config(nats_url: str, dsn: str, port: int, path: Path | None) -> Config:
    forced = {
        "NATS_URL": nats_url,
        "POSTGRES_DSN": dsn,
        "SERVER_PORT": str(port),
        "SERVER_HOST": "127.0.0.1",
        "HANDLERS_MODULE": "dlqproc.handlers.whatsapp",
    }
    preset = {
        "NATS_DLQWORKERS": "2",
        "NATS_DLQBASEDELAYMINUTES": "0.01",  # 0.6 s, doubling
        "NATS_DLQMAXDELAYMINUTES": "0.05",
        "NATS_DLQMAXRETRIES": "4",
        "NATS_DLQMAXDELIVER": "8",
        "NATS_REALTIME_NAKBASEDELAY": "200ms",
        "NATS_REALTIME_NAKMAXDELAY": "1s",
        "NATS_HISTORICAL_NAKBASEDELAY": "200ms",
        "NATS_HISTORICAL_NAKMAXDELAY": "1s",
        # The demo prints its own summary; the service's warnings would drown it.
        "LOG_LEVEL": "ERROR",
    }
    return load(path, preset=preset, forced=forced)


async def _settled(broker: Broker, cfg: Config, timeout: float, service: asyncio.Task[int]) -> bool:
    """Whether every consumer settled everything before `timeout`; False when the
    service stopped first (Ctrl-C)."""
    consumers = [(cfg.nats.dlq_stream, cfg.dlq_durable)] + [
        (main.stream, cfg.durable(main)) for main in (cfg.nats.realtime, cfg.nats.historical)
    ]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not service.done():
        states = [await broker.pending(stream, durable) for stream, durable in consumers]
        if all(pending == 0 and ack_pending == 0 for pending, ack_pending in states):
            return True
        await asyncio.sleep(0.25)
    return False


async def _last_exhausted_id(cfg: Config) -> int:
    """The newest exhausted_events id: what earlier runs in this state folder left."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(cfg.postgres.dsn) as conn:
        cur = await conn.execute("SELECT coalesce(max(id), 0) FROM exhausted_events")
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _report(
    cfg: Config, published: int, invalid: int, dlq: int, exhausted_before: int
) -> None:
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(cfg.postgres.dsn) as conn:
        print(f"\nthis run published {published} events ({invalid} invalid on purpose)")
        print(f"dead-lettered by the main consumers in this run: {dlq}")
        print("\nrows per tenant (the tables hold every run's rows; events are upserted):")
        print("  tenant    " + "".join(f"{t:>10}" for t in TABLES))
        for tenant in TENANTS:
            counts = []
            for table in TABLES:
                try:
                    target = sql.Identifier(tenant_schema(tenant), table)
                    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target))
                    counts.append((await cur.fetchone() or (0,))[0])
                except psycopg.errors.UndefinedTable:
                    await conn.rollback()
                    counts.append(0)
            print(f"  {tenant:<10}" + "".join(f"{n:>10}" for n in counts))
        cur = await conn.execute(
            "SELECT reason, count(*) FROM exhausted_events WHERE id > %s"
            " GROUP BY reason ORDER BY reason",
            (exhausted_before,),
        )
        exhausted = await cur.fetchall()
        cur = await conn.execute(
            "SELECT count(*) FROM exhausted_events WHERE id <= %s", (exhausted_before,)
        )
        earlier = (await cur.fetchone() or (0,))[0]
    print("\nexhausted_events of this run by reason (the rest of the DLQ was reprocessed):")
    for reason, n in exhausted or [("none", 0)]:
        print(f"  {n:6d}  {reason}")
    if earlier:
        print(f"  (earlier runs in this state folder left {earlier} more, not counted here)")
    print(
        f"\nmetrics: http://{cfg.server.host}:{cfg.server.port}/metrics"
        "\ninspect: SELECT id, company_id, source_subject, reason, last_error"
        " FROM exhausted_events WHERE NOT resolved;"
    )


async def _run(
    cfg: Config,
    count: int,
    exit_when_done: bool,
    on_forced_exit: Callable[[], None],
    stopping: threading.Event,
) -> int:
    ready = asyncio.Event()
    service = asyncio.create_task(app.serve(cfg, ready=ready, on_forced_exit=on_forced_exit))
    started = asyncio.create_task(ready.wait())
    await asyncio.sleep(0)  # the service's signal handlers are in place from here
    if stopping.is_set():
        # A signal that came before they were: the service takes it over.
        os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait([service, started], return_when=asyncio.FIRST_COMPLETED)
    if service.done():
        started.cancel()
        return service.result()
    # A Ctrl-C stops the service (app's signal handlers); the workload sees it
    # and ends at its next step. Not cancelled: nats-py's requests do not
    # always survive a cancellation, and a hung close would keep the servers up.
    await _workload(cfg, count, exit_when_done, service)
    return await service


async def _workload(
    cfg: Config, count: int, exit_when_done: bool, service: asyncio.Task[int]
) -> None:
    generator = Generator(
        seed=1,
        tenants=TENANTS,
        bases=(*topology.REALTIME_BASES, *topology.HISTORY_BASES),
        history_batch=20,
        invalid_rate=0.04,
        update_first_rate=0.1,
        now=int(time.time()),
    )
    events = list(generator.events(count))
    broker = await Broker.connect(cfg.nats.url, name="dlqproc-demo")
    try:
        dlq_before = await broker.stream_messages(cfg.nats.dlq_stream)
        exhausted_before = await _last_exhausted_id(cfg)
    finally:
        await broker.close()
    report = await publish(
        cfg.nats.url, [(e.subject, e.body, {"Nats-Msg-Id": e.msg_id}) for e in events]
    )
    print(f"{report.summary()}; waiting until every event is settled...", flush=True)
    broker = await Broker.connect(cfg.nats.url, name="dlqproc-demo")
    try:
        if not await _settled(broker, cfg, timeout=180, service=service):
            if service.done():
                return
            print("demo: not every event settled within 180 s", file=sys.stderr)
        dlq = await broker.stream_messages(cfg.nats.dlq_stream) - dlq_before
        invalid = sum(not e.valid for e in events)
        await _report(cfg, report.acked, invalid, dlq, exhausted_before)
    finally:
        await broker.close()
    if exit_when_done:
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        print("\nserving; Ctrl-C stops the service and the embedded servers", flush=True)


def main(state: Path, count: int, config: Path | None, exit_when_done: bool = False) -> int:
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    nats_server = NatsServer(state / "nats")
    pg = PostgresServer(state / "postgres")

    def stop_servers() -> None:
        nats_server.stop()
        pg.stop()

    # Until the service takes the signals over (and again once it is done), a
    # signal only says "stop": the servers' start sees it and stops what it
    # started. Killed at once instead, the process would leave both servers
    # running (they are in sessions of their own).
    stopping = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    print(f"starting nats-server and PostgreSQL under {state} ...", flush=True)
    try:
        return _main(nats_server, pg, stop_servers, count, config, exit_when_done, stopping)
    except StartAborted:
        return app.EXIT_OK
    finally:
        # A second signal must not cut the servers' shutdown short.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        stop_servers()
        if not exit_when_done:
            print("demo stopped: dlqproc, nats-server and PostgreSQL are down", file=sys.stderr)


def _main(
    nats_server: NatsServer,
    pg: PostgresServer,
    stop_servers: Callable[[], None],
    count: int,
    config: Path | None,
    exit_when_done: bool,
    stopping: threading.Event,
) -> int:
    nats_server.start(stop=stopping)
    pg.start(stop=stopping)
    try:
        cfg = demo_config(nats_server.url, pg.dsn, free_port(), config)
    except ConfigError as exc:
        print(f"dlqproc: {exc}", file=sys.stderr)
        return app.EXIT_CONFIG
    logs.setup(cfg.log.level)
    print(f"NATS {nats_server.url}  Postgres {pg.dsn}", flush=True)
    import uvloop

    # A second Ctrl-C exits at once: the servers are stopped first.
    return uvloop.run(_run(cfg, count, exit_when_done, stop_servers, stopping))
