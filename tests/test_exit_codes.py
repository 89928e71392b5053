"""Every exit code the README documents, by starting `dlqproc run` into each case.

Covered elsewhere, with more to check than the code: PostgreSQL unreachable or
refusing the password (test_secrets), NATS refusing the credentials
(test_secrets), the topology on a cluster that never forms (test_cluster, slow),
handlers that do not load in the workers (test_service), a second signal
(test_service), bad configuration (test_cli).

A stop (SIGTERM) while start-up still waits is exit 0, like any stop: the
cases below stop it while it waits for PostgreSQL, for NATS and for its
workers. The demo's embedded servers are tested the same way in test_demo.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.js import api

from dlqproc.embedded import NatsServer, free_port
from support.service import Service, envelope, wait_until

Make = Callable[..., Service]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another process (this one) already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def exit_code(svc: Service) -> int:
    svc.start(wait=False)
    return svc.wait_exit(60)


def test_postgres_unreachable_exits_1(service: Make, closed_port: int) -> None:
    svc = service(start=False, db=f"postgresql://postgres@127.0.0.1:{closed_port}/postgres")
    assert exit_code(svc) == 1, svc.log_text()
    [line] = svc.find("cannot start: Postgres unavailable")
    assert line["error"]
    assert not svc.find("Starting DLQ worker...")


def test_nats_unreachable_exits_1_after_the_startup_timeout(
    service: Make, closed_port: int
) -> None:
    svc = service(start=False, nats_url=f"nats://127.0.0.1:{closed_port}", NATS_STARTUPTIMEOUT="1s")
    assert exit_code(svc) == 1, svc.log_text()
    [line] = svc.find("cannot start: NATS unavailable")
    assert line["error"]
    # PostgreSQL came first, and was reached.
    assert svc.find("connecting")
    assert not svc.find("cannot start: Postgres unavailable")


def test_a_topology_jetstream_refuses_exits_1(service: Make, nats_server: NatsServer) -> None:
    svc = service(start=False, NATS_STARTUPTIMEOUT="1s")

    async def squat() -> None:
        # Another stream already binds the DLQ subjects: JetStream refuses
        # dlqproc's stream (subjects overlap), however often it is asked.
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().add_stream(
                api.StreamConfig(name=f"squatter_{svc.stream}", subjects=[f"{svc.subject}.>"])
            )
        finally:
            await nc.close()

    asyncio.run(squat())
    assert exit_code(svc) == 1, svc.log_text()
    [line] = svc.find("cannot start: NATS topology")
    assert float(line["gave_up_after"]) == 1.0 and "overlap" in line["error"], line
    assert svc.find("NATS topology not ready, retrying")


def test_health_port_taken_exits_1_before_touching_a_dependency(
    service: Make, taken_port: int
) -> None:
    svc = service(start=False, SERVER_PORT=str(taken_port))
    assert exit_code(svc) == 1, svc.log_text()
    [line] = svc.find("cannot start: health port")
    assert line["port"] == taken_port and line["error"]
    assert not svc.find("connecting")


def test_handlers_that_do_not_load_in_the_supervisor_exit_3(service: Make) -> None:
    svc = service(start=False, HANDLERS_MODULE="support.no_such_handlers")
    assert exit_code(svc) == 3, svc.log_text()
    [line] = svc.find("cannot start: handlers do not load")
    assert "support.no_such_handlers" in line["error"]
    # Found before anything was started: no health port, no connection.
    assert not svc.find("health server listening") and not svc.find("connecting")


def test_a_worker_that_cannot_be_replaced_exits_3(service: Make, tmp_path: Path) -> None:
    gone = tmp_path / "handlers-gone"
    svc = service(
        HANDLERS_MODULE="support.lifecycle_handlers",
        TEST_HANDLERS_GONE=str(gone),
        NATS_DLQWORKERS="1",
    )
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "before"})])
    wait_until(lambda: svc.rows("acme") == {"before": 1}, timeout=30)
    # From now on a worker cannot load the handlers; the running one still can work.
    gone.touch()
    [pid] = svc.worker_pids()
    os.kill(pid, signal.SIGKILL)
    assert svc.wait_exit(60) == 3, svc.log_text()
    assert svc.find("worker could not be replaced")
    assert svc.find("worker processes cannot be replaced, stopping")
    assert svc.find("stopped", exit_code=3)


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _children(pid: int) -> list[int]:
    """Every process started by `pid` (workers and the resource tracker alike)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("waiting_for", ["postgres", "nats", "worker pool"])
def test_sigterm_during_startup_stops_at_once_and_leaves_nothing(
    service: Make, closed_port: int, tmp_path: Path, waiting_for: str
) -> None:
    # Its own temp dir: the private metrics directory must be gone afterwards.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    loading = tmp_path / "loading"
    loading.mkdir()
    settings: dict[str, str] = {
        "TMPDIR": str(tmp),
        # Far beyond the bounded waits below: only the signal can end start-up.
        "POSTGRES_STARTUPTIMEOUT": "120s",
        "NATS_STARTUPTIMEOUT": "120s",
    }
    unreachable = f"127.0.0.1:{closed_port}"
    waiting: Callable[[], object]
    if waiting_for == "postgres":
        svc = service(start=False, db=f"postgresql://postgres@{unreachable}/postgres", **settings)
        waiting = functools.partial(svc.find, "Postgres not reachable yet, retrying")
    elif waiting_for == "nats":
        svc = service(start=False, nats_url=f"nats://{unreachable}", **settings)
        waiting = functools.partial(svc.find, "NATS not reachable yet, retrying")
    else:
        svc = service(
            start=False,
            HANDLERS_MODULE="support.slow_start_handlers",
            TEST_WORKER_START_SECONDS="120",
            TEST_WORKER_LOADING_DIR=str(loading),
            **settings,
        )

        # Both workers past the spawn hand-over, loading their handlers.
        def waiting() -> bool:
            return len(list(loading.iterdir())) == 2

    svc.start(wait=False)
    proc = svc.proc
    assert proc is not None
    wait_until(lambda: waiting() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, svc.log_text()
    assert [p.name for p in tmp.iterdir()] != [], "no metrics directory to remove"
    children = _children(proc.pid)
    assert waiting_for != "worker pool" or len(children) >= 2, children

    svc.signal(signal.SIGTERM)
    # Not the start-up timeouts (120 s), nor a worker's 120 s import: the pool
    # gives a worker 5 s to leave before it kills it.
    assert svc.wait_exit(30) == 0, svc.log_text()
    [line] = svc.find("stopped during start-up")
    assert line["exit_code"] == 0 and line["step"] == waiting_for, line
    assert not svc.find("Starting DLQ worker...") and not svc.find("stopped")
    assert "Traceback" not in svc.log_text(), svc.log_text()
    assert list(tmp.iterdir()) == []
    wait_until(lambda: all(_gone(p) for p in children), timeout=10)
