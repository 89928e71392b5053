"""What a seeded run of `dlqproc publish` must leave behind (for tests that check counts)."""

from __future__ import annotations

import json

from dlqproc.generate import Generator

TENANTS = ("acme", "globex", "initech")
NOW = 1764400000


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
        t = e.tenant
        if e.base == "v1.messages.upsert":
            ids["messages"].add(f"{t}/{body['message_id']}")
        elif e.base == "v1.history.messages":
            ids["messages"].update(f"{t}/{m['message_id']}" for m in body["messages"])
        elif e.base == "v1.chats.upsert":
            ids["chats"].add(f"{t}/{body['chat_id']}")
        elif e.base == "v1.history.chats":
            ids["chats"].update(f"{t}/{c['chat_id']}" for c in body["chats"])
        elif e.base == "v1.contacts.upsert":
            ids["contacts"].add(f"{t}/{body['phone_number']}/{body['agent_id']}")
        elif e.base == "v1.history.contacts":
            ids["contacts"].update(
                f"{t}/{c['phone_number']}/{c['agent_id']}" for c in body["contacts"]
            )
        elif e.base == "v1.messages.update":
            updates.append(("messages", f"{t}/{body['message_id']}"))
        elif e.base == "v1.chats.update":
            updates.append(("chats", f"{t}/{body['chat_id']}"))
        elif e.base == "v1.contacts.update":
            updates.append(("contacts", f"{t}/{body['phone_number']}/{body['agent_id']}"))
    orphans = sum(1 for table, key in updates if key not in ids[table])
    del ids["contacts"]
    return invalid, orphans, ids


def _bases() -> tuple[str, ...]:
    from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

    return (*REALTIME_BASES, *HISTORY_BASES)
