"""Helpers for the exhausted-events tests: migrated databases, rows written the
service's way, the CLI as a child process, and the messages a stream holds."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import nats
import psycopg

from dlqproc import envelope
from dlqproc.store import ExhaustedRow, Store, Write, Written
from support.service import TESTS_DIR


def migrate(dsn: str) -> None:
    async def go() -> None:
        store = Store(dsn, 30.0, ())
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(go())


def exhausted_row(
    seq: int,
    tenant: str,
    base: str,
    payload: object | None,
    *,
    reason: str = "retries_exhausted",
    error: str = "failed",
    raw: bytes | None = None,
    stream: str = "dlq_stream",
) -> ExhaustedRow:
    """A row as the DLQ lane stores it: the envelope around `payload` (JSON), or
    around undecodable bytes `raw`."""
    subject = f"{base}.{tenant}"
    original = raw if raw is not None else json.dumps(payload).encode()
    body = envelope.build(
        source_subject=subject,
        company=tenant,
        original_json=None if raw is not None else original,
        raw=original,
        error=error,
        fatal=reason != "retries_exhausted",
        retry_count=5,
        max_retry=5,
        ts="2026-11-30T00:00:00+00:00",
    )
    return ExhaustedRow(
        company_id=tenant,
        source_subject=subject,
        last_error=error,
        retry_count=5,
        reason=reason,
        event_timestamp=None,
        envelope_json=body,
        original_json=None if raw is not None else original,
        raw=body,
        dlq_stream=stream,
        dlq_sequence=seq,
        dlq_subject=f"v1.dlq.{tenant}",
        original_raw=raw,
    )


def store_rows(dsn: str, rows: list[ExhaustedRow]) -> list[int]:
    """Write through the store (the service's path, trigger included); the new ids."""

    async def go() -> None:
        store = Store(dsn, 30.0, ())
        try:
            done = await store.write([Write(exhausted=r) for r in rows])
            assert all(isinstance(w, Written) for w in done), done
        finally:
            await store.close()

    asyncio.run(go())
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            "SELECT id FROM exhausted_events WHERE (dlq_stream, dlq_sequence) IN"
            " (SELECT * FROM unnest(%s::text[], %s::bigint[])) ORDER BY id",
            ([r.dlq_stream for r in rows], [r.dlq_sequence for r in rows]),
        ).fetchall()
    return [r[0] for r in got]


def bulk_rows(dsn: str, n: int, tenant: str, base: str = "v1.chats.upsert") -> None:
    """`n` JSON rows fast (SQL), each with its own payload."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO exhausted_events (company_id, source_subject, last_error, retry_count,"
            " dlq_payload, original_payload, reason, dlq_stream, dlq_sequence, payload_digest)"
            " SELECT %(t)s, %(s)s, 'failed ' || g, 5, '{}'::jsonb,"
            "  jsonb_build_object('chat_id', 'c-' || g, 'agent_id', 'ag1'),"
            "  'retries_exhausted', %(s)s, g, md5(g::text)"
            " FROM generate_series(1, %(n)s) g",
            {"t": tenant, "s": f"{base}.{tenant}", "n": n},
        )


def cli(
    *args: str, dsn: str, nats_url: str = "nats://127.0.0.1:1", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlqproc", "exhausted", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(dsn, nats_url),
    )


def cli_env(dsn: str, nats_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
        "POSTGRES_DSN": dsn,
        "NATS_URL": nats_url,
        "NATS_DLQSUBJECT": "v1.dlq",
        "LOG_LEVEL": "INFO",
    }


def popen(*args: str, dsn: str, nats_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dlqproc", "exhausted", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(dsn, nats_url),
    )


def in_pty(*args: str, dsn: str, nats_url: str, timeout: float = 120) -> tuple[int, bytes]:
    """The CLI with a pseudo-terminal as its stdout and stderr: (exit code, all it drew).

    The terminal's output processing is left on, so a newline arrives as CRLF,
    as a user's terminal gets it.
    """
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlqproc", "exhausted", *args],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=slave,
            env=cli_env(dsn, nats_url),
        )
    finally:
        os.close(slave)
    drawn = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still running after {timeout} s: {bytes(drawn[-2000:])!r}")
            if not select.select([master], [], [], min(left, 1.0))[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal (it exited)
                break
            if not chunk:
                break
            drawn += chunk
        return proc.wait(timeout=30), bytes(drawn)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def add_stream(url: str, name: str, subjects: list[str], duplicate_window: float = 120) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(
                name=name, subjects=subjects, duplicate_window=duplicate_window
            )
        finally:
            await nc.close()

    asyncio.run(go())


def stream_messages(
    url: str, stream: str, timeout: float = 60
) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every message the stream holds: (subject, body, headers), in order."""

    async def go() -> list[tuple[str, bytes, dict[str, str]]]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(stream)).state.messages
            sub = await js.pull_subscribe("", durable=None, stream=stream)
            got: list[tuple[str, bytes, dict[str, str]]] = []
            while len(got) < total:
                for m in await sub.fetch(min(1000, total - len(got)), timeout=timeout):
                    got.append((m.subject, m.data, dict(m.headers or {})))
                    await m.ack()
            await sub.unsubscribe()
            return got
        finally:
            await nc.close()

    return asyncio.run(go())


def ids_published(url: str, stream: str) -> Counter[str]:
    """How many stored messages carry each Nats-Msg-Id."""
    return Counter(h.get("Nats-Msg-Id", "") for _, _, h in stream_messages(url, stream))
