"""The Store: the supervisor's one PostgreSQL connection, and what runs on it.

It owns the connection (reconnected when it breaks, never reused inside a
transaction a failure left open), serialises every operation on it, applies
migrations, prepares the tenants and partitions a commit group needs, and
hands the group to writer.write_group. `write` raises StoreUnavailable for an
outage only; anything else fails the writes involved (see writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from dlqproc import retry
from dlqproc.store import exhausted, migrations, tenants
from dlqproc.store.partitions import PartitionBudget, Partitions
from dlqproc.store.results import (
    CredentialsRefused,
    Failure,
    ItemFailed,
    StoreUnavailable,
    Write,
    WriteResult,
)
from dlqproc.store.sql import credentials_refused, is_outage, prepare_failure
from dlqproc.store.writer import write_group

log = logging.getLogger("dlqproc.store")

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _serialized(
    method: Callable[Concatenate[Store, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Store, _P], Coroutine[Any, Any, _R]]:
    """One operation at a time on the store's single connection.

    Probes and the commit loop share it; interleaved, a ping would open a
    savepoint inside a batch's transaction instead of a transaction of its own.
    """

    async def serialized(store: Store, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with store._lock:
            return await method(store, *args, **kwargs)

    serialized.__doc__ = method.__doc__
    return serialized


class Store:
    """One connection owned by the supervisor; reconnected when it breaks.

    partition_horizon: how far ahead of now (seconds) a month may lie for its
    partition to be created; max_new_partitions: how many one write() may create.
    allow: the tenants that may be written (empty: any); max_new_tenants_per_hour:
    new tenants admitted per hour across replicas (0: no limit).
    """

    def __init__(
        self,
        dsn: str,
        statement_timeout: float,
        tenant_ddl: Sequence[str],
        *,
        partition_horizon: float = 7 * 86400,
        max_new_partitions: int = 12,
        allow: frozenset[str] = frozenset(),
        max_new_tenants_per_hour: int = 0,
    ) -> None:
        self._dsn = dsn
        self._timeout_ms = int(statement_timeout * 1000)
        self._tenants = tenants.Tenants(tenant_ddl, allow, max_new_tenants_per_hour)
        self._partitions = Partitions(partition_horizon, max_new_partitions)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ connection

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if (
            conn is not None
            and not conn.broken
            and (conn.info.transaction_status == TransactionStatus.IDLE)
        ):
            return conn
        # Broken, or left inside a transaction by a failure: never reuse it, or
        # a later write could land in a transaction that is never committed.
        await self._discard()
        try:
            self._conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                connect_timeout=5,
                options=f"-c statement_timeout={self._timeout_ms}",
                application_name="dlqproc",
            )
        except Exception as exc:
            self._conn = None
            message = f"cannot connect to Postgres: {exc}"
            if credentials_refused(str(exc)):
                raise CredentialsRefused(message) from exc
            raise StoreUnavailable(message) from exc
        return self._conn

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def close(self) -> None:
        await self._discard()

    @_serialized
    async def ping(self) -> bool:
        try:
            await self._select_1()
        except StoreUnavailable:
            return False
        return True

    async def _select_1(self) -> None:
        conn = await self._connection()
        try:
            async with conn.transaction():
                await conn.execute("SELECT 1")
        except psycopg.Error as exc:
            await self._discard()
            raise StoreUnavailable(str(exc).strip()) from exc

    @_serialized
    async def migrate(self) -> list[str]:
        """Apply the schema/ migrations not yet applied; return their names."""
        conn = await self._connection()
        try:
            return await migrations.apply(conn)
        except psycopg.Error as exc:
            if not is_outage(exc, conn):
                raise  # a migration PostgreSQL refuses: waiting will not help
            await self._discard()
            raise StoreUnavailable(str(exc).strip()) from exc

    async def start(self, *, migrate: bool, timeout: float) -> list[str]:
        """Connect (and migrate) at start-up; the migrations applied.

        A database that is not up yet is retried with backoff, from 0.1 s to
        2 s, for `timeout` seconds: one started beside dlqproc would otherwise
        crash-loop it. Raises StoreUnavailable past that, and at once when the
        server refuses the credentials.
        """

        async def attempt() -> list[str]:
            if migrate:
                return await self.migrate()
            async with self._lock:
                await self._select_1()
            return []

        # The error logged is libpq's (host, port, reason): never the DSN itself.
        return await retry.until_deadline(
            attempt,
            time.monotonic() + max(0.0, timeout),
            log=log,
            message="Postgres not reachable yet, retrying",
            retry_on=(StoreUnavailable,),
            give_up_on=(CredentialsRefused,),
        )

    # ---------------------------------------------------------------- writes

    @_serialized
    async def write(self, writes: Sequence[Write]) -> list[WriteResult]:
        """Write a commit group in one transaction; one item's failure never fails the others.

        Returns one WriteResult per Write: Written, or NotWritten with the
        item's Failure (data, resource or bug, see sql.classify). Raises
        StoreUnavailable for an outage only: no connection, a broken one, or a
        transaction that failed as a whole (its BEGIN or COMMIT).
        """
        conn = await self._connection()
        try:
            unready = await self._prepare_all(conn, writes, self._partitions.budget())
            return await write_group(conn, writes, unready)
        except Exception as exc:
            # Item failures were all caught where they happened: what reaches
            # here is an outage, or the transaction itself failing.
            await self._discard()
            raise StoreUnavailable(f"{type(exc).__name__}: {str(exc).strip()}") from exc

    async def _prepare_all(
        self,
        conn: psycopg.AsyncConnection[Any],
        writes: Sequence[Write],
        budget: PartitionBudget,
    ) -> dict[str, Failure]:
        """Prepare every tenant the group writes to; a failure fails that tenant's items only."""
        unready: dict[str, Failure] = {}
        for w in writes:
            if not w.rows or w.tenant in unready:
                continue
            try:
                schema = await self._tenants.ensure(conn, w.tenant)
                for block in w.rows:
                    for month in block.partitions:
                        await self._partitions.ensure(conn, schema, block.table, month, budget)
            except ItemFailed as failed:
                unready[w.tenant] = failed.failure
            except Exception as exc:
                if is_outage(exc, conn):
                    raise
                unready[w.tenant] = prepare_failure(w.tenant, exc)
        return unready

    # --------------------------------------------------------------- probes

    async def tenants_known(self) -> int:
        """How many tenants public.dlqproc_tenants records (admitted, or found existing)."""
        rows = await self._read(tenants.COUNT)
        return int(rows[0][0]) if rows else 0

    async def exhausted_stats(self) -> dict[str, tuple[int, float]]:
        """Per tenant: unresolved exhausted events, and the oldest one's age in seconds."""
        rows = await self._read(exhausted.STATS)
        return {str(r[0]): (int(r[1]), float(r[2])) for r in rows}

    async def replay_totals(self) -> dict[tuple[str, str], int]:
        """dlq_replays_total's values, counted in PostgreSQL by the replay jobs."""
        rows = await self._read(exhausted.REPLAY_TOTALS)
        return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}

    @_serialized
    async def _read(self, query: str) -> list[tuple[Any, ...]]:
        # Serialized here, not in each probe: a probe that forgot the lock ran
        # its transaction inside a commit group's and hung the commit loop.
        conn = await self._connection()
        try:
            async with conn.transaction():
                cur = await conn.execute(query)
                return await cur.fetchall()
        except psycopg.Error as exc:
            await self._discard()
            raise StoreUnavailable(str(exc).strip()) from exc
