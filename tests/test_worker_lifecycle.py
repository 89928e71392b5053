"""Worker processes that die at awkward moments: while starting, while idle,
or orphaned by a supervisor killed with SIGKILL."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Callable
from pathlib import Path

from support.service import TESTS_DIR, Service, envelope, wait_until

Make = Callable[..., Service]
SLOW_START = {"HANDLERS_MODULE": "support.slow_start_handlers", "TEST_WORKER_START_SECONDS": "1.5"}


def restarts(svc: Service, reason: str = "crash") -> float:
    """dlq_worker_restarts_total{reason} as /metrics shows it (0 before the first)."""
    url = f"http://127.0.0.1:{svc.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf'^dlq_worker_restarts_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def spawned(pid: int) -> bool:
    """A worker that has exec'd: between fork and exec a child still shows the
    supervisor's command line, and may yet be the resource tracker."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_worker_killed_while_starting_is_retried_not_fatal(service: Make) -> None:
    svc = service(
        start=False, NATS_DLQWORKERS="1", **{**SLOW_START, "TEST_WORKER_START_SECONDS": "3"}
    )
    svc.start(wait=False)
    killed: set[int] = set()

    def kill_a_starting_worker() -> bool:
        assert svc.proc is not None and svc.proc.poll() is None, svc.log_text()
        fresh = [p for p in svc.worker_pids() if p not in killed and not gone(p) and spawned(p)]
        for pid in fresh:  # still inside its 1.5 s import: it has not said hello
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        return bool(fresh)

    for _ in range(4):
        wait_until(kill_a_starting_worker, timeout=30, interval=0.05)
    # Four deaths by a signal are not "the handlers do not load": it starts.
    wait_until(lambda: svc.find("Starting DLQ worker..."), timeout=60)
    assert svc.proc is not None and svc.proc.poll() is None
    svc.publish("acme", [envelope("t.ok", "acme", {"id": "a"})])
    wait_until(lambda: svc.rows("acme"), timeout=30)
    assert svc.rows("acme") == {"a": 1}
    assert len(svc.find("worker died while starting, trying again")) == 4
    assert restarts(svc) == 4
    svc.wait_ready(10)


def test_ready_counts_a_replacement_only_once_it_has_started(service: Make) -> None:
    svc = service(**SLOW_START)
    svc.wait_ready(10)
    os.kill(svc.worker_pids()[0], signal.SIGKILL)
    # The replacement spends 1.5 s loading its handlers: not yet at strength.

    def short_of_a_worker() -> bool:
        status, body = svc.ready()
        return status == 503 and "workers: 1 of 2 running" in body["problems"]

    wait_until(short_of_a_worker, timeout=10, interval=0.05)
    svc.wait_ready(15)
    assert restarts(svc) == 1


def test_a_worker_orphaned_while_starting_exits_without_a_traceback(
    service: Make, tmp_path: Path
) -> None:
    loading = tmp_path / "loading"
    loading.mkdir()
    svc = service(
        start=False,
        **{**SLOW_START, "TEST_WORKER_START_SECONDS": "2", "TEST_WORKER_LOADING_DIR": str(loading)},
    )
    svc.start(wait=False)
    # Past the spawn hand-over (killed before it, a child dies in multiprocessing's
    # own bootstrap, before any dlqproc code runs) and loading their handlers.
    wait_until(lambda: len(list(loading.iterdir())) == 2, timeout=30)
    pids = svc.worker_pids()
    svc.signal(signal.SIGKILL)  # while both workers still load their handlers
    svc.wait_exit(10)
    # They say hello to nobody, find the socket closed and leave quietly.
    wait_until(lambda: all(gone(p) for p in pids), timeout=30)
    assert "Traceback" not in svc.log_text(), svc.log_text()


# A worker that dies in the few loop turns during which the event loop's
# transport has taken its socket's descriptor but not yet the socket: closing
# the socket then closed the descriptor twice (once here, once by libuv), and
# libuv aborted the supervisor (SIGABRT in uv__io_poll) when it next touched it.
_CLOSE_WHILE_OPENING = textwrap.dedent(
    """
    import asyncio, multiprocessing, sys, uvloop
    from dlqproc.pool import _Worker
    from dlqproc.reprocess import Limits

    async def main():
        ctx = multiprocessing.get_context("spawn")
        for turns in range(8):  # every moment of the hand-over, one per worker
            w = _Worker(ctx, 0, "support.handlers", Limits("v1.dlq", 1 << 20), print)
            for _ in range(turns):
                await asyncio.sleep(0)
            w.process.kill()
            w.closing = True
            await w.close(timeout=5)
            for _ in range(10):
                await asyncio.sleep(0)
            await asyncio.sleep(0.05)
            print("closed at turn", turns, flush=True)

    uvloop.run(main())
    """
)


def test_a_worker_closed_while_its_socket_is_handed_to_the_loop_does_not_abort() -> None:
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _CLOSE_WHILE_OPENING],
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("closed at turn") == 8
