"""Real nats-server and PostgreSQL launched by dlqproc.embedded: start, use, restart, stop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import nats
import psycopg
import pytest

from dlqproc.embedded import NatsServer, PostgresServer, free_port


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


async def _stream_messages(url: str, create: bool) -> int:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        if create:
            await js.add_stream(name="t", subjects=["t.>"])
            await js.publish("t.one", b"hello", timeout=5)
        info = await js.stream_info("t")
        return int(info.state.messages)
    finally:
        await nc.close()


def _pg_roundtrip(dsn: str, create: bool) -> bool:
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        row = conn.execute("select 1").fetchone()
        assert row == (1,)
        if create:
            conn.execute("create table survivor (id int primary key)")
            conn.execute("insert into survivor values (42)")
        got = conn.execute("select to_regclass('public.survivor') is not null").fetchone()
        assert got is not None
        return bool(got[0])


def test_free_port_is_bindable() -> None:
    assert 0 < free_port() < 65536


def test_nats_start_restart_stop(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "nats")
    srv.start()
    try:
        assert srv.url == f"nats://127.0.0.1:{srv.port}"
        assert asyncio.run(asyncio.wait_for(_stream_messages(srv.url, True), 30)) == 1
        old_pid = srv.pid
        assert old_pid is not None
        srv.restart()
        assert srv.pid is not None and srv.pid != old_pid
        assert _gone(old_pid)
        assert asyncio.run(asyncio.wait_for(_stream_messages(srv.url, False), 30)) == 1
    finally:
        pid = srv.pid
        srv.stop()
        srv.stop()  # idempotent
    assert pid is not None and _gone(pid)
    assert srv.pid is None
    assert "Server is ready" in (tmp_path / "nats" / "nats.log").read_text()


def test_postgres_start_restart_stop(pg_home: Path) -> None:
    srv = PostgresServer(pg_home / "pg")
    srv.start()
    try:
        assert srv.dsn == f"postgresql://postgres@127.0.0.1:{srv.port}/postgres"
        assert _pg_roundtrip(srv.dsn, True)
        old_pid = srv.pid
        assert old_pid is not None
        sock_dir = srv.socket_dir
        assert sock_dir is not None and len(str(sock_dir)) < 60
        srv.restart()
        assert _gone(old_pid)
        assert not sock_dir.exists()
        assert srv.pid is not None and srv.pid != old_pid
        assert _pg_roundtrip(srv.dsn, False)
    finally:
        pid = srv.pid
        sock_dir = srv.socket_dir
        srv.stop()
        srv.stop()  # idempotent
    assert pid is not None and _gone(pid)
    assert srv.pid is None
    assert sock_dir is not None and not sock_dir.exists()


def test_both_as_context_managers(tmp_path: Path, pg_home: Path) -> None:
    with NatsServer(tmp_path / "n") as ns, PostgresServer(pg_home / "p", durable=True) as pg:
        npid, ppid = ns.pid, pg.pid
        assert asyncio.run(asyncio.wait_for(_stream_messages(ns.url, True), 30)) == 1
        assert _pg_roundtrip(pg.dsn, True)
    assert npid is not None and _gone(npid)
    assert ppid is not None and _gone(ppid)


def test_nats_start_failure_reports_log(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "a") as first:
        clash = NatsServer(tmp_path / "b", port=first.port)
        with pytest.raises(RuntimeError, match="nats-server"):
            clash.start(timeout=10)
        assert clash.pid is None
