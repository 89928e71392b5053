"""10,000 generated events through `dlqproc publish` and the whole pipeline: counts reconcile."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import pytest
from test_pipeline import main_settled, own_nats, pipeline  # noqa: F401 - fixtures

from dlqproc.generate import Generator
from support.service import Service, wait_until

Make = Callable[..., Service]
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


@pytest.mark.parametrize("n", [10_000])
def test_ten_thousand_published_events_reconcile(pipeline: Make, n: int) -> None:  # noqa: F811
    svc = pipeline(
        NATS_DLQWORKERS="2", NATS_DLQBASEDELAYMINUTES="0.005", NATS_DLQMAXDELAYMINUTES="0.01"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dlqproc",
            "publish",
            "--url",
            svc.nats_url,
            "--count",
            str(n),
            "--tenants",
            ",".join(TENANTS),
            "--seed",
            "7",
            "--now",
            str(NOW),
            "--history-batch",
            "20",
            "--invalid-rate",
            "0.02",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=svc.env,
    )
    assert out.returncode == 0, out.stderr
    assert f"acknowledged {n}," in out.stdout
    wait_until(
        lambda: main_settled(svc) and main_settled(svc, realtime=False) and svc.settled(),
        timeout=400,
        interval=1.0,
    )
    invalid, orphans, ids = expected(n, 7, 0.02)
    exhausted = svc.exhausted()
    # Every invalid event and every orphan update, and nothing else, is exhausted.
    reasons = [r["reason"] for r in exhausted]
    assert reasons.count("validation") == invalid
    assert reasons.count("retries_exhausted") == orphans
    assert len(exhausted) == invalid + orphans
    # Every event reached a table or the DLQ: what is in the DLQ is the invalid
    # ones plus updates that raced their upsert and were then applied.
    dlq = svc.dlq_messages()
    assert len(dlq) >= invalid + orphans
    for table, want in ids.items():
        got = {
            f"{t}/{i}"
            for t in TENANTS
            for (i,) in svc.query(f"SELECT {table[:-1]}_id FROM daisi_{t}.{table}")
        }
        assert got == want, table
