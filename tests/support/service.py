"""Run `dlqproc run` as a real child process against real servers, and observe it.

Every wait is a bounded poll on something observable: a log line, the
consumer's counters in JetStream, rows in Postgres.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psycopg

from dlqproc.embedded import free_port

TESTS_DIR = Path(__file__).resolve().parent.parent
_ids = itertools.count(1)

# The main consumers' streams and durables (no COMPANY_ID), by lane.
MAIN_CONSUMERS = {
    "realtime": ("wa_events_stream", "wa_events_realtime_consumer"),
    "historical": ("wa_history_events_stream", "wa_history_events_historical_consumer"),
}
DLQ_STREAM = "dlq_stream"

# The whole pipeline: both main consumers, the WhatsApp handlers, the DLQ on
# v1.dlq.<tenant>, short NAK delays. The events streams' subjects are fixed, so
# a service started with it needs a nats-server of its own.
PIPELINE_ENV = {
    "NATS_REALTIME_ENABLED": "true",
    "NATS_HISTORICAL_ENABLED": "true",
    "HANDLERS_MODULE": "dlqproc.handlers.whatsapp",
    "NATS_DLQSUBJECT": "v1.dlq",
    "NATS_DLQSTREAM": DLQ_STREAM,
    "NATS_REALTIME_NAKBASEDELAY": "100ms",
    "NATS_REALTIME_NAKMAXDELAY": "400ms",
    "NATS_HISTORICAL_NAKBASEDELAY": "100ms",
    "NATS_HISTORICAL_NAKMAXDELAY": "400ms",
}


def wait_until(pred: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {pred}")
        time.sleep(interval)


def envelope(
    base: str, tenant: str, payload: object, *, company: str | None = None, ts: str | None = None
) -> bytes:
    return json.dumps(
        {
            "source_subject": f"{base}.{tenant}",
            "company": tenant if company is None else company,
            "original_payload": payload,
            "error": "failed in main consumer",
            "error_type": "retryable",
            "retry_count": 5,
            "max_retry": 5,
            "ts": ts or datetime.now(UTC).isoformat(),
        }
    ).encode()


class Service:
    """One dlqproc process with its own stream, subject, consumer and database."""

    def __init__(self, nats_url: str, dsn: str, tmp: Path, **settings: str) -> None:
        n = next(_ids)
        self.nats_url, self.dsn = nats_url, dsn
        self.stream = settings.get("NATS_DLQSTREAM", f"dlq_test_{os.getpid()}_{n}")
        self.subject = settings.get("NATS_DLQSUBJECT", f"t{os.getpid()}x{n}.dlq")
        self.durable = self.subject.replace(".", "_") + "_worker_consumer"
        self.log_path = tmp / f"service-{n}.log"
        self.port = free_port()
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
            "NATS_URL": nats_url,
            "POSTGRES_DSN": dsn,
            "SERVER_PORT": str(self.port),
            "SERVER_HOST": "127.0.0.1",
            "LOG_LEVEL": "DEBUG",
            "HANDLERS_MODULE": "support.handlers",
            # The events streams' subjects are fixed: tests that use the main
            # consumers turn them on with a NATS server of their own.
            "NATS_REALTIME_ENABLED": "false",
            "NATS_HISTORICAL_ENABLED": "false",
            "NATS_DLQWORKERS": "2",
            "NATS_DLQBASEDELAYMINUTES": "0.005",  # 0.3 s
            "NATS_DLQMAXDELAYMINUTES": "0.02",
            "NATS_DLQJITTER": "0",
            "NATS_DLQMAXRETRIES": "3",
            "NATS_DLQMAXDELIVER": "6",
            "NATS_DLQACKWAIT": "10s",
            "NATS_DLQTASKTIMEOUT": "8s",
            "NATS_SHUTDOWNGRACE": "10s",
            # PostgreSQL is up before any test starts dlqproc, but for the
            # tests of an unreachable one: those need not wait a minute.
            "POSTGRES_STARTUPTIMEOUT": "3s",
            **settings,
            "NATS_DLQSTREAM": self.stream,
            "NATS_DLQSUBJECT": self.subject,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process

    def start(self, wait: bool = True) -> Service:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlqproc", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            wait_until(lambda: self.find("Starting DLQ worker...") or self._exited(), 60)
            assert self.proc.poll() is None, self.log_text()
        return self

    def _exited(self) -> bool:
        assert self.proc is not None
        return self.proc.poll() is not None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait_exit(10)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        pids = [int(p) for p in path.read_text().split()]
        # The spawn context also starts a resource tracker; workers run dlqproc's main.
        return [p for p in pids if b"resource_tracker" not in _cmdline(p)]

    # -- logs

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out

    def find(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.logs()
            if e.get("msg") == msg and all(e.get(k) == v for k, v in fields.items())
        ]

    # -- NATS

    def publish(self, tenant: str, bodies: Iterable[bytes]) -> list[int]:
        async def go() -> list[int]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                js = nc.jetstream()
                return [
                    (await js.publish(f"{self.subject}.{tenant}", b, timeout=10)).seq
                    for b in bodies
                ]
            finally:
                await nc.close()

        return asyncio.run(go())

    def publish_to(self, subject: str, bodies: Iterable[bytes]) -> list[int]:
        """Publish event bodies to an events subject (for the main consumers)."""

        async def go() -> list[int]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                js = nc.jetstream()
                return [(await js.publish(subject, b, timeout=10)).seq for b in bodies]
            finally:
                await nc.close()

        return asyncio.run(go())

    def consumer_of(self, stream: str, durable: str) -> dict[str, int]:
        async def go() -> dict[str, int]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                info = await nc.jetstream().consumer_info(stream, durable)
                return {
                    "pending": int(info.num_pending or 0),
                    "ack_pending": int(info.num_ack_pending or 0),
                    "ack_floor": int(info.ack_floor.stream_seq or 0),
                }
            finally:
                await nc.close()

        return asyncio.run(go())

    def _stored(self) -> list[tuple[int, Any]]:
        """(sequence, raw message) of every message still in the DLQ stream."""

        async def go() -> list[tuple[int, Any]]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                js = nc.jetstream()
                info = await js.stream_info(self.stream)
                out: list[tuple[int, Any]] = []
                if not info.state.messages:
                    return out
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    try:
                        out.append((seq, await js.get_msg(self.stream, seq)))
                    except nats.js.errors.NotFoundError:
                        continue
                return out
            finally:
                await nc.close()

        return asyncio.run(go())

    def dlq_messages(self) -> list[dict[str, Any]]:
        """Every message in the DLQ stream, decoded, with its headers."""
        out = []
        for _, raw in self._stored():
            body = json.loads(raw.data or b"null")
            body["_subject"] = raw.subject
            body["_headers"] = dict(raw.headers or {})
            out.append(body)
        return out

    def consumer(self) -> dict[str, int]:
        async def go() -> dict[str, int]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                info = await nc.jetstream().consumer_info(self.stream, self.durable)
                return {
                    "pending": int(info.num_pending or 0),
                    "ack_pending": int(info.num_ack_pending or 0),
                    "redelivered": int(info.num_redelivered or 0),
                    "delivered": int(info.delivered.stream_seq or 0),
                    "ack_floor": int(info.ack_floor.stream_seq or 0),
                }
            finally:
                await nc.close()

        return asyncio.run(go())

    def stream_messages(self) -> int:
        async def go() -> int:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                return int((await nc.jetstream().stream_info(self.stream)).state.messages)
            finally:
                await nc.close()

        return asyncio.run(go())

    def settled(self) -> bool:
        c = self.consumer()
        return c["pending"] == 0 and c["ack_pending"] == 0

    # -- Postgres

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def execute(self, sql: str) -> int:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(sql).rowcount  # type: ignore[arg-type]

    def rows(self, tenant: str) -> dict[str, int]:
        try:
            got = self.query(f"SELECT id, attempt FROM daisi_{tenant}.test_rows")
        except psycopg.errors.UndefinedTable:
            return {}
        return {r[0]: r[1] for r in got}

    def exhausted(self) -> list[dict[str, Any]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute("SELECT * FROM exhausted_events ORDER BY id")
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    # -- the whole pipeline (PIPELINE_ENV)

    def publish_each(self, items: Iterable[tuple[str, bytes]]) -> list[int]:
        """Publish (subject, body) pairs in order on one connection; their stream sequences."""

        async def go() -> list[int]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                js = nc.jetstream()
                return [(await js.publish(s, b, timeout=30)).seq for s, b in items]
            finally:
                await nc.close()

        return asyncio.run(go())

    def consumers(self) -> dict[str, dict[str, int]]:
        """pending / ack_pending of every consumer the service runs, the DLQ's last.

        Main consumers are read first: one that dead-letters an event publishes
        it to the DLQ before its ACK, so a DLQ read after theirs sees it.
        """
        lanes = [
            (lane, *MAIN_CONSUMERS[lane])
            for lane in ("realtime", "historical")
            if self.env.get(f"NATS_{lane.upper()}_ENABLED", "true") == "true"
        ]
        lanes.append(("dlq", self.stream, self.durable))

        async def go() -> dict[str, dict[str, int]]:
            nc = await nats.connect(self.nats_url.split(","), connect_timeout=5)
            try:
                js = nc.jetstream()
                out = {}
                for lane, stream, durable in lanes:
                    try:
                        info = await js.consumer_info(stream, durable)
                    except nats.js.errors.NotFoundError:
                        out[lane] = {"pending": -1, "ack_pending": -1}
                        continue
                    out[lane] = {
                        "pending": int(info.num_pending or 0),
                        "ack_pending": int(info.num_ack_pending or 0),
                    }
                return out
            finally:
                await nc.close()

        return asyncio.run(go())

    def wait_drained(self, timeout: float = 30.0) -> None:
        """Every consumer has nothing pending and nothing unacknowledged (seen twice)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            states = self.consumers()
            drained = all(s["pending"] == 0 and s["ack_pending"] == 0 for s in states.values())
            seen = seen + 1 if drained else 0
            if seen == 2:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"consumers not drained within {timeout}s: {states}")
            time.sleep(0.2)

    def dead_letters(self) -> dict[str, dict[str, Any]]:
        """The DLQ messages a main consumer published, by their Nats-Msg-Id.

        Each is its decoded envelope (or {} when it is not JSON) with "_seq",
        "_subject" and "_headers".
        """

        out: dict[str, dict[str, Any]] = {}
        for seq, raw in self._stored():
            headers = dict(raw.headers or {})
            msg_id = headers.get("Nats-Msg-Id", "")
            if not msg_id.startswith("dlq-"):
                continue
            try:
                body = json.loads((raw.data or b"null").decode("utf-8", "replace"))
            except (ValueError, RecursionError):
                body = {}
            body = body if isinstance(body, dict) else {}
            out[msg_id] = {**body, "_seq": seq, "_subject": raw.subject, "_headers": headers}
        return out

    def exhausted_of(self, stream: str, seq: int) -> dict[str, Any] | None:
        """The exhausted row of a message: stored directly, or through the DLQ message
        a main consumer made of it (then with that message under "_dead_letter")."""
        rows = {(r["dlq_stream"], r["dlq_sequence"]): r for r in self.exhausted()}
        if (stream, seq) in rows:
            return rows[(stream, seq)]
        if stream == self.stream:
            return None
        dead = self.dead_letters().get(f"dlq-{stream}-{seq}")
        if dead is None or (self.stream, dead["_seq"]) not in rows:
            return None
        return {**rows[(self.stream, dead["_seq"])], "_dead_letter": dead}

    def ready(self) -> tuple[int, Any]:
        """GET /ready: the status and the decoded body."""
        url = f"http://127.0.0.1:{self.port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")
        except (OSError, ValueError) as exc:
            return 0, str(exc)

    def wait_ready(self, timeout: float = 10.0) -> None:
        """/ready answers 200 within `timeout` seconds, or fail with what it said last."""
        last: list[tuple[int, Any]] = []

        def ready() -> bool:
            last[:] = [self.ready()]
            return last[0][0] == 200

        try:
            wait_until(ready, timeout=timeout, interval=0.25)
        except AssertionError:
            raise AssertionError(f"/ready answers {last[0]} after {timeout}s") from None

    def repeats(self, msg: str, limit: int) -> dict[tuple[str, int], int]:
        """(subject, stream_seq) pairs logged with `msg` more than `limit` times."""
        seen = Counter(
            (str(e.get("subject")), int(e.get("stream_seq") or 0))
            for e in self.logs()
            if e.get("msg") == msg
        )
        return {k: n for k, n in seen.items() if n > limit}

    def find_containing(self, text: str) -> list[dict[str, Any]]:
        """Log entries whose message contains `text`."""
        return [e for e in self.logs() if text in str(e.get("msg", ""))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
