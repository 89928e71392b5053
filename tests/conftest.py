"""Shared fixtures: one real nats-server and PostgreSQL per test session, a fresh
database per test, and a factory for running dlqproc against them."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dlqproc.embedded import NatsServer, PostgresServer
from support.service import PIPELINE_ENV, Service

_db_ids = itertools.count(1)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        yield server


@contextlib.contextmanager
def server_home(prefix: str) -> Iterator[Path]:
    """A private folder for a server's data, outside pytest's temp root.

    The embedded PostgreSQL runs as an unprivileged user and must traverse its
    parents; pytest resets its own temp root to mode 0700 whenever a session
    starts, which would lock out a server started by another session.
    """
    home = Path(tempfile.mkdtemp(prefix=f"dlqproc-{prefix}-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def pg_home() -> Iterator[Path]:
    with server_home("pg") as home:
        yield home


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with server_home("pg") as home, PostgresServer(home / "data") as server:
        yield server


def fresh_database(server: PostgresServer) -> str:
    name = f"test_{next(_db_ids)}"
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return server.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def dsn(pg_server: PostgresServer) -> str:
    return fresh_database(pg_server)


@pytest.fixture
def service(nats_server: NatsServer, dsn: str, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: service(**env overrides) -> a started Service; all stopped at teardown."""
    started: list[Service] = []

    def make(
        start: bool = True, nats_url: str | None = None, db: str | None = None, **settings: str
    ) -> Service:
        svc = Service(nats_url or nats_server.url, db or dsn, tmp_path, **settings)
        started.append(svc)
        return svc.start() if start else svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server of the test's own: the events streams' subjects are fixed."""
    with NatsServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def pipeline(service: Callable[..., Service], own_nats: NatsServer) -> Callable[..., Service]:
    """Factory: the whole pipeline (main consumers, WhatsApp handlers, v1.dlq) on own_nats."""

    def make(**settings: str) -> Service:
        return service(nats_url=own_nats.url, **{**PIPELINE_ENV, **settings})

    return make
