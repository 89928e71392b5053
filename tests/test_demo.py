"""`python3 dev.py demo` as a new user meets it: Ctrl-C in a terminal, and a second run.

A terminal's Ctrl-C is SIGINT to the whole foreground process group: dev.py,
the demo and its worker processes alike. The demo is started here in a session
of its own and signalled with os.killpg, as the terminal would.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVING = "serving; Ctrl-C stops"


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, and zombies too: both count as left."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def _processes_using(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


class Demo:
    """`python3 dev.py demo` in a new session, its stdout read line by line."""

    def __init__(self, state: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "dev.py"), "demo", "--state", str(state), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(text in line for line in self.lines):
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, (text, "".join(self.lines))
                self._seen.wait(min(left, 1.0))

    def finish(self, timeout: float) -> tuple[int, str, str]:
        _, err = self.proc.communicate(timeout=timeout)
        self._reader.join(10)
        return self.proc.returncode, "".join(self.lines), err


def _ctrl_c_and_check(demo: Demo, state: Path) -> str:
    """SIGINT to the demo's process group; what it printed on stdout."""
    os.killpg(demo.proc.pid, signal.SIGINT)
    code, out, err = demo.finish(timeout=120)
    assert code == 0, (code, err)
    # One line, no traceback, from any process of the group.
    assert err.count("\n") == 1 and err.startswith("demo stopped"), err
    deadline = time.monotonic() + 10
    while _session_members(demo.proc.pid) or _processes_using(state):
        assert time.monotonic() < deadline, (
            _session_members(demo.proc.pid),
            _processes_using(state),
        )
        time.sleep(0.1)
    return out


def _exhausted_by_reason(out: str) -> dict[str, int]:
    section = out.split("exhausted_events of this run by reason")[1].split("\n\n")[0]
    return {m[2]: int(m[1]) for m in re.finditer(r"^\s+(\d+)\s+(\w+)$", section, re.M)}


@pytest.mark.slow
def test_ctrl_c_while_settling_stops_everything_with_one_line(pg_home: Path) -> None:
    state = pg_home / "demo"
    demo = Demo(state, "--messages", "2000")
    demo.wait_for("waiting until every event is settled", timeout=180)
    _ctrl_c_and_check(demo, state)


@pytest.mark.slow
def test_ctrl_c_when_serving_and_a_second_run_reports_its_own_work(pg_home: Path) -> None:
    state = pg_home / "demo"
    first = Demo(state, "--messages", "200")
    first.wait_for(SERVING, timeout=240)
    out1 = _ctrl_c_and_check(first, state)
    second = Demo(state, "--messages", "200")
    second.wait_for(SERVING, timeout=240)
    out2 = _ctrl_c_and_check(second, state)

    # The second run counts only its own rows and dead letters (the same seeded
    # events may dedupe or now find their rows) and says what earlier runs left.
    assert "earlier runs" not in out1
    earlier = sum(_exhausted_by_reason(out1).values())
    assert earlier > 0
    assert f"earlier runs in this state folder left {earlier} more" in out2
    for out in (out1, out2):
        assert int(out.split("main consumers in this run: ")[1].split()[0]) >= 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_servers_start_stops_them_and_exits_0(
    pg_home: Path, sig: signal.Signals
) -> None:
    # `dlqproc demo` itself, signalled alone (as a pod's SIGTERM, or kill -INT):
    # the embedded servers run in sessions of their own, and are its to stop.
    state = pg_home / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlqproc", "demo", "--state", str(state)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # A fresh state folder: nats-server is up and initdb runs (for seconds).
        def servers() -> list[int]:
            pids = _processes_using(state)
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in pids]
            starting = any(b"initdb" in c for c in cmdlines)
            return pids if starting and any(b"nats-server" in c for c in cmdlines) else []

        deadline = time.monotonic() + 120
        while not (pids := _quietly(servers)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (out, err)
    assert "Postgres postgresql://" not in out, out  # stopped before the service ran
    assert err == "demo stopped: dlqproc, nats-server and PostgreSQL are down\n", err
    # Every server process it started has exited; nothing uses the state folder.
    deadline = time.monotonic() + 10
    while left := [p for p in pids if Path(f"/proc/{p}").exists()] + _processes_using(state):
        assert time.monotonic() < deadline, left
        time.sleep(0.05)
    # The half-made cluster is gone: the next run makes a whole one.
    assert not (state / "postgres" / "pgdata").exists()


def _quietly(find: Callable[[], list[int]]) -> list[int]:
    """`find`, or nothing when a process it looked at exited meanwhile."""
    try:
        return find()
    except OSError:
        return []
