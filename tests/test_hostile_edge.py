"""Hostile values at the NATS and config edge that earlier reviews left open.

Each test names the defect it proves: a header a producer may set, a NATS
limit a message may press against, a setting past what NATS or PostgreSQL can
carry. The service runs for real (nats-server, PostgreSQL, worker processes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats

from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def publish_with_headers(
    svc: Service, subject: str, items: list[tuple[bytes, dict[str, str]]]
) -> list[int]:
    """Publish (body, headers) pairs to `subject`; their stream sequences."""

    async def go() -> list[int]:
        nc = await nats.connect(svc.nats_url.split(","), connect_timeout=5)
        try:
            js = nc.jetstream()
            return [(await js.publish(subject, b, headers=h, timeout=10)).seq for b, h in items]
        finally:
            await nc.close()

    return asyncio.run(go())


def test_a_producer_header_named_like_a_status_is_still_a_message(service: Make) -> None:
    """JetStream's pull status replies (100 heartbeat, 404, 409...) carry a Status
    header; so may any message a producer publishes. A message is told from a
    status by its ack reply subject, or a 'Status: 100' message is dropped as a
    heartbeat on every delivery and a 'Status: 503' one fails its lane's fetch."""
    svc = service().start()
    subject = f"{svc.subject}.acme"
    publish_with_headers(
        svc,
        subject,
        [
            (envelope("t.ok", "acme", {"id": "heartbeat-lookalike"}), {"Status": "100"}),
            (envelope("t.ok", "acme", {"id": "error-lookalike"}), {"Status": "503"}),
            (envelope("t.ok", "acme", {"id": "plain"}), {}),
        ],
    )
    wait_until(lambda: len(svc.rows("acme")) == 3, timeout=30)
    wait_until(svc.settled)
