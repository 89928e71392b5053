"""The events streams belong to the producers: created when missing, never altered.

A producers' stream that differs from what dlqproc would create (other
subjects, a shorter max age, limits of its own) is read as it is and left
unchanged, each difference logged once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import nats
from nats.js import api
from test_pipeline import CHAT

from dlqproc.embedded import NatsServer
from support.service import Service

Make = Callable[..., Service]
STREAM = "wa_events_stream"
SETTINGS = (
    "subjects",
    "max_age",
    "num_replicas",
    "description",
    "max_msgs",
    "duplicate_window",
    "retention",
)


def _settings(config: api.StreamConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in SETTINGS}


def stream_settings(url: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            return _settings((await nc.jetstream().stream_info(STREAM)).config)
        finally:
            await nc.close()

    return asyncio.run(go())


def producers_stream(url: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().add_stream(
                api.StreamConfig(
                    name=STREAM,
                    # Fewer subjects than dlqproc lists, and one it does not know.
                    subjects=["v1.chats.upsert.*", "v1.messages.upsert.*", "v1.audit.*"],
                    description="the producers' stream",
                    max_age=86400,  # dlqproc would create it with 30 days
                    max_msgs=100_000,
                    duplicate_window=30,
                    storage=api.StorageType.FILE,
                )
            )
            return _settings(info.config)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_a_producers_stream_that_differs_is_left_unchanged(
    pipeline: Make, own_nats: NatsServer
) -> None:
    before = producers_stream(own_nats.url)
    svc = pipeline()
    assert stream_settings(own_nats.url) == before
    kept = svc.find("NATS stream setting left as is", stream=STREAM)
    refused = {e["setting"]: e for e in kept if e["why"] == "not dlqproc's stream"}
    assert set(refused) == {"subjects", "max_age"}, kept
    assert refused["max_age"]["have"] == 86400 * 10**9
    assert not svc.find_containing(f"updated stream {STREAM}")
    assert not [e for e in svc.find("NATS topology reconciled") if STREAM in e["change"]]
    # Read as it is: its events are processed.
    svc.publish_to("v1.chats.upsert.acme", [json.dumps(CHAT).encode()])
    svc.wait_drained(timeout=60)
    assert svc.query("SELECT chat_id FROM daisi_acme.chats") == [("c1",)]
    assert stream_settings(own_nats.url) == before
