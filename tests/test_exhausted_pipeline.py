"""Replaying each kind of exhausted row through the running service (main
consumers, WhatsApp handlers, the DLQ worker) on real NATS and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable

from test_pipeline import CHAT, MESSAGE, main_settled, send, table

from support.exhausted import cli, exhausted_row, store_rows
from support.service import Service, wait_until

Make = Callable[..., Service]


def _exhausted(svc: Service) -> list[dict[str, object]]:
    return svc.exhausted()


def test_each_kind_of_row_replayed(pipeline: Make) -> None:
    svc = pipeline(
        NATS_REALTIME_MAXDELIVER="2",
        NATS_DLQBASEDELAYMINUTES="0.005",
        NATS_DLQMAXDELAYMINUTES="0.005",
        NATS_DLQMAXRETRIES="2",
        NATS_DLQMAXDELIVER="4",
    )
    # A budget-exhausted update: its message did not exist while it was retried.
    send(svc, "v1.messages.update", "acme", {"message_id": "M1", "status": "read"})
    # A validation failure: a chat without its jid.
    bad_chat = {k: v for k, v in CHAT.items() if k != "jid"}
    send(svc, "v1.chats.upsert", "acme", bad_chat)
    rows = wait_until(lambda: len(_exhausted(svc)) == 2 and _exhausted(svc), timeout=60)
    by_reason = {r["reason"]: r for r in rows}
    update, invalid = by_reason["retries_exhausted"], by_reason["validation"]
    # A body that was not JSON (stored the way the DLQ lane stores one).
    (not_json,) = store_rows(
        svc.dsn,
        [exhausted_row(10**9, "acme", "v1.chats.upsert", None, raw=b"{nope", reason="not_json")],
    )
    # The upsert arrives since.
    send(svc, "v1.messages.upsert", "acme", MESSAGE)
    wait_until(lambda: table(svc, "acme", "messages"), timeout=30)
    assert table(svc, "acme", "messages")[0]["status"] == "sent"

    out = cli(
        "replay", str(update["id"]), str(invalid["id"]), str(not_json),
        dsn=svc.dsn, nats_url=svc.nats_url,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "published 2, refused 1" in out.stdout and "body is not JSON" in out.stdout

    # The update lands and nothing about it is exhausted again.
    wait_until(lambda: table(svc, "acme", "messages")[0]["status"] == "read", timeout=60)
    # The validation failure comes back as a new row linked to the one it replays.
    again = wait_until(
        lambda: [r for r in _exhausted(svc) if r["replay_of"] == invalid["id"]], timeout=60
    )
    assert len(again) == 1 and again[0]["reason"] == "validation"
    wait_until(lambda: svc.settled() and main_settled(svc), timeout=60)
    assert len(_exhausted(svc)) == 4  # the two, the not-JSON row, the linked one
    assert not [r for r in _exhausted(svc) if r["replay_of"] == update["id"]]

    shown = cli("show", str(invalid["id"]), dsn=svc.dsn)
    assert shown.returncode == 0
    assert f"{again[0]['id']} replays {invalid['id']}" in shown.stdout
    assert "replay    by" in shown.stdout
    listed = cli("list", "--hide-superseded", "--json", dsn=svc.dsn)
    ids = {json.loads(line)["id"] for line in listed.stdout.splitlines()[:-1]}
    assert invalid["id"] not in ids and again[0]["id"] in ids
