"""Baseline (a): the DLQ consumer a user would write in an afternoon.

One process, one asyncio loop, one psycopg connection. A nats-py pull
subscription on the same durable consumer spec as dlqproc's, fetching batches;
for each message, in order: decode the envelope with msgspec, run the same
WhatsApp handler (dlqproc.handlers.whatsapp) to get its rows, write them with
the same upsert SQL (one statement per row shape, executemany for a history
batch's rows), COMMIT, then ACK. No worker processes, no pool, no batching of
writes across messages. Failures are settled as dlqproc settles them, so the
run ends with every message settled too: a permanent failure (or a transient
one at the retry budget) inserts an exhausted_events row, commits and TERMs;
a transient one NAKs with the same delays as the service.

    python -m bench.baseline        (configured by the service's env variables)
    python -m bench.baseline --batched    baseline (c)

Baseline (c), `--batched`, is the careful single-process consumer: for each
fetched batch, decode and run the handler for every message, then write all
their rows in one transaction with one executemany per statement (psycopg
pipelines it), commit, and ACK the batch; if anything in the batch fails, the
batch is settled message by message as (a) does. Same tables, indexes and
partitions (the handlers' DDL), same statements as (a).

Prints the service's ready line, "Starting DLQ worker...", once consuming.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import sys
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import msgspec
import nats
import psycopg
from nats.errors import TimeoutError as NatsTimeoutError
from psycopg import sql
from psycopg.types.json import Jsonb

from bench.procs import READY_LINE
from dlqproc import config, topology
from dlqproc.broker import Broker
from dlqproc.envelope import tenant_schema
from dlqproc.handlers.whatsapp import HANDLERS, TENANT_DDL
from dlqproc.model import Envelope, Event, HandlerError, Meta, PermanentError, RowOp
from dlqproc.store import migrations

_envelope = msgspec.json.Decoder(Envelope)

_EXHAUSTED = """
INSERT INTO public.exhausted_events (
    company_id, source_subject, last_error, retry_count, event_timestamp,
    dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, dlq_subject,
    payload_digest)
VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, %s, %s)
ON CONFLICT (dlq_stream, dlq_sequence, payload_digest) DO NOTHING
"""


class NotFound(Exception):
    """An update found no row (it may arrive later): retry."""


@lru_cache(maxsize=256)
def _sql(op: str, schema: str, table: str, columns: tuple[str, ...], key: tuple[str, ...]) -> bytes:
    """The obvious statement for a row: INSERT ... ON CONFLICT, or UPDATE by key."""
    target = sql.Identifier(schema, table)
    if op == "upsert":
        stmt = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}").format(
            target,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            sql.SQL(", ").join(map(sql.Identifier, key)),
            sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                for c in columns
                if c not in key
            ),
        )
    else:
        stmt = sql.SQL("UPDATE {} SET {} WHERE {}").format(
            target,
            sql.SQL(", ").join(
                sql.SQL("{} = %s").format(sql.Identifier(c)) for c in columns if c not in key
            ),
            sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in key),
        )
    return stmt.as_bytes(None)


def _params(op: RowOp) -> list[object]:
    values = [Jsonb(v) if isinstance(v, dict | list) else v for v in op.values.values()]
    if op.op == "upsert":
        return values
    names = tuple(op.values)
    return [v for c, v in zip(names, values, strict=True) if c not in op.key] + [
        op.values[k] for k in op.key
    ]


def _write(conn: psycopg.Connection[Any], tenant: str, rows: Any) -> None:
    schema = tenant_schema(tenant)
    groups: list[tuple[bytes, RowOp, list[list[object]]]] = []
    for op in rows:
        stmt = _sql(op.op, schema, op.table, tuple(op.values), op.key)
        if groups and op.op == "upsert" and groups[-1][0] is stmt:
            groups[-1][2].append(_params(op))
        else:
            groups.append((stmt, op, [_params(op)]))
    for stmt, op, params in groups:
        if len(params) > 1:
            with conn.cursor() as cur:
                cur.executemany(stmt, params)
        else:
            cur = conn.execute(stmt, params[0])
            if op.op == "update" and cur.rowcount == 0:
                raise NotFound(f"{op.table} row not found")


def _ensure_tenant(conn: psycopg.Connection[Any], tenant: str, seen: set[str]) -> None:
    if tenant in seen:
        return
    ident = sql.Identifier(tenant_schema(tenant))
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        for ddl in TENANT_DDL:
            conn.execute(sql.SQL(ddl).format(schema=ident))
    seen.add(tenant)


def _event(msg: Any) -> tuple[str, Any]:
    """(tenant, the handler's rows) for a DLQ message; raises as the handler does."""
    meta = msg.metadata
    env = _envelope.decode(msg.data)
    base = env.source_subject.rpartition(".")[0]
    event = Event(
        subject=env.source_subject,
        base=base,
        tenant=env.company,
        payload=bytes(env.original_payload),
        attempt=meta.num_delivered,
        meta=Meta(
            stream=meta.stream,
            consumer=meta.consumer,
            stream_seq=meta.sequence.stream,
            consumer_seq=meta.sequence.consumer,
            received_at=datetime.now(UTC).isoformat(),
        ),
    )
    return env.company, HANDLERS[base](event)


class _Settings:
    def __init__(self, cfg: config.Config) -> None:
        n = cfg.nats
        self.max_retries = n.dlq_max_retries
        self.base_delay = n.dlq_base_delay_minutes * 60
        self.max_delay = n.dlq_max_delay_minutes * 60


async def _one(conn: psycopg.Connection[Any], msg: Any, tenants: set[str], s: _Settings) -> None:
    """Baseline (a): one message, its own transaction, then its ACK (or TERM/NAK)."""
    meta = msg.metadata
    error, permanent = "", False
    try:
        tenant, rows = _event(msg)
        _ensure_tenant(conn, tenant, tenants)
        with conn.transaction():
            _write(conn, tenant, rows)
        await msg.ack()
        return
    except (PermanentError, msgspec.DecodeError, KeyError, psycopg.Error) as exc:
        error, permanent = str(exc), True
    except (HandlerError, NotFound) as exc:
        error = str(exc)
    if permanent or meta.num_delivered >= s.max_retries:
        _exhaust(conn, msg.data, msg.subject, meta, error)
        await msg.term()
    else:
        delay = min(s.base_delay * 2 ** (meta.num_delivered - 1), s.max_delay)
        await msg.nak(delay=delay)


async def _batch(
    conn: psycopg.Connection[Any], msgs: list[Any], tenants: set[str], s: _Settings
) -> None:
    """Baseline (c): the fetched batch's rows in one transaction, one executemany
    per statement, then every ACK; on any failure, message by message as (a)."""
    done: list[tuple[Any, str, Any]] = []
    rest: list[Any] = []  # failed in the handler: settled one by one
    for msg in msgs:
        try:
            tenant, rows = _event(msg)
            done.append((msg, tenant, rows))
        except Exception:
            rest.append(msg)
    try:
        for _, tenant, _rows in done:
            _ensure_tenant(conn, tenant, tenants)
        upserts: dict[bytes, list[list[object]]] = {}
        updates: list[tuple[bytes, RowOp, list[object]]] = []
        for _, tenant, rows in done:
            schema = tenant_schema(tenant)
            for op in rows:
                stmt = _sql(op.op, schema, op.table, tuple(op.values), op.key)
                if op.op == "upsert":
                    upserts.setdefault(stmt, []).append(_params(op))
                else:
                    updates.append((stmt, op, _params(op)))
        with conn.transaction():
            for stmt, many in upserts.items():
                with conn.cursor() as cur:
                    cur.executemany(stmt, many)
            for stmt, op, params in updates:
                if conn.execute(stmt, params).rowcount == 0:
                    raise NotFound(f"{op.table} row not found")
    except (psycopg.Error, NotFound):
        rest.extend(m for m, _, _ in done)
    else:
        for msg, _, _ in done:
            await msg.ack()
    for msg in rest:
        await _one(conn, msg, tenants, s)


async def consume(cfg: config.Config, stop: asyncio.Event, batched: bool = False) -> None:
    n = cfg.nats
    broker = await Broker.connect(n.url, name="bench-baseline")
    await broker.ensure_stream(topology.dlq_stream(cfg), reconcile=True)
    spec = topology.dlq_consumer(cfg)
    await broker.ensure_consumer(spec)
    await broker.close()

    nc = await nats.connect(n.url, name="bench-baseline")
    sub = await nc.jetstream().pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    conn = psycopg.connect(cfg.postgres.dsn, autocommit=True)
    for _, _, text in migrations():
        conn.execute(text.encode())
    tenants: set[str] = set()
    settings = _Settings(cfg)
    print(READY_LINE, flush=True)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=n.dlq_fetch_batch, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            if batched:
                await _batch(conn, msgs, tenants, settings)
            else:
                for msg in msgs:
                    await _one(conn, msg, tenants, settings)
    finally:
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        await nc.close()
        conn.close()


def _exhaust(
    conn: psycopg.Connection[Any], data: bytes, subject: str, meta: Any, error: str
) -> None:
    try:
        env = msgspec.json.decode(data)
    except msgspec.DecodeError:
        env = {}
    env = env if isinstance(env, dict) else {}
    original = env.get("original_payload")
    conn.execute(
        _EXHAUSTED,
        (
            str(env.get("company", "unknown")),
            str(env.get("source_subject", subject)),
            error,
            meta.num_delivered,
            env.get("ts"),
            msgspec.json.encode(env).decode(),
            None if original is None else msgspec.json.encode(original).decode(),
            "baseline",
            meta.stream,
            meta.sequence.stream,
            subject,
            hashlib.md5(data, usedforsecurity=False).hexdigest(),
        ),
    )


def main() -> int:
    cfg = config.load()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await consume(cfg, stop, batched="--batched" in sys.argv[1:])

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
