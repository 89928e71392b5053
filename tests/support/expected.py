"""A seeded run of `dlqproc publish`, and what it must leave behind (for count checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any

from dlqproc.generate import Generator

TENANTS = ("acme", "globex", "initech")
NOW = 1764400000


def publish_command(url: str, n: int, seed: int, invalid_rate: float, *extra: str) -> list[str]:
    """`dlqproc publish` of n generated events for TENANTS, as `expected` counts them."""
    return [
        sys.executable, "-m", "dlqproc", "publish",
        "--url", url,
        "--count", str(n),
        "--tenants", ",".join(TENANTS),
        "--seed", str(seed),
        "--now", str(NOW),
        "--history-batch", "20",
        "--invalid-rate", str(invalid_rate),
        "--quiet",
        *extra,
    ]  # fmt: skip


def publish(
    url: str, n: int, env: dict[str, str], seed: int = 7, invalid_rate: float = 0.02
) -> None:
    """Publish n generated events and check JetStream acknowledged every one."""
    out = subprocess.run(
        publish_command(url, n, seed, invalid_rate),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert f"acknowledged {n}," in out.stdout


def expected(n: int, seed: int, invalid_rate: float) -> tuple[int, int, dict[str, set[str]]]:
    """Invalid events, orphan updates, and the message/chat ids valid events leave behind.

    The generator, like real producers, sometimes updates a row no event ever
    creates: such an update is retried, dead-lettered and finally exhausted.
    """
    events = list(
        Generator(
            seed, TENANTS, _bases(), history_batch=20, invalid_rate=invalid_rate, now=NOW
        ).events(n)
    )
    invalid = sum(1 for e in events if not e.valid)
    ids: dict[str, set[str]] = {"messages": set(), "chats": set(), "contacts": set()}
    updates: list[tuple[str, str]] = []
    for e in events:
        if not e.valid:
            continue
        body = json.loads(e.body)
        for table, keys in ids_of(e.base, e.tenant, body).items():
            ids[table] |= keys
        t = e.tenant
        if e.base == "v1.messages.update":
            updates.append(("messages", f"{t}/{body['message_id']}"))
        elif e.base == "v1.chats.update":
            updates.append(("chats", f"{t}/{body['chat_id']}"))
        elif e.base == "v1.contacts.update":
            updates.append(("contacts", f"{t}/{body['phone_number']}/{body['agent_id']}"))
    orphans = sum(1 for table, key in updates if key not in ids[table])
    del ids["contacts"]
    return invalid, orphans, ids


def ids_of(base: str, t: str, body: Any) -> dict[str, set[str]]:
    """The "<tenant>/<id>" keys an upsert event of `base` creates, per table."""
    if base == "v1.messages.upsert":
        return {"messages": {f"{t}/{body['message_id']}"}}
    if base == "v1.history.messages":
        return {"messages": {f"{t}/{m['message_id']}" for m in body["messages"]}}
    if base == "v1.chats.upsert":
        return {"chats": {f"{t}/{body['chat_id']}"}}
    if base == "v1.history.chats":
        return {"chats": {f"{t}/{c['chat_id']}" for c in body["chats"]}}
    if base == "v1.contacts.upsert":
        return {"contacts": {f"{t}/{body['phone_number']}/{body['agent_id']}"}}
    if base == "v1.history.contacts":
        return {"contacts": {f"{t}/{c['phone_number']}/{c['agent_id']}" for c in body["contacts"]}}
    return {}


def exhausted_ids(rows: Iterable[dict[str, Any]]) -> dict[str, set[str]]:
    """Per table, the keys of upsert events that ended in exhausted_events instead."""
    found: dict[str, set[str]] = {"messages": set(), "chats": set(), "contacts": set()}
    for row in rows:
        base, _, tenant = row["source_subject"].rpartition(".")
        body = row["original_payload"]
        if isinstance(body, dict):
            for table, keys in ids_of(base, tenant, body).items():
                found[table] |= keys
    return found


def _bases() -> tuple[str, ...]:
    from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

    return (*REALTIME_BASES, *HISTORY_BASES)


def stored_ids(
    query: Callable[[str], list[tuple[Any, ...]]], tables: Iterable[str]
) -> dict[str, set[str]]:
    """Per table, "<tenant>/<id>" of every row: what `expected` says must be there."""
    return {
        table: {
            f"{t}/{i}"
            for t in TENANTS
            for (i,) in query(f"SELECT {table[:-1]}_id FROM daisi_{t}.{table}")
        }
        for table in tables
    }
