"""PostgreSQL for operating exhausted events: queries, replay jobs, claims, the audit trail.

The store's side of dlqproc.exhausted (psycopg stays in the store). One
connection of its own, opened from the DSN and reopened after it breaks; an
outage (the connection cannot be made or broke) is DBUnavailable, which
callers treat as "pause and try again", never as a row's failure.

SQL text is constant or composed from filters.where's constant fragments;
every value is a parameter.

Replays: a job claims rows in chunks (one transaction: lock the candidates,
insert a `claimed` item per row, which a unique index allows one job at a
time, move the cursor); after JetStream acknowledged a row's publish it is
settled (item `published`, the row's replayed_at / replay_count, an audit
row, the job's counts) in one transaction.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
import psycopg
from psycopg.pq import ConnStatus, TransactionStatus

from dlqproc.exhausted import filters
from dlqproc.exhausted.filters import Filter
from dlqproc.exhausted.refusals import ReplayRow, Target
from dlqproc.store.exhausted import text

Action = Literal["resolve", "unresolve", "annotate"]
ItemState = Literal["published", "refused", "failed", "uncertain"]
JobState = Literal["running", "paused", "stopped", "done", "failed"]

# Arbitrary constant: the class of the advisory lock a process running a job holds.
_JOB_LOCK = 0x646C7172
_BATCH = 1000


class DBUnavailable(Exception):
    """PostgreSQL cannot be reached or the connection broke: pause, then retry."""


class JobBusy(Exception):
    """Another process runs this job (it holds the job's advisory lock)."""


class Row(msgspec.Struct, frozen=True):
    """A row of `list`."""

    id: int
    created_at: datetime
    company_id: str
    source_subject: str
    reason: str | None
    retry_count: int | None
    replay_count: int
    resolved: bool
    last_error: str | None
    replay_of: int | None
    replayed_at: datetime | None


class Detail(msgspec.Struct, frozen=True):
    """Every column of one row; payloads as text (JSON) or bytes."""

    row: Row
    event_timestamp: datetime | None
    resolved_at: datetime | None
    notes: str | None
    dlq_stream: str | None
    dlq_sequence: int | None
    dlq_subject: str | None
    payload_digest: str | None
    dlq_payload: str
    original_payload: str | None
    raw_payload: bytes | None


class AuditEntry(msgspec.Struct, frozen=True):
    id: int
    exhausted_id: int
    at: datetime
    action: str
    actor: str
    note: str | None
    job_id: int | None
    detail: str | None


class Job(msgspec.Struct, frozen=True):
    id: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    actor: str
    state: str
    filter: Filter
    target: Target
    resolve: bool
    include_resolved: bool
    rate: float | None
    max_rows: int | None
    note: str | None
    not_before: datetime
    cursor: int
    published: int
    refused: int
    failed: int
    skipped: int
    uncertain: int
    message: str | None
    # Some process holds the job's advisory lock (filled by jobs()): a running
    # job without one was killed, and waits for `--resume`.
    alive: bool = False

    @property
    def done(self) -> int:
        return self.published + self.refused + self.failed + self.uncertain


class Claimed(msgspec.Struct, frozen=True):
    """One chunk: the rows to publish, what was refused or skipped, and whether more may follow."""

    rows: tuple[ReplayRow, ...]
    refused: int
    skipped: int
    more: bool
    cursor: int  # the job's cursor after this chunk
    asked: int  # the chunk size asked for


class Settled(msgspec.Struct, frozen=True):
    """The result of one claimed row, to be committed."""

    id: int
    company_id: str
    state: ItemState
    msg_id: str = ""
    stream: str = ""
    stream_seq: int = 0
    duplicate: bool = False
    detail: str = ""
    subject: str = ""


class Stats(msgspec.Struct, frozen=True):
    by_tenant_reason: list[tuple[str, str, int]]
    oldest: list[tuple[str, float]]  # tenant, age in seconds of its oldest unresolved row
    hourly: list[tuple[datetime, int]]  # the last 24 hours, oldest first, zeros included


_ROW_COLUMNS = (
    "e.id, e.created_at, e.company_id, e.source_subject, e.reason, e.retry_count,"
    " e.replay_count, e.resolved, e.last_error, e.replay_of, e.replayed_at"
)
_JOB_COLUMNS = (
    "id, created_at, updated_at, finished_at, actor, state, filter::text, target, resolve,"
    " include_resolved, rate, max_rows, note, not_before, cursor, published, refused, failed,"
    " skipped, uncertain, message"
)


def _row(r: Sequence[Any]) -> Row:
    return Row(*r[:11])


def _job(r: Sequence[Any]) -> Job:
    values = list(r)
    values[6] = filters.from_json(values[6])
    return Job(*values)


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    return not conn.closed and not conn.broken and conn.info.status == ConnStatus.OK


# A batch of results travels as one JSON document, which msgspec encodes in C:
# list parameters cost psycopg a Python call (and, for text, a regex) per
# element, more than PostgreSQL took to settle the rows at a few thousand a second.
_RESULTS = (
    "r AS (SELECT * FROM jsonb_to_recordset(%(results)s::jsonb) AS r(id bigint,"
    " company_id text, state text, msg_id text, stream text, stream_seq bigint,"
    " duplicate boolean, detail text, subject text))"
)
_ITEMS_UPDATE = (
    "items AS (UPDATE public.exhausted_replay_items i SET state = r.state, done_at = now(),"
    " msg_id = nullif(r.msg_id, ''), stream_seq = nullif(r.stream_seq, 0),"
    " duplicate = r.duplicate, detail = nullif(r.detail, '')"
    " FROM r WHERE i.job_id = %(job)s AND i.exhausted_id = r.id AND i.state = 'claimed'"
    " RETURNING i.exhausted_id AS id, i.company_id, i.state)"
)
_SETTLE_TAIL = (
    ", replayed AS (UPDATE public.exhausted_events e SET replayed_at = now(),"
    "  replay_count = e.replay_count + 1,"
    "  resolved_at = CASE WHEN %(resolve)s AND NOT e.resolved THEN now() ELSE e.resolved_at END,"
    "  resolved = e.resolved OR %(resolve)s"
    "  FROM items WHERE items.state = 'published' AND e.id = items.id"
    "  RETURNING e.id, e.company_id)"
    # One replay row per event and job (a unique index); with --resolve, a resolve row after it.
    ", audit AS (INSERT INTO public.exhausted_audit"
    "  (exhausted_id, company_id, action, actor, note, job_id, detail)"
    "  SELECT p.id, p.company_id, a.action, %(actor)s::text,"
    "   CASE a.action WHEN 'replay' THEN %(note)s::text ELSE %(resolve_note)s::text END,"
    "   %(job)s, CASE a.action WHEN 'replay' THEN jsonb_build_object('target', %(target)s::text,"
    "    'subject', r.subject, 'msg_id', r.msg_id, 'stream', r.stream, 'seq', r.stream_seq,"
    "    'duplicate', r.duplicate) END"
    "  FROM replayed p JOIN r ON r.id = p.id"
    "  CROSS JOIN (VALUES ('replay'), ('resolve')) AS a(action)"
    "  WHERE a.action = 'replay' OR %(resolve)s"
    "  ORDER BY p.id, a.action = 'resolve'"
    "  ON CONFLICT DO NOTHING)"
    " SELECT company_id, state, count(*) FROM items GROUP BY 1, 2 ORDER BY 1, 2"
)
# A settle locks the published rows first, in id order as a claim does: a
# claim of another job holding some of them then either finishes before the
# settle touches their items (and skips them) or waits for it, never both
# ways at once (a deadlock).
_LOCK_ROWS = (
    b"SELECT e.id FROM public.exhausted_events e"
    b" WHERE e.id = ANY(ARRAY(SELECT jsonb_array_elements_text(%s::jsonb)::bigint))"
    b" ORDER BY e.id FOR NO KEY UPDATE OF e"
)
# The shared rows last, each in its own statement so the order is fixed: a
# job's settles (and its claims) then hold them only for the end of their
# transactions, and every transaction takes the totals in key order, then the job.
_ADD_TOTALS = (
    b"INSERT INTO public.exhausted_replay_totals AS t (company_id, result, n)"
    b" SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
    b" ON CONFLICT (company_id, result) DO UPDATE SET n = t.n + excluded.n"
)
_ADD_COUNTS = (
    b"UPDATE public.exhausted_replay_jobs SET published = published + %s,"
    b" refused = refused + %s, failed = failed + %s, uncertain = uncertain + %s,"
    b" updated_at = now() WHERE id = %s"
)
_SETTLE = ("WITH " + _RESULTS + ", " + _ITEMS_UPDATE + _SETTLE_TAIL).encode()

# A chunk's candidates, locked (a concurrent settle of one of them is waited
# for, then seen), and the claims of those not already this job's nor replayed
# since it began; the unique index on claims lets one job at a time have a row.
# The WHERE clause between head and tail is filters.where's constant text.
_CLAIM_HEAD = (
    "WITH c AS (SELECT e.id, e.company_id, e.source_subject, e.reason, e.resolved,"
    "  e.original_payload::text AS original, octet_length(e.raw_payload), e.last_error,"
    "  coalesce(e.replayed_at >= %(not_before)s, false) AS replayed,"
    "  EXISTS (SELECT 1 FROM public.exhausted_replay_items i"
    "          WHERE i.exhausted_id = e.id AND i.job_id = %(job)s) AS mine"
    " FROM public.exhausted_events e WHERE "
)
_CLAIM_TAIL = (
    " AND e.id > %(cursor)s ORDER BY e.id LIMIT %(chunk)s FOR UPDATE OF e),"
    " got AS (INSERT INTO public.exhausted_replay_items"
    "  (job_id, exhausted_id, company_id, state, replay_key)"
    "  SELECT %(job)s, c.id, c.company_id, 'claimed', md5(c.source_subject || ' ' || c.original)"
    "  FROM c WHERE NOT c.mine AND NOT c.replayed"
    "  ON CONFLICT DO NOTHING RETURNING exhausted_id)"
    " SELECT c.*, c.id IN (SELECT exhausted_id FROM got) FROM c ORDER BY c.id"
)


def _settled_json(results: Sequence[Settled]) -> str:
    # Only a refusal's or failure's detail may carry text from outside (an
    # error message); subjects come from PostgreSQL's own rows, and a published
    # row has no detail, so most results are encoded as they are.
    return msgspec.json.encode(
        [r if not r.detail else msgspec.structs.replace(r, detail=text(r.detail)) for r in results]
    ).decode()


class ExhaustedDB:
    """One connection to PostgreSQL, reopened when it breaks."""

    def __init__(self, dsn: str, statement_timeout: float = 60.0) -> None:
        self._dsn = dsn
        self._timeout_ms = int(statement_timeout * 1000)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._locked_jobs: set[int] = set()
        # One transaction at a time on the one connection: the engine settles
        # acknowledged rows while it claims the next chunk.
        self._lock = asyncio.Lock()

    def sibling(self) -> ExhaustedDB:
        """Another connection to the same database (the engine settles on its own)."""
        return ExhaustedDB(self._dsn, self._timeout_ms / 1000)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if (
            conn is not None
            and _usable(conn)
            and conn.info.transaction_status == TransactionStatus.IDLE
        ):
            return conn
        await self.close()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                connect_timeout=5,
                options=f"-c statement_timeout={self._timeout_ms}",
                application_name="dlqproc-exhausted",
            )
        except psycopg.Error as exc:
            raise DBUnavailable(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
        self._conn = conn
        # Advisory locks die with the session: take them again, or give the job up.
        for job_id in list(self._locked_jobs):
            if not await self._try_lock(conn, job_id):
                self._locked_jobs.discard(job_id)
                raise JobBusy(f"job {job_id} was taken by another process while disconnected")
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A transaction; an outage during it becomes DBUnavailable (and it rolled back)."""
        async with self._lock:
            conn = await self._connection()
            try:
                async with conn.transaction():
                    yield conn
            except psycopg.Error as exc:
                if not _usable(conn) or (exc.sqlstate or "").startswith("08"):
                    await self.close()
                    raise DBUnavailable(f"PostgreSQL connection lost: {exc}".strip()) from exc
                raise

    async def ping(self) -> bool:
        try:
            async with self._tx() as conn:
                await conn.execute("SELECT 1")
        except (DBUnavailable, psycopg.Error):
            return False
        return True

    async def ready(self) -> bool:
        """Whether the migrations this layer needs (003) are applied."""
        async with self._tx() as conn:
            cur = await conn.execute("SELECT to_regclass('public.exhausted_audit') IS NOT NULL")
            got = await cur.fetchone()
            return bool(got and got[0])

    # -- reading

    async def list_rows(self, f: Filter, limit: int, after: int | None = None) -> list[Row]:
        """Newest first; `after` is the last id of the previous page (keyset paging)."""
        clause, params = filters.where(f)
        if after is not None:
            clause += " AND e.id < %(after)s"
            params["after"] = after
        params["limit"] = limit
        query = (
            f"SELECT {_ROW_COLUMNS} FROM public.exhausted_events e"
            f" WHERE {clause} ORDER BY e.id DESC LIMIT %(limit)s"
        )
        async with self._tx() as conn:
            cur = await conn.execute(query.encode(), params)
            return [_row(r) for r in await cur.fetchall()]

    async def count(self, f: Filter, cap: int | None = None) -> int:
        """Rows `f` matches; with `cap`, counting stops there (a page's "10,000 or more")."""
        clause, params = filters.where(f)
        query = f"SELECT count(*) FROM public.exhausted_events e WHERE {clause}"
        if cap is not None:
            query = (
                "SELECT count(*) FROM (SELECT 1 FROM public.exhausted_events e"
                f" WHERE {clause} LIMIT %(cap)s) c"
            )
            params["cap"] = cap
        async with self._tx() as conn:
            cur = await conn.execute(query.encode(), params)
            got = await cur.fetchone()
            return int(got[0]) if got else 0

    async def get(self, row_id: int) -> Detail | None:
        async with self._tx() as conn:
            cur = await conn.execute(
                f"SELECT {_ROW_COLUMNS}, e.event_timestamp, e.resolved_at, e.notes, e.dlq_stream,"
                " e.dlq_sequence, e.dlq_subject, e.payload_digest, e.dlq_payload::text,"
                " e.original_payload::text, e.raw_payload"
                " FROM public.exhausted_events e WHERE e.id = %s",
                (row_id,),
            )
            r = await cur.fetchone()
        if r is None:
            return None
        return Detail(_row(r), *r[11:])

    async def history(self, row_id: int) -> list[AuditEntry]:
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT id, exhausted_id, at, action, actor, note, job_id, detail::text"
                " FROM public.exhausted_audit WHERE exhausted_id = %s ORDER BY id",
                (row_id,),
            )
            return [AuditEntry(*r) for r in await cur.fetchall()]

    async def chain(self, row_id: int) -> list[Row]:
        """The replay chain `row_id` belongs to: the rows it replays and those replaying it."""
        async with self._tx() as conn:
            cur = await conn.execute(
                f"""
                WITH RECURSIVE up(id, depth) AS (
                    SELECT replay_of, 1 FROM public.exhausted_events
                    WHERE id = %(id)s AND replay_of IS NOT NULL
                  UNION
                    SELECT e.replay_of, up.depth + 1 FROM public.exhausted_events e
                    JOIN up ON e.id = up.id WHERE e.replay_of IS NOT NULL AND up.depth < 1000
                ), down(id, depth) AS (
                    SELECT id, 1 FROM public.exhausted_events WHERE replay_of = %(id)s
                  UNION
                    SELECT e.id, down.depth + 1 FROM public.exhausted_events e
                    JOIN down ON e.replay_of = down.id WHERE down.depth < 1000
                )
                SELECT {_ROW_COLUMNS} FROM public.exhausted_events e
                WHERE e.id IN (SELECT id FROM up UNION SELECT id FROM down UNION SELECT %(id)s)
                ORDER BY e.id
                """.encode(),
                {"id": row_id},
            )
            return [_row(r) for r in await cur.fetchall()]

    async def stats(self, now: datetime) -> Stats:
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT company_id, coalesce(reason, 'unknown'), count(*)"
                " FROM public.exhausted_events WHERE NOT resolved GROUP BY 1, 2 ORDER BY 1, 2"
            )
            by = [(str(t), str(r), int(n)) for t, r, n in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT company_id, extract(epoch FROM %s - min(created_at))::float8"
                " FROM public.exhausted_events WHERE NOT resolved GROUP BY 1 ORDER BY 2 DESC",
                (now,),
            )
            oldest = [(str(t), float(a)) for t, a in await cur.fetchall()]
            start = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
            cur = await conn.execute(
                # Whole UTC hours, whatever the session's time zone.
                "SELECT to_timestamp(floor(extract(epoch FROM created_at) / 3600) * 3600),"
                " count(*) FROM public.exhausted_events"
                " WHERE created_at >= %s GROUP BY 1",
                (start,),
            )
            counts = {h.timestamp(): int(n) for h, n in await cur.fetchall()}
        hours = [start + timedelta(hours=i) for i in range(24)]
        return Stats(by, oldest, [(h, counts.get(h.timestamp(), 0)) for h in hours])

    async def jobs(self, limit: int = 20) -> list[Job]:
        async with self._tx() as conn:
            cur = await conn.execute(
                f"SELECT {_JOB_COLUMNS},"
                " EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory'"
                "  AND l.granted AND l.objsubid = 2 AND l.classid::bigint = %s"
                "  AND l.objid::bigint = j.id %% 2147483648)"
                " FROM public.exhausted_replay_jobs j ORDER BY id DESC LIMIT %s",
                (_JOB_LOCK, limit),
            )
            return [_job(r) for r in await cur.fetchall()]

    async def job(self, job_id: int) -> Job | None:
        async with self._tx() as conn:
            cur = await conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM public.exhausted_replay_jobs WHERE id = %s", (job_id,)
            )
            r = await cur.fetchone()
        return _job(r) if r is not None else None

    async def job_items(self, job_id: int, state: str | None = None) -> list[tuple[int, str, str]]:
        """(row id, state, detail) of a job's rows, in id order."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT exhausted_id, state, coalesce(detail, '')"
                " FROM public.exhausted_replay_items"
                " WHERE job_id = %s AND (%s::text IS NULL OR state = %s) ORDER BY exhausted_id",
                (job_id, state, state),
            )
            return [(int(a), str(b), str(c)) for a, b, c in await cur.fetchall()]

    async def replay_totals(self) -> dict[tuple[str, str], int]:
        """dlq_replays_total's values: (company_id, result) -> replays so far."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT company_id, result, n FROM public.exhausted_replay_totals"
            )
            return {(str(t), str(r)): int(n) for t, r, n in await cur.fetchall()}

    # -- replay jobs

    async def create_job(
        self,
        f: Filter,
        *,
        actor: str,
        target: Target,
        resolve: bool,
        include_resolved: bool,
        rate: float | None,
        max_rows: int | None,
        note: str | None,
    ) -> Job:
        """A running job, locked by this process. Rows that jobs active now (or
        later) replay are not replayed by it again: not_before is the start of
        the oldest active job."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "INSERT INTO public.exhausted_replay_jobs"
                " (actor, filter, target, resolve, include_resolved, rate, max_rows, note,"
                "  not_before)"
                " SELECT %s, %s::jsonb, %s, %s, %s, %s, %s, %s,"
                "  least(now(), (SELECT min(created_at) FROM public.exhausted_replay_jobs"
                "                WHERE state IN ('running', 'paused')))"
                f" RETURNING {_JOB_COLUMNS}",
                (
                    actor,
                    filters.to_json(f).decode(),
                    target,
                    resolve,
                    include_resolved,
                    rate,
                    max_rows,
                    note,
                ),
            )
            r = await cur.fetchone()
            assert r is not None
            job = _job(r)
        await self.lock_job(job.id)
        return job

    @staticmethod
    async def _try_lock(conn: psycopg.AsyncConnection[Any], job_id: int) -> bool:
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (_JOB_LOCK, job_id % 2**31))
        got = await cur.fetchone()
        await conn.commit()
        return bool(got and got[0])

    async def lock_job(self, job_id: int) -> None:
        """Hold the job for this process (JobBusy if another holds it); released when the
        connection ends, a SIGKILL included."""
        async with self._lock:
            conn = await self._connection()
            try:
                ok = await self._try_lock(conn, job_id)
            except psycopg.Error as exc:
                await self.close()
                raise DBUnavailable(str(exc).strip()) from exc
        if not ok:
            raise JobBusy(f"job {job_id} is being run by another process")
        self._locked_jobs.add(job_id)

    async def set_state(self, job_id: int, state: JobState, message: str | None = None) -> None:
        finished = state in ("stopped", "done", "failed")
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE public.exhausted_replay_jobs SET state = %s, message = %s,"
                " updated_at = now(), finished_at = CASE WHEN %s THEN now() END WHERE id = %s",
                (state, message, finished, job_id),
            )

    async def claimed(self, job_id: int) -> list[tuple[ReplayRow, float]]:
        """Rows this job claimed and never settled (it died), with seconds since the claim."""
        async with self._tx() as conn:
            cur = await conn.execute(
                "SELECT e.id, e.company_id, e.source_subject, e.reason, e.resolved,"
                " e.original_payload::text, octet_length(e.raw_payload), e.last_error,"
                " extract(epoch FROM now() - i.claimed_at)::float8"
                " FROM public.exhausted_replay_items i"
                " JOIN public.exhausted_events e ON e.id = i.exhausted_id"
                " WHERE i.job_id = %s AND i.state = 'claimed' ORDER BY e.id",
                (job_id,),
            )
            return [(_replay_row(r), float(r[8])) for r in await cur.fetchall()]

    async def claim(self, job: Job, chunk: int, refuse: Any) -> Claimed:
        """The next chunk of the job's rows after its cursor, claimed for it.

        `refuse(row) -> str | None` is refusals.refusal bound to the job. Rows
        already this job's (a resumed job) are passed over; rows another job
        holds or replayed since job.not_before are skipped; refused rows are
        settled at once. The cursor moves with the claims in one transaction.
        """
        clause, params = filters.where(job.filter)
        params.update(job=job.id, cursor=job.cursor, chunk=chunk, not_before=job.not_before)
        async with self._tx() as conn:
            # The walk is in id order: the planner's default cost of a random
            # page had it read the id index and filter, rather than take a
            # filter's own (column, id) index, which on a tenant whose rows
            # are the newest of a million read the whole table for the first chunk.
            await conn.execute("SET LOCAL random_page_cost = 1.1")
            cur = await conn.execute((_CLAIM_HEAD + clause + _CLAIM_TAIL).encode(), params)
            found = await cur.fetchall()
            if not found:
                return Claimed((), 0, 0, False, job.cursor, chunk)
            skipped = 0
            wanted: list[ReplayRow] = []
            refused: list[Settled] = []
            for r in found:
                if r[9]:  # this job's already
                    continue
                if not r[10]:  # replayed since the job began, or another job holds it
                    skipped += 1
                    continue
                row = _replay_row(r)
                why = refuse(row)
                if why is None:
                    wanted.append(row)
                else:
                    refused.append(Settled(row.id, row.company_id, "refused", detail=why))
            if refused:
                await self._settle_items(conn, job, refused)
            await conn.execute(
                "UPDATE public.exhausted_replay_jobs SET cursor = %s, skipped = skipped + %s,"
                " updated_at = now() WHERE id = %s",
                (int(found[-1][0]), skipped, job.id),
            )
        last = int(found[-1][0])
        return Claimed(tuple(wanted), len(refused), skipped, len(found) == chunk, last, chunk)

    async def settle(self, job: Job, results: Sequence[Settled]) -> None:
        """Commit the results of claimed rows (published ones after their PubAck)."""
        if not results:
            return
        async with self._tx() as conn:
            await self._settle_items(conn, job, results)

    @staticmethod
    async def _settle_items(
        conn: psycopg.AsyncConnection[Any],
        job: Job,
        results: Sequence[Settled],
    ) -> None:
        """A batch's items, rows and audit in one statement; then its totals and job counts."""
        published = sorted(r.id for r in results if r.state == "published")
        if published:
            await conn.execute(_LOCK_ROWS, (msgspec.json.encode(published).decode(),))
        cur = await conn.execute(
            _SETTLE,
            {
                "results": _settled_json(results),
                "job": job.id,
                "resolve": job.resolve,
                "actor": job.actor,
                "note": job.note,
                "resolve_note": job.note or f"resolved by replay job {job.id}",
                "target": job.target,
            },
        )
        # Only what this statement changed counts: settling a row twice is harmless.
        changed: list[tuple[str, ItemState, int]] = await cur.fetchall()
        if not changed:
            return
        await conn.execute(_ADD_TOTALS, [list(c) for c in zip(*changed, strict=True)])
        by_state = collections.Counter[str]()
        for _, state, n in changed:
            by_state[state] += n
        await conn.execute(
            _ADD_COUNTS,
            (
                by_state["published"],
                by_state["refused"],
                by_state["failed"],
                by_state["uncertain"],
                job.id,
            ),
        )

    async def release(self, job: Job, ids: Sequence[int]) -> None:
        """Give back claims never published (a clean stop), and the cursor with them."""
        if not ids:
            return
        async with self._tx() as conn:
            await conn.execute(
                "DELETE FROM public.exhausted_replay_items"
                " WHERE job_id = %s AND exhausted_id = ANY(%s) AND state = 'claimed'",
                (job.id, list(ids)),
            )
            await conn.execute(
                "UPDATE public.exhausted_replay_jobs SET cursor = least(cursor, %s),"
                " updated_at = now() WHERE id = %s",
                (min(ids) - 1, job.id),
            )

    # -- resolve, unresolve, annotate, purge

    async def act(self, action: Action, f: Filter, actor: str, note: str | None) -> int:
        """Apply `action` to every row `f` matches, in batches, each row audited."""
        sets = {
            "resolve": "resolved = true, resolved_at = now(),",
            "unresolve": "resolved = false, resolved_at = NULL,",
            "annotate": "",
        }[action]
        clause, params = filters.where(f)
        params.update(actor=actor, note=note, action=action, batch=_BATCH)
        query = (
            "WITH t AS (SELECT e.id FROM public.exhausted_events e"
            f"  WHERE {clause} AND e.id > %(cursor)s ORDER BY e.id LIMIT %(batch)s FOR UPDATE),"
            " u AS (UPDATE public.exhausted_events e SET"
            f"  {sets} notes = CASE WHEN %(note)s::text IS NULL THEN e.notes"
            "   WHEN coalesce(e.notes, '') = '' THEN %(note)s"
            "   ELSE e.notes || E'\\n' || %(note)s END"
            "  FROM t WHERE e.id = t.id RETURNING e.id, e.company_id)"
            " INSERT INTO public.exhausted_audit (exhausted_id, company_id, action, actor, note)"
            " SELECT id, company_id, %(action)s, %(actor)s, %(note)s FROM u RETURNING exhausted_id"
        ).encode()
        total, cursor = 0, 0
        while True:
            async with self._tx() as conn:
                cur = await conn.execute(query, {**params, "cursor": cursor})
                done = [int(r[0]) for r in await cur.fetchall()]
            if not done:
                return total
            total += len(done)
            cursor = max(done)

    async def purge(self, f: Filter, older_than: timedelta, actor: str, note: str | None) -> int:
        """Delete resolved rows resolved (or, unset, created) longer than `older_than` ago.

        In batches of 1,000, each its own transaction; every row's deletion audited.
        """
        clause, params = filters.where(f)
        params.update(age=older_than, actor=actor, note=note, batch=_BATCH)
        query = (
            "WITH t AS (SELECT e.id FROM public.exhausted_events e WHERE"
            f"  {clause} AND e.resolved AND coalesce(e.resolved_at, e.created_at) < now() - %(age)s"
            "  ORDER BY e.id LIMIT %(batch)s FOR UPDATE SKIP LOCKED),"
            " d AS (DELETE FROM public.exhausted_events e USING t WHERE e.id = t.id"
            "  RETURNING e.id, e.company_id, e.source_subject, e.reason, e.created_at)"
            " INSERT INTO public.exhausted_audit (exhausted_id, company_id, action, actor, note,"
            "  detail)"
            " SELECT id, company_id, 'purge', %(actor)s, %(note)s,"
            "  jsonb_build_object('source_subject', source_subject, 'reason', reason,"
            "                     'created_at', created_at)"
            " FROM d RETURNING exhausted_id"
        ).encode()
        total = 0
        while True:
            async with self._tx() as conn:
                cur = await conn.execute(query, params)
                n = len(await cur.fetchall())
            total += n
            if n < _BATCH:
                return total

    async def purge_count(self, f: Filter, older_than: timedelta) -> int:
        clause, params = filters.where(f)
        params["age"] = older_than
        async with self._tx() as conn:
            cur = await conn.execute(
                f"SELECT count(*) FROM public.exhausted_events e WHERE {clause} AND e.resolved"
                " AND coalesce(e.resolved_at, e.created_at) < now() - %(age)s".encode(),
                params,
            )
            got = await cur.fetchone()
            return int(got[0]) if got else 0


def _replay_row(r: Sequence[Any]) -> ReplayRow:
    original = r[5]
    return ReplayRow(
        id=int(r[0]),
        company_id=str(r[1]),
        source_subject=str(r[2]),
        reason=r[3],
        resolved=bool(r[4]),
        original=original.encode() if original is not None else None,
        raw_size=r[6],
        last_error=r[7],
    )
