"""The schema/ migrations: which exist, and applying those not yet applied."""

from __future__ import annotations

import importlib.resources
import re
from typing import Any

import psycopg

_FILE = re.compile(r"^(\d+)_[a-z0-9_]+\.sql$")
# Arbitrary constant: serialises migrations of concurrently starting replicas.
_LOCK = 0x646C7170


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every file in schema/, in order."""
    found = []
    for entry in importlib.resources.files("dlqproc.schema").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


async def apply(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    """Apply the migrations not yet applied, in one transaction; their names."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.dlqproc_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cur = await conn.execute("SELECT version FROM public.dlqproc_migrations")
        done = {row[0] for row in await cur.fetchall()}
        for version, name, text in migrations():
            if version in done:
                continue
            await conn.execute(text.encode())
            await conn.execute(
                "INSERT INTO public.dlqproc_migrations (version, name) VALUES (%s, %s)",
                (version, name),
            )
            applied.append(name)
    return applied
