"""Hostile values at the NATS and config edge that earlier reviews left open.

Each test names the defect it proves: a header a producer may set, a NATS
limit a message may press against, a setting past what NATS or PostgreSQL can
carry. The service runs for real (nats-server, PostgreSQL, worker processes).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from dlqproc.broker import (
    MAX_HEADER_CHARS,
    Broker,
    PublishRejected,
    StreamSpec,
    header_bytes,
)
from dlqproc.embedded import NatsServer
from dlqproc.lanes import OTHER_EVENT_TYPE
from dlqproc.topology import REALTIME_BASES
from support.hostile import valid_payload
from support.service import MAIN_CONSUMERS, PIPELINE_ENV, Service, envelope, wait_until

Make = Callable[..., Service]
REALTIME_STREAM = MAIN_CONSUMERS["realtime"][0]
SMALL_PAYLOAD = 64 * 1024
TS = 1764400000  # 2025-11-29T07:06:40Z


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
    svc = service()
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


@pytest.fixture
def small_nats(service: Make, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: the whole pipeline on a nats-server of its own with a 64 KiB max_payload."""
    server = NatsServer(tmp_path / "nats-small", max_payload=SMALL_PAYLOAD)
    server.start()
    services: list[Service] = []

    def make(start: bool = True, **settings: str) -> Service:
        svc = service(start=start, nats_url=server.url, **{**PIPELINE_ENV, **settings})
        services.append(svc)
        return svc

    yield make
    for svc in services:  # before their nats-server goes
        svc.stop()
    server.stop()


def test_a_dead_letter_that_would_pass_max_payload_with_its_headers_is_stored(
    small_nats: Make,
) -> None:
    """NATS counts headers into max_payload. A failed event near the limit whose
    Nats-Msg-Id is long made a DLQ message (envelope + headers) NATS refuses:
    nats-py checks the body alone, the server closed the connection, and the
    event came back to do it again, for ever."""
    svc = small_nats()
    pad = "p" * (SMALL_PAYLOAD // 2)
    body = json.dumps({"chat_id": "c-1", "pad": pad}).encode()  # no jid etc: validation
    long_id = "i" * (SMALL_PAYLOAD - len(body) - 100)  # the event itself fits
    [seq] = publish_with_headers(svc, "v1.chats.upsert.acme", [(body, {"Nats-Msg-Id": long_id})])
    row = wait_until(lambda: svc.exhausted_of(REALTIME_STREAM, seq), timeout=30)
    assert row["reason"] == "validation"
    svc.wait_drained(30)
    assert not svc.find_containing("disconnected"), "the DLQ publish broke the NATS connection"


def test_a_publish_past_max_payload_with_its_headers_is_refused_before_it_is_sent(
    tmp_path: Path,
) -> None:
    """At the limit the message is published; one byte over, the broker refuses it
    itself and the connection stays up (the server would close it)."""

    async def main() -> tuple[int, str, bool]:
        broker = await Broker.connect(server.url, name="test-oversized")
        try:
            await broker.ensure_stream(StreamSpec("big", ("big.>",), 1.0), reconcile=True)
            headers = {"Nats-Msg-Id": "m-1", "X-Pad": "h" * 1000}
            body = b"b" * (SMALL_PAYLOAD - header_bytes(headers))
            seq = await broker.publish("big.x", body, headers)
            publisher = broker.acked_publisher()
            refused = ""
            for publish in (broker.publish, publisher.publish):
                try:
                    await publish("big.x", body + b"!", {**headers, "Nats-Msg-Id": "m-2"})
                except PublishRejected as exc:
                    refused = str(exc)
            return seq, refused, broker.connected
        finally:
            await broker.close()

    with NatsServer(tmp_path / "nats", max_payload=SMALL_PAYLOAD) as server:
        seq, refused, connected = asyncio.run(main())
    assert seq == 1
    assert f"exceeds NATS max_payload {SMALL_PAYLOAD}" in refused
    assert connected


def test_a_producer_s_message_id_neither_fails_nor_bloats_its_rows(small_nats: Make) -> None:
    """Nats-Msg-Id is copied into every row's last_metadata. A NUL in it made
    PostgreSQL refuse the rows of a good event (exhausted as validation on the
    DLQ lane); an id as long as the message was copied whole into each of a
    history batch's rows (5,000 rows of a 1 MB id: 5 GB in a worker)."""
    svc = small_nats()
    chat = json.dumps(valid_payload("v1.chats.upsert", "nul", TS)).encode()
    contacts = [valid_payload("v1.contacts.upsert", f"h{i}", TS) for i in range(50)]
    history = json.dumps({"contacts": contacts}).encode()
    long_id = "L" * (SMALL_PAYLOAD - len(history) - 200)
    publish_with_headers(svc, "v1.chats.upsert.acme", [(chat, {"Nats-Msg-Id": "id\x00nul"})])
    publish_with_headers(svc, "v1.history.contacts.acme", [(history, {"Nats-Msg-Id": long_id})])
    publish_with_headers(svc, "v1.dlq.acme", [(envelope_of(chat), {"Nats-Msg-Id": "dlq\x00nul"})])
    svc.wait_drained(30)
    assert svc.exhausted() == []
    [(chat_id,)] = svc.query("SELECT last_metadata->>'msg_id' FROM daisi_acme.chats")
    assert chat_id in ("id\\u0000nul", "dlq\\u0000nul")
    ids = svc.query("SELECT DISTINCT last_metadata->>'msg_id' FROM daisi_acme.contacts")
    assert ids == [(long_id[:MAX_HEADER_CHARS],)]


def envelope_of(event: bytes) -> bytes:
    return envelope("v1.chats.upsert", "acme", json.loads(event))


def metrics_text(svc: Service) -> str:
    url = f"http://127.0.0.1:{svc.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_event_type_labels_stay_bounded_whatever_subjects_the_stream_carries(
    small_nats: Make,
) -> None:
    """The events streams are the producers': one may carry more subjects than
    dlqproc's bases (v1.chats.>), and without COMPANY_ID the consumer reads them
    all. Each subject's base became an event_type label value of its own, so a
    producer's junk subjects grew /metrics (and the supervisor) without bound."""
    svc = small_nats(start=False)

    async def producers_stream() -> None:
        nc = await nats.connect(svc.nats_url, connect_timeout=5)
        try:
            await nc.jetstream().add_stream(name=REALTIME_STREAM, subjects=["v1.chats.>"])
        finally:
            await nc.close()

    asyncio.run(producers_stream())
    svc.start()
    chat = json.dumps(valid_payload("v1.chats.upsert", "ok", TS)).encode()
    junk = [(f"v1.chats.junk{i}.x.acme", b"{}") for i in range(40)]
    svc.publish_each([("v1.chats.upsert.acme", chat), *junk])
    svc.wait_drained(60)
    assert len(svc.exhausted()) == len(junk)
    received = re.findall(
        r'^message_event_service_events_received_total\{[^}]*event_type="([^"]*)"',
        metrics_text(svc),
        re.MULTILINE,
    )
    assert "v1.chats.upsert" in received
    assert set(received) <= {*REALTIME_BASES, OTHER_EVENT_TYPE}, sorted(set(received))[:5]


def raw_publish(url: str, subject: bytes, payload: bytes) -> None:
    """PUB over a plain socket: nats-server takes any bytes but whitespace in a
    subject, as a Go producer may send them; nats-py would refuse to."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"INFO ")
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"protocol":1}\r\n')
        sock.sendall(b"PUB %s %d\r\n%s\r\nPING\r\n" % (subject, len(payload), payload))
        assert reader.readline() == b"PONG\r\n"  # the server took the message


def test_a_subject_that_is_not_utf8_is_exhausted_and_the_connection_lives(
    service: Make,
) -> None:
    """nats-py decodes a delivered subject strictly inside its read loop, whose
    task ended on the error: the connection stayed up but deaf (no message, no
    PubAck) until its pings timed out, and the message came back after every ack
    wait to do it again."""
    svc = service()
    raw_publish(svc.nats_url, f"{svc.subject}.caf".encode() + b"\xe9", envelope("t.ok", "x", {}))
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "after"})])
    wait_until(lambda: svc.rows("acme") == {"after": 1}, timeout=30)
    [row] = wait_until(svc.exhausted, timeout=30)
    assert row["reason"] == "invalid_tenant"
    assert row["dlq_subject"] == f"{svc.subject}.caf\ufffd"
    wait_until(svc.settled)
