"""`dlqproc publish` against a real nats-server.

Streams over the real v1.* subjects are only made on a server of this module's
own: the shared session server's v1.* subjects belong to other tests. On the
shared one, every stream here covers a subject prefix unique to this test run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.js import api

from dlqproc import envelope
from dlqproc.embedded import NatsServer
from dlqproc.handlers.payloads import EVENT_TYPES
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES

SUMMARY = re.compile(
    r"^published (\d+), acknowledged (\d+), failed (\d+) in (\d+\.\d+) s$", re.MULTILINE
)


def dlqproc_publish(
    url: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-m", "dlqproc", "publish", "--url", url, *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    # Decoded by hand: text mode would turn the progress line's "\r" into "\n".
    return subprocess.CompletedProcess(
        out.args, out.returncode, out.stdout.decode(), out.stderr.decode()
    )


def summary(out: subprocess.CompletedProcess[str]) -> tuple[int, int, int, float]:
    match = SUMMARY.search(out.stdout)
    assert match, (out.stdout, out.stderr)
    return int(match[1]), int(match[2]), int(match[3]), float(match[4])


async def _add_streams(url: str, streams: dict[str, list[str]]) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name, subjects in streams.items():
            await js.add_stream(api.StreamConfig(name=name, subjects=subjects))
    finally:
        await nc.close()


async def _messages(url: str, stream: str) -> list[Any]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        return [await js.get_msg(stream, seq) for seq in range(first, last + 1)] if last else []
    finally:
        await nc.close()


async def _counts(url: str, streams: list[str]) -> list[int]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return [int((await js.stream_info(s)).state.messages) for s in streams]
    finally:
        await nc.close()


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and stream name stem) no other test uses."""
    return f"uniq{os.getpid()}x{secrets.token_hex(3)}"


def test_subject_mode_publishes_one_body(
    nats_server: NatsServer, prefix: str, tmp_path: Path
) -> None:
    stream = f"{prefix}_one"
    asyncio.run(_add_streams(nats_server.url, {stream: [f"{prefix}.>"]}))
    out = dlqproc_publish(
        nats_server.url, "--subject", f"{prefix}.events.acme", "--body", '{"a": 1}', "--quiet"
    )
    assert out.returncode == 0, out.stderr
    assert summary(out)[:3] == (1, 1, 0)

    path = tmp_path / "body.json"
    path.write_bytes(b'{"from": "file"}')
    out = dlqproc_publish(
        nats_server.url, "--subject", f"{prefix}.events.globex", "--body", f"@{path}"
    )
    assert out.returncode == 0, out.stderr
    assert summary(out)[:3] == (1, 1, 0)

    first, second = asyncio.run(_messages(nats_server.url, stream))
    assert (first.subject, first.data) == (f"{prefix}.events.acme", b'{"a": 1}')
    assert (second.subject, second.data) == (f"{prefix}.events.globex", b'{"from": "file"}')


def test_an_unacknowledged_publish_exits_1(nats_server: NatsServer, prefix: str) -> None:
    out = dlqproc_publish(
        nats_server.url, "--subject", f"{prefix}.nostream.acme", "--body", "{}", "--quiet"
    )
    assert out.returncode == 1
    assert summary(out)[:3] == (1, 0, 1)
    assert "first failure" in out.stderr


def test_dlq_mode_publishes_envelopes_to_the_configured_dlq_subject(
    nats_server: NatsServer, prefix: str
) -> None:
    stream = f"{prefix}_dlq"
    asyncio.run(_add_streams(nats_server.url, {stream: [f"{prefix}.dlq.>"]}))
    started = time.monotonic()
    out = dlqproc_publish(
        nats_server.url,
        "--dlq",
        "--count", "40",
        "--rate", "100",
        "--tenants", "a,b",
        "--invalid-rate", "0.25",
        "--history-batch", "3",
        "--quiet",
        env={"NATS_DLQSUBJECT": f"{prefix}.dlq"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    published, acked, failed, seconds = summary(out)
    assert (published, acked, failed) == (40, 40, 0)
    # 100/s with a burst of 10: the other 30 take at least 0.3 s.
    assert seconds >= 0.28 and time.monotonic() - started >= 0.28

    msgs = asyncio.run(_messages(nats_server.url, stream))
    assert len(msgs) == 40
    ids = set()
    fatal = 0
    for msg in msgs:
        tenant = msg.subject.rpartition(".")[2]
        assert msg.subject == f"{prefix}.dlq.{tenant}" and tenant in ("a", "b")
        env = envelope.decode(msg.data, 1 << 24)
        assert env.company == tenant
        base = envelope.split_source(env.source_subject, tenant)
        assert base in EVENT_TYPES
        original = msg.headers["Original-Nats-Msg-Id"]
        assert msg.headers["Nats-Msg-Id"] == f"dlq-{original}"
        ids.add(original)
        fatal += env.error_type == "fatal"
        if env.error_type == "retryable":
            msgspec.json.decode(env.original_payload, type=EVENT_TYPES[base])
    assert len(ids) == 40
    assert 0 < fatal < 40


@pytest.mark.parametrize(
    "args",
    [
        ("--count", "3", "--duration", "1"),
        ("--subject", "x.y"),
        ("--invalid-rate", "2"),
        ("--tenants", "bad tenant"),
        ("--bases", "v1.nope"),
    ],
)
def test_bad_arguments_exit_2(args: tuple[str, ...]) -> None:
    out = dlqproc_publish("nats://127.0.0.1:1", *args)
    assert out.returncode == 2, (out.stdout, out.stderr)


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A server of this module's own, with the two event streams over the real subjects."""
    with NatsServer(tmp_path_factory.mktemp("nats")) as server:
        asyncio.run(
            _add_streams(
                server.url,
                {
                    "wa_events_stream": [f"{b}.*" for b in REALTIME_BASES],
                    "wa_history_events_stream": [f"{b}.*" for b in HISTORY_BASES],
                },
            )
        )
        yield server


STREAMS = ["wa_events_stream", "wa_history_events_stream"]


def test_generated_events_fill_the_event_streams(own_nats: NatsServer) -> None:
    before = sum(asyncio.run(_counts(own_nats.url, STREAMS)))
    out = dlqproc_publish(own_nats.url, "--count", "500", "--tenants", "a,b,c", "--quiet")
    assert out.returncode == 0, out.stderr
    assert summary(out)[:3] == (500, 500, 0)
    assert "\r" not in out.stderr and "%)" not in out.stderr
    realtime, history = asyncio.run(_counts(own_nats.url, STREAMS))
    assert realtime + history - before == 500
    assert realtime > 0 and history > 0

    # With a progress line; another seed, so its Nats-Msg-Ids are new.
    out = dlqproc_publish(
        own_nats.url, "--count", "300", "--seed", "2", "--bases", "v1.messages.upsert"
    )
    assert out.returncode == 0, out.stderr
    assert summary(out)[:3] == (300, 300, 0)
    assert "\r300/300 (100.0%)" in out.stderr
    assert sum(asyncio.run(_counts(own_nats.url, STREAMS))) - before == 800


def test_duration_and_rate_bound_the_run(own_nats: NatsServer) -> None:
    out = dlqproc_publish(
        own_nats.url, "--duration", "1", "--rate", "200", "--seed", "3", "--quiet"
    )
    assert out.returncode == 0, out.stderr
    published, acked, failed, seconds = summary(out)
    assert acked == published and failed == 0
    # 200/s for one second, plus a burst of 20.
    assert 150 <= published <= 225
    assert 0.9 <= seconds < 3


PASSWORD = "pub-s3cret:@/ x"  # URL-hostile on purpose: it never has to go in one


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[NatsServer]:
    conf = f"authorization {{ user: pub\n password: {json.dumps(PASSWORD)} }}"
    with NatsServer(tmp_path / "secured-nats", config=conf) as server:
        yield server


def _run_publish(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # No NATS_* of the caller's: the config given here is all it has.
    base = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return subprocess.run(
        [sys.executable, "-m", "dlqproc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **env},
    )


def test_publish_takes_the_service_credentials_from_config_or_env(
    secured_nats: NatsServer, prefix: str, tmp_path: Path
) -> None:
    stream = f"{prefix}_secured"

    async def messages(create: bool) -> int:
        nc = await nats.connect(
            secured_nats.url, user="pub", password=PASSWORD, max_reconnect_attempts=0
        )
        try:
            js = nc.jetstream()
            if create:
                await js.add_stream(api.StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
            return int((await js.stream_info(stream)).state.messages)
        finally:
            await nc.close()

    assert asyncio.run(messages(create=True)) == 0
    config = tmp_path / "dlqproc.yaml"
    config.write_text(
        f"nats:\n  url: {secured_nats.url}\n  user: pub\n  password: {json.dumps(PASSWORD)}\n"
    )
    one = ("--subject", f"{prefix}.events.acme", "--body", "{}", "--quiet")

    # --config after the command, before it, and the env names: no credentials in a URL.
    for args, env in [
        (("publish", "--config", str(config), *one), {}),
        (("--config", str(config), "publish", *one), {}),
        (
            ("publish", *one),
            {"NATS_URL": secured_nats.url, "NATS_USER": "pub", "NATS_PASSWORD": PASSWORD},
        ),
        # --url picks the server; the config's credentials still apply.
        (("publish", "--config", str(config), "--url", secured_nats.url, *one), {}),
    ]:
        out = _run_publish(*args, env=env)
        assert out.returncode == 0, (args, out.stderr)
        assert summary(out)[:3] == (1, 1, 0)
    assert asyncio.run(messages(create=False)) == 4

    # Without them the server refuses; with a wrong password too, and neither
    # the password given nor the right one is printed.
    for env in [
        {"NATS_URL": secured_nats.url},
        {"NATS_URL": secured_nats.url, "NATS_USER": "pub", "NATS_PASSWORD": "wrong-Pa55"},
    ]:
        out = _run_publish("publish", *one, env=env)
        assert out.returncode == 1, out.stderr
        assert "refused the credentials" in out.stderr, out.stderr
        assert "wrong-Pa55" not in out.stderr + out.stdout
        assert PASSWORD not in out.stderr + out.stdout
