"""PostgreSQL CPU per heavy row when whole commit groups go through the store's writer.

    PYTHONPATH=. G=10 REPEATS=5 python .../writepath-shared/commit-groups/group.py

The 40 heavy blocks of `bench writepath`, G events to a commit group, written
by dlqproc.store.writer.write_group (rows.plan merges whole-row blocks of one
shape across the group's events; blocks with shared values get a statement
each), encoded whole and with shared values; rows new, then existing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import psycopg

from bench.writepath import TENANT, _truncate, cpu_seconds, heavy_blocks, setup
from dlqproc.embedded import PostgresServer
from dlqproc.envelope import tenant_schema
from dlqproc.rows import SHARED_MIN_ROWS, encode, plan
from dlqproc.store.results import Write, Written
from dlqproc.store.writer import write_group

G = int(os.environ.get("G", "10"))
REPEATS = int(os.environ.get("REPEATS", "3"))


async def main(dsn: str) -> None:
    schema = tenant_schema(TENANT)
    await setup(dsn, schema)
    blocks = heavy_blocks(40, 350, 7)
    nrows = sum(len(b) for b in blocks)
    forms = {
        m: [Write(tenant=TENANT, rows=encode(b, n)) for b in blocks]
        for m, n in (("whole", sys.maxsize), ("shared", SHARED_MIN_ROWS))
    }
    starts = range(0, len(blocks), G)
    for m, ws in forms.items():
        steps = sum(len(plan([w.rows for w in ws[i : i + G]])) for i in starts)
        print(m, "statements per group:", steps / len(starts))
    res: dict[str, dict[str, list[float]]] = {m: {"insert": [], "update": []} for m in forms}
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        pid = int(row[0]) if row else 0
        await conn.commit()
        for _ in range(REPEATS):
            for m, ws in forms.items():
                await _truncate(conn, schema)
                for phase in ("insert", "update"):
                    cpu0 = cpu_seconds(pid)
                    for i in starts:
                        results = await write_group(conn, ws[i : i + G], {})
                        assert all(isinstance(r, Written) for r in results), results
                    res[m][phase].append((cpu_seconds(pid) - cpu0) * 1e6 / nrows)
    for m, r in res.items():
        print(m, "median µs/row", {k: round(statistics.median(v), 1) for k, v in r.items()}, r)


if __name__ == "__main__":
    home = Path(tempfile.mkdtemp(prefix="dlqproc-commit-groups-"))
    try:
        with PostgresServer(home / "data") as server:
            print("G", G, "repeats", REPEATS, "load", os.getloadavg())
            asyncio.run(main(server.dsn))
            print("load", os.getloadavg())
    finally:
        shutil.rmtree(home, ignore_errors=True)
