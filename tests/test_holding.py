"""What the flow keeps, and what /ready says about it: held messages are bounded in
count, bytes and time; a lane that cannot fetch and a commit failure that repeats
turn /ready to 503. Real nats-server, real PostgreSQL, the real service."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from conftest import fresh_database

from dlqproc.embedded import PostgresServer
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]

# Exhaust at the first delivery, which is also JetStream's second-to-last: a
# write that fails for lack of PostgreSQL is then held, not NAKed.
HOLD_AT_ONCE = {
    "NATS_DLQMAXRETRIES": "1",
    "NATS_DLQMAXDELIVER": "2",
    "SERVER_READYSTALLAFTER": "1s",
}


def ready(svc: Service) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/ready", timeout=10) as resp:
            return resp.status, []
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["problems"]


def problem(svc: Service, prefix: str) -> str | None:
    status, problems = ready(svc)
    return next((p for p in problems if p.startswith(prefix)), None) if status == 503 else None


def held_gauge(svc: Service) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("dlq_messages_held "):
                return float(line.split()[1])
    raise AssertionError("dlq_messages_held not exposed")


def test_held_messages_are_bounded_in_count_and_written_when_postgres_returns(
    service: Make, pg_home: Path
) -> None:
    with PostgresServer(pg_home / "data") as pg:
        svc = service(db=fresh_database(pg), NATS_DLQMAXHELD="1", **HOLD_AT_ONCE)
        pg.stop()
        svc.publish("acme", [envelope("t.perm", "acme", {"id": "held"})])
        wait_until(lambda: svc.find("store unavailable on the last delivery, holding the message"))
        # The park is full: the next one is handed back, loudly, with its sequence.
        [seq] = svc.publish("acme", [envelope("t.perm", "acme", {"id": "overflow"})])
        [gave_up] = wait_until(
            lambda: svc.find("cannot hold the message any longer; NAKed back to JetStream")
        )
        assert gave_up["stream_seq"] == seq and "dlqMaxHeld" in gave_up["why"]
        assert wait_until(lambda: problem(svc, "held: 1 messages held"), timeout=10)
        assert held_gauge(svc) == 1
        pg.start()
        wait_until(lambda: svc.exhausted(), timeout=30)
        [row] = svc.exhausted()
        assert row["original_payload"] == {"id": "held"}
        wait_until(lambda: ready(svc)[0] == 200, timeout=15)
        assert held_gauge(svc) == 0
        # Held once, written once: no line repeats for it.
        assert len(svc.find("store unavailable on the last delivery, holding the message")) == 1
        assert svc.stop() == 0


def test_held_messages_are_bounded_in_time(service: Make, pg_home: Path) -> None:
    with PostgresServer(pg_home / "data") as pg:
        svc = service(db=fresh_database(pg), NATS_DLQMAXHOLDTIME="2s", **HOLD_AT_ONCE)
        pg.stop()
        [seq] = svc.publish("acme", [envelope("t.perm", "acme", {"id": "held"})])
        wait_until(lambda: svc.find("store unavailable on the last delivery, holding the message"))
        [gave_up] = wait_until(
            lambda: svc.find("cannot hold the message any longer; NAKed back to JetStream"),
            timeout=15,
        )
        assert gave_up["stream_seq"] == seq and "dlqMaxHoldTime" in gave_up["why"]
        assert held_gauge(svc) == 0
        # Handed back, still in the stream; JetStream's one delivery left
        # stores it once PostgreSQL is back.
        assert svc.stream_messages() == 1
        pg.start()
        wait_until(svc.exhausted, timeout=30)
        wait_until(svc.settled, timeout=15)
        assert svc.stop() == 0


def test_ready_reports_a_lane_that_cannot_fetch(service: Make) -> None:
    # One message in flight at most, and it hangs until the worker is killed
    # (dlqTaskTimeout): meanwhile the lane has work pending and cannot fetch.
    svc = service(NATS_DLQMAXINFLIGHT="1", NATS_DLQTASKTIMEOUT="8s", SERVER_READYSTALLAFTER="2s")
    svc.publish("acme", [envelope("t.hang", "acme", {"id": "h", "hang_times": 1})])
    wait_until(lambda: svc.consumer()["ack_pending"] == 1)
    svc.publish("acme", [envelope("t.ok", "acme", {"id": f"ok{i}"}) for i in range(3)])
    stalled = wait_until(lambda: problem(svc, "fetch: dlq has not fetched"), timeout=10)
    assert "3 messages pending" in stalled or "4 messages pending" in stalled
    wait_until(lambda: len(svc.rows("acme")) == 4, timeout=60)
    wait_until(lambda: ready(svc)[0] == 200, timeout=15)
    assert svc.stop() == 0


def test_ready_reports_a_commit_failure_that_repeats(service: Make) -> None:
    svc = service(NATS_DLQMAXRETRIES="5", NATS_DLQMAXDELIVER="20", NATS_DLQMAXDELAYMINUTES="0.005")
    # A deferred constraint fails at COMMIT, on a live connection: not the
    # item's data, not an outage. Every commit of an exhausted row fails alike.
    svc.execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused at commit'; END $$;"
        " CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON exhausted_events"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse()"
    )
    svc.publish("acme", [envelope("t.perm", "acme", {"id": "p"})])
    found = wait_until(lambda: problem(svc, "commit: the same failure"), timeout=30)
    assert "refused at commit" in found
    svc.execute("DROP TRIGGER refuse ON exhausted_events")
    wait_until(svc.exhausted, timeout=30)
    wait_until(svc.settled, timeout=15)
    wait_until(lambda: ready(svc)[0] == 200, timeout=15)
    assert svc.stop() == 0
