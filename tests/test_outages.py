"""Outages of PostgreSQL and stalls of the flow: nothing is lost when PostgreSQL is
down across JetStream's max deliver and restarts, and /ready turns 503 for a lane
that cannot fetch and for a commit failure that repeats. Real nats-server, real
PostgreSQL, the real service."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import nats
from conftest import fresh_database

from dlqproc.embedded import PostgresServer
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


def ready(svc: Service) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{svc.port}/ready", timeout=10) as resp:
            return resp.status, []
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["problems"]


def problem(svc: Service, prefix: str) -> str | None:
    status, problems = ready(svc)
    return next((p for p in problems if p.startswith(prefix)), None) if status == 503 else None


def delivered(svc: Service) -> int:
    """Deliveries the DLQ consumer has made so far, redeliveries included."""

    async def go() -> int:
        nc = await nats.connect(svc.nats_url, connect_timeout=5)
        try:
            info = await nc.jetstream().consumer_info(svc.stream, svc.durable)
            return int(info.delivered.consumer_seq or 0)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_postgres_down_past_max_deliver_and_two_restarts_loses_nothing(
    service: Make, pg_home: Path
) -> None:
    # JetStream's max deliver is the guide's 2; each round the messages reach
    # a worker, PostgreSQL goes away before their rows commit, and the service
    # is restarted. Before dlqproc gave its DLQ consumer unlimited redelivery,
    # the second round was the last: JetStream abandoned them.
    with PostgresServer(pg_home / "data") as pg:
        db = fresh_database(pg)
        env = {"NATS_DLQMAXRETRIES": "1", "NATS_DLQMAXDELIVER": "2", "NATS_DLQTASKTIMEOUT": "9s"}
        svc = service(db=db, **env)
        same = {"NATS_DLQSTREAM": svc.stream, "NATS_DLQSUBJECT": svc.subject}
        ids = [f"s{i}" for i in range(3)]
        svc.publish("acme", [envelope("t.slow", "acme", {"id": i, "sleep": 2}) for i in ids])
        for round_ in range(1, 4):
            # All three handed to the service in this round: one worker sleeps
            # through them (6 s), time enough to take PostgreSQL away.
            now = svc
            wait_until(lambda: delivered(now) >= 3 * round_, timeout=30)  # noqa: B023
            pg.stop()
            wait_until(lambda: now.find("Postgres unavailable, pausing fetch"), timeout=30)  # noqa: B023
            wait_until(lambda: len(now.find("Retrying DLQ message with backoff")) == 3)  # noqa: B023
            assert svc.stop() == 0
            pg.start()
            svc = service(db=db, **same, **env)
        wait_until(lambda: len(svc.rows("acme")) == 3, timeout=60)
        # Stored on the fourth delivery or later: past the guide's max deliver.
        attempts = svc.rows("acme")
        assert sorted(attempts) == ids and min(attempts.values()) >= 4, attempts
        wait_until(svc.settled, timeout=15)
        assert svc.exhausted() == []
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
