"""`dlqproc demo`: the service on an embedded NATS and Postgres, with a sample workload.

Starts a real nats-server and PostgreSQL under a state folder, runs the
supervisor with the demo handlers and fast retry delays, publishes DLQ messages
of every kind (succeed, succeed after retries, exhausted, bad input), waits
until each is settled and prints what happened. It then keeps serving until
Ctrl-C, which stops the service and both servers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from dlqproc import app, logs
from dlqproc.broker import Broker
from dlqproc.config import Config, ConfigError, load
from dlqproc.embedded import NatsServer, PostgresServer, free_port
from dlqproc.metrics import Metrics

TENANTS = ("acme", "globex")


def demo_config(nats_url: str, dsn: str, port: int, path: Path | None) -> Config:
    forced = {
        "NATS_URL": nats_url,
        "POSTGRES_DSN": dsn,
        "SERVER_PORT": str(port),
        "SERVER_HOST": "127.0.0.1",
        "HANDLERS_MODULE": "dlqproc.handlers.demo",
    }
    preset = {
        "NATS_DLQWORKERS": "2",
        "NATS_DLQBASEDELAYMINUTES": "0.01",  # 0.6 s, doubling
        "NATS_DLQMAXDELAYMINUTES": "0.05",
        "NATS_DLQMAXRETRIES": "3",
        "NATS_DLQMAXDELIVER": "5",
        "NATS_DLQACKWAIT": "10s",
        "NATS_DLQTASKTIMEOUT": "5s",
        "NATS_SHUTDOWNGRACE": "5s",
        # The demo prints its own summary; the service's warnings would drown it.
        "LOG_LEVEL": "ERROR",
    }
    return load(path, preset=preset, forced=forced)


def envelope(tenant: str, base: str, payload: object, n: int) -> bytes:
    return msgspec.json.encode(
        {
            "source_subject": f"{base}.{tenant}",
            "company": tenant,
            "original_payload": payload,
            "error": "main consumer failed",
            "error_type": "retryable",
            "retry_count": 5,
            "max_retry": 5,
            "ts": datetime.now(UTC).isoformat(),
        }
    )


def workload(count: int) -> list[tuple[str, bytes, str]]:
    """(subject, body, expected fate) for `count` messages of mixed kinds."""
    out = []
    for i in range(count):
        tenant = TENANTS[i % len(TENANTS)]
        subject = f"v1.dlq.{tenant}"
        kind = i % 10
        if kind < 5:
            body = envelope(tenant, "demo.ok", {"id": f"ok-{i}", "text": "hello"}, i)
            fate = "succeeds"
        elif kind < 7:
            body = envelope(tenant, "demo.flaky", {"id": f"flaky-{i}", "fail_times": 2}, i)
            fate = "succeeds after retries"
        elif kind == 7:
            body = envelope(tenant, "demo.flaky", {"id": f"doomed-{i}", "fail_times": 99}, i)
            fate = "exhausted: retries spent"
        elif kind == 8:
            body = envelope(tenant, "demo.ok", {"text": "no id"}, i)
            fate = "exhausted: invalid payload"
        else:
            body = b"\x00not json at all " + str(i).encode()
            fate = "exhausted: not JSON"
        out.append((subject, body, fate))
    return out


async def _settled(broker: Broker, stream: str, durable: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending, ack_pending = await broker.pending(stream, durable)
        if pending == 0 and ack_pending == 0:
            return True
        await asyncio.sleep(0.25)
    return False


async def _report(cfg: Config, store_dsn: str, expected: dict[str, int]) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(store_dsn) as conn:
        rows = 0
        for tenant in TENANTS:
            cur = await conn.execute(f"SELECT count(*) FROM daisi_{tenant}.demo_events")
            rows += (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(
            "SELECT reason, count(*) FROM exhausted_events GROUP BY reason ORDER BY reason"
        )
        exhausted = await cur.fetchall()
    print("\nsample workload:")
    for fate, n in sorted(expected.items()):
        print(f"  {n:4d}  {fate}")
    print(f"\nrows written to daisi_<tenant>.demo_events: {rows}")
    print("exhausted_events by reason:")
    for reason, n in exhausted:
        print(f"  {n:4d}  {reason}")
    print(
        f"\nmetrics: http://{cfg.server.host}:{cfg.server.port}/metrics"
        "\ninspect: SELECT id, company_id, source_subject, last_error, retry_count"
        " FROM exhausted_events WHERE NOT resolved;"
    )


async def _run(cfg: Config, count: int, exit_when_done: bool) -> int:
    ready = asyncio.Event()
    service = asyncio.create_task(app.serve(cfg, metrics=Metrics(), ready=ready))
    started = asyncio.create_task(ready.wait())
    await asyncio.wait([service, started], return_when=asyncio.FIRST_COMPLETED)
    if service.done():
        return service.result()
    broker = await Broker.connect(cfg.nats.url, name="dlqproc-demo")
    try:
        plan = workload(count)
        expected: dict[str, int] = {}
        for subject, body, fate in plan:
            await broker.publish(subject, body)
            expected[fate] = expected.get(fate, 0) + 1
        print(f"published {len(plan)} DLQ messages; waiting until each is settled...")
        if not await _settled(broker, cfg.nats.dlq_stream, cfg.dlq_durable, timeout=120):
            print("demo: not every message settled within 120 s", file=sys.stderr)
        await _report(cfg, cfg.postgres.dsn, expected)
    finally:
        await broker.close()
    if exit_when_done:
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        print("\nserving; Ctrl-C stops the service and the embedded servers")
    return await service


def main(state: Path, count: int, config: Path | None, exit_when_done: bool = False) -> int:
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    nats_server = NatsServer(state / "nats")
    pg = PostgresServer(state / "postgres")

    def stop_servers() -> None:
        nats_server.stop()
        pg.stop()

    print(f"starting nats-server and PostgreSQL under {state} ...")
    try:
        nats_server.start()
        pg.start()
        try:
            cfg = demo_config(nats_server.url, pg.dsn, free_port(), config)
        except ConfigError as exc:
            print(f"dlqproc: {exc}", file=sys.stderr)
            return app.EXIT_CONFIG
        logs.setup(cfg.log.level)
        print(f"NATS {nats_server.url}  Postgres {pg.dsn}")
        import uvloop

        app.on_forced_exit = stop_servers
        return uvloop.run(_run(cfg, count, exit_when_done))
    finally:
        stop_servers()
