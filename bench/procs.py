"""Child processes of a benchmark run (the service, baseline (a)) and /proc readings."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_LINE = "Starting DLQ worker..."


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its ")".
    return stat[stat.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds; None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def reaped_children_cpu(pid: int) -> float:
    """cutime + cstime: CPU of the children `pid` has already waited for (dead workers)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / CLK_TCK  # fields 16 and 17 of stat(5)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set size) of a process in MB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU of a process, its live children and the children it reaped.

    For the embedded PostgreSQL's postmaster: every backend and auxiliary
    process is its child. None when the process is gone.
    """
    own = cpu_seconds(pid)
    if own is None:
        return None
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    live = sum(cpu_seconds(int(c)) or 0.0 for c in children)
    return own + reaped_children_cpu(pid) + live


def worker_pids(pid: int) -> list[int]:
    """Children of `pid` except multiprocessing's resource tracker."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(p) for p in children if b"resource_tracker" not in _cmdline(int(p))]


class Child:
    """One child process whose output goes to a log file, watched for a ready line.

    A reader thread copies its output to `log_path` and notes (monotonic time)
    when `ready_line` first appears, so the start of the measured window does
    not depend on a polling interval.
    """

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, ready_line: str
    ) -> None:
        self.argv, self.env, self.log_path, self.ready_line = argv, env, log_path, ready_line
        self.ready_at: float | None = None
        # CPU seconds of the process and of its workers when the ready line came.
        self.ready_cpu: tuple[float, float] = (0.0, 0.0)
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Child:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        needle = self.ready_line.encode()
        with open(self.log_path, "ab") as log:
            for line in self.proc.stdout:
                if self.ready_at is None and needle in line:
                    self.ready_at = time.monotonic()
                    self.ready_cpu = self.cpu()
                    self._ready.set()
                log.write(line)
        self._ready.set()  # the process ended: stop any wait

    def wait_ready(self, timeout: float) -> float:
        """Block until the ready line (its monotonic time); raise if it never comes."""
        self._ready.wait(timeout)
        if self.ready_at is None:
            raise RuntimeError(
                f"{self.argv[2:4]} not ready within {timeout:g}s"
                f" (exit code {self.poll()}); log tail:\n{self.log_tail()}"
            )
        return self.ready_at

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the process, CPU seconds of its worker children).

        Workers replaced during the run count too: the CPU of a reaped child
        accrues to its parent's cutime/cstime.
        """
        own = cpu_seconds(self.pid) or 0.0
        live = sum(cpu_seconds(p) or 0.0 for p in worker_pids(self.pid))
        return own, live + reaped_children_cpu(self.pid)

    def rss(self) -> tuple[float, list[float]]:
        """(peak RSS of the process, peak RSS of each worker child), in MB."""
        workers = [peak_rss_mb(p) for p in worker_pids(self.pid)]
        return peak_rss_mb(self.pid) or 0.0, [w for w in workers if w is not None]

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 3000) -> str:
        return self.log_text()[-n:]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait at most `timeout`, then SIGKILL (and its workers). Idempotent."""
        if self.proc is None:
            return None
        workers = worker_pids(self.proc.pid)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        for pid in workers:  # normally already gone with their supervisor
            if b"multiprocessing" in _cmdline(pid):  # still our worker, not a reused pid
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(5)
        return self.proc.returncode


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]
