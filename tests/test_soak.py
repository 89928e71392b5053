"""A single-node chaos soak (issue 11): ~20,000 generated events through the whole
pipeline while worker processes are SIGKILLed every 2 s, the supervisor is
SIGKILLed twice, nats-server is SIGKILLed and restarted once and PostgreSQL is
stopped (immediate) and restarted once. Then: every valid event is a row, every
invalid one (and every orphan update) an exhausted row, nothing else.

Slow: run with `python3 dev.py test -- -m slow -k soak`. DLQPROC_SOAK_EVENTS sets
the number of events (default 20,000).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import fresh_database
from test_pipeline import main_settled

from dlqproc.embedded import NatsServer, PostgresServer
from support.expected import exhausted_ids, expected, publish_command, stored_ids
from support.service import PIPELINE_ENV, Service, wait_until

Make = Callable[..., Service]
EVENTS = int(os.environ.get("DLQPROC_SOAK_EVENTS", "20000"))
SEED, INVALID_RATE = 11, 0.02
KILL_EVERY = 2.0
RATE = 400  # events a second: 50 s of traffic for 20,000


class WorkerKiller:
    """SIGKILLs one worker process of the service every KILL_EVERY seconds."""

    def __init__(self, svc: Service) -> None:
        self.svc, self.kills = svc, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(KILL_EVERY):
            try:
                pids = self.svc.worker_pids()
            except (OSError, AssertionError, ValueError):
                continue  # the supervisor itself is down or restarting
            if pids:
                try:
                    os.kill(pids[self.kills % len(pids)], signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def durable_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server that writes every message to disk before acknowledging it.

    By default JetStream acknowledges a publish before its file store has
    written it, so a SIGKILLed nats-server loses the last acknowledged
    messages (and acknowledgements): a loss the server's own settings allow,
    not dlqproc's. Single-node deployments that must survive it run with
    sync_interval: always (or a cluster).
    """
    with NatsServer(tmp_path / "nats", config="jetstream { sync_interval: always }") as server:
        yield server


@pytest.fixture
def soak_pg(pg_home: Path) -> Iterator[PostgresServer]:
    # Durable commits: with synchronous_commit off (the test default, for
    # speed) an immediate stop loses the last transactions PostgreSQL had
    # already reported committed, and dlqproc had ACKed on that word.
    with PostgresServer(pg_home / "data", durable=True) as pg:
        yield pg


def publisher(svc: Service) -> subprocess.Popen[str]:
    return subprocess.Popen(
        # Paced, so that every fault lands while events are in flight.
        publish_command(svc.nats_url, EVENTS, SEED, INVALID_RATE, "--rate", str(RATE)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=svc.env,
    )


def kill_supervisor(svc: Service) -> None:
    svc.signal(signal.SIGKILL)
    svc.wait_exit(30)
    svc.start()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_soak_loses_nothing_and_invents_nothing(
    service: Make, durable_nats: NatsServer, soak_pg: PostgresServer
) -> None:
    started = time.monotonic()
    svc = service(
        nats_url=durable_nats.url,
        db=fresh_database(soak_pg),
        **{
            **PIPELINE_ENV,
            "LOG_LEVEL": "INFO",
            "NATS_DLQWORKERS": "2",
            "NATS_DLQBASEDELAYMINUTES": "0.005",
            "NATS_DLQMAXDELAYMINUTES": "0.01",
            # A SIGKILLed supervisor's messages come back after the ack wait.
            "NATS_DLQACKWAIT": "10s",
            "NATS_REALTIME_ACKWAIT": "10s",
            "NATS_HISTORICAL_ACKWAIT": "10s",
        },
    )
    pub = publisher(svc)
    with WorkerKiller(svc) as killer:
        time.sleep(5)  # the schedule: work flows for a while between faults
        kill_supervisor(svc)
        time.sleep(5)
        _pg_immediate(soak_pg)
        time.sleep(5)
        soak_pg.start()
        out, _ = pub.communicate(timeout=400)
        assert pub.returncode == 0, out
        assert f"acknowledged {EVENTS}," in out
        _nats_kill(durable_nats)
        time.sleep(5)
        kill_supervisor(svc)
        time.sleep(10)
    wait_until(
        lambda: main_settled(svc) and main_settled(svc, realtime=False) and svc.settled(),
        timeout=400,
        interval=1.0,
    )
    invalid, orphans, ids = expected(EVENTS, SEED, INVALID_RATE)
    exhausted = svc.exhausted()
    reasons = [r["reason"] for r in exhausted]
    got = stored_ids(svc.query, ids)
    # Faults cost deliveries (a batch in a killed worker, a redelivery after a
    # killed supervisor), so a valid event may spend its whole budget and be
    # exhausted: stored for an operator to replay, not lost.
    spent = exhausted_ids(r for r in exhausted if r["reason"] == "retries_exhausted")
    lost = {table: len(want - got[table] - spent[table]) for table, want in ids.items()}
    invented = {table: len(got[table] - want) for table, want in ids.items()}
    by_faults = {table: len((want - got[table]) & spent[table]) for table, want in ids.items()}
    print(
        f"soak: {EVENTS} events in {time.monotonic() - started:.0f}s;"
        f" {killer.kills} workers, 2 supervisors, 1 nats-server SIGKILLed, PostgreSQL stopped once;"
        f" rows {dict((t, len(g)) for t, g in got.items())}; exhausted {len(exhausted)}"
        f" (validation {reasons.count('validation')} of {invalid},"
        f" retries_exhausted {reasons.count('retries_exhausted')}: {orphans} orphan updates"
        f" and the rest budgets spent by the faults, holding {by_faults} rows);"
        f" lost {lost}; invented {invented}"
    )
    assert lost == dict.fromkeys(ids, 0) and invented == dict.fromkeys(ids, 0)
    assert reasons.count("validation") == invalid
    assert reasons.count("retries_exhausted") >= orphans
    assert set(reasons) <= {"validation", "retries_exhausted"}
    # No batch failed as a whole, and one outage is one line, not one per lane.
    assert svc.find("worker pool failed a batch") == []
    assert "process object is closed" not in svc.log_text()
    outages = len(svc.find("Postgres unavailable, pausing fetch"))
    resumed = len(svc.find("Postgres reachable again, resuming fetch"))
    print(f"soak: PostgreSQL outages seen {outages}, resumed {resumed}")
    # The outage hit work in flight (else it proved nothing), and was logged once.
    assert outages >= 1 and resumed <= outages


def _pg_immediate(pg: PostgresServer) -> None:
    """`pg_ctl stop -m immediate`: SIGQUIT to the postmaster, no checkpoint."""
    assert pg.pid is not None
    os.kill(pg.pid, signal.SIGQUIT)
    wait_until(lambda: pg._proc is not None and pg._proc.poll() is not None, timeout=30)
    pg.stop()  # reaps it and removes its socket directory


def _nats_kill(nats: NatsServer) -> None:
    assert nats.pid is not None
    os.kill(nats.pid, signal.SIGKILL)
    wait_until(lambda: nats._proc is not None and nats._proc.poll() is not None, timeout=30)
    nats.stop()
    nats.start()
