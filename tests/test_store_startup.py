"""Start-up beside a PostgreSQL that is not up yet: `dlqproc run` retries it for
postgres.startupTimeout instead of exiting at once (a crash loop in a container)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlqproc.embedded import NatsServer, PostgresServer, free_port
from support.service import Service, envelope, wait_until

RETRY = "Postgres not reachable yet, retrying"
PASSWORD = "startup-Secret-0f3a"


def test_run_waits_for_a_postgres_that_starts_after_it(
    nats_server: NatsServer, pg_home: Path, tmp_path: Path
) -> None:
    port = free_port()
    # The embedded server trusts every login, so the password is never asked
    # for; it is there to show it reaches no log line.
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"
    svc = Service(nats_server.url, dsn, tmp_path, POSTGRES_STARTUPTIMEOUT="120s")
    try:
        svc.start(wait=False)
        # Retrying before the database exists at all, and still alive.
        wait_until(lambda: len(svc.find(RETRY)) >= 2 or svc.proc.poll() is not None, 60)  # type: ignore[union-attr]
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_text()
        with PostgresServer(pg_home / "data", port=port):
            wait_until(lambda: svc.find("Starting DLQ worker...") or svc._exited(), 90)
            assert svc.proc.poll() is None, svc.log_text()
            assert svc.find("applied migrations")
            svc.wait_ready(30)
            svc.publish("acme", [envelope("t.ok", "acme", {"id": "m1"})])
            wait_until(lambda: svc.rows("acme") == {"m1": 1}, 30)
            assert svc.stop() == 0
    finally:
        svc.stop()
    retries = svc.find(RETRY)
    assert all(r["error"].startswith("cannot connect to Postgres") for r in retries), retries
    delays = [r["retry_in"] for r in retries]
    # Doubling from 0.1 s, capped at 2 s (how far it got depends on the server's start).
    expected = [round(min(0.1 * 2**i, 2.0), 6) for i in range(len(delays))]
    assert len(delays) >= 2 and [round(d, 6) for d in delays] == expected, delays
    assert svc.find("cannot start: Postgres unavailable") == []
    assert PASSWORD not in svc.log_text()


@pytest.mark.parametrize("auto_migrate", ["true", "false"])
def test_run_gives_up_after_the_startup_timeout(
    auto_migrate: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/postgres"
    svc = Service(
        nats_server.url,
        dsn,
        tmp_path,
        POSTGRES_STARTUPTIMEOUT="1500ms",
        POSTGRES_AUTOMIGRATE=auto_migrate,
    )
    try:
        assert svc.start(wait=False).wait_exit(60) == 1
    finally:
        svc.stop()
    assert len(svc.find(RETRY)) >= 3, svc.log_text()
    [line] = svc.find("cannot start: Postgres unavailable")
    assert float(line["gave_up_after"]) == 1.5
    assert line["error"].startswith("cannot connect to Postgres"), line
    assert svc.find("Starting DLQ worker...") == []
    assert PASSWORD not in svc.log_text()
