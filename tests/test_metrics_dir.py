"""The multiprocess metrics directory: folding dead processes, surviving torn files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
from pathlib import Path
from dlqproc.metrics import MetricsDir, Metrics
d = MetricsDir({path!r})
m = Metrics()
m.acks_success.labels("a").inc(3)
# A worker killed while creating its files leaves them empty or torn.
(d.path / "counter_999999.db").write_bytes(b"")
(d.path / "histogram_999998.db").write_bytes(b"\\0\\0")
body, _ = d.render(m.registry)
assert b'dlq_acks_success_total{{company_id="a"}} 3.0' in body, body
d.process_exited(999999)
d.process_exited(999998)
print(" ".join(sorted(p.name.split("_")[0] + ("_archive" if "archive" in p.name else "")
                      for p in d.path.glob("*.db"))))
"""


def test_torn_files_neither_fail_a_scrape_nor_survive_compaction(tmp_path: Path) -> None:
    # A fresh interpreter: multiprocess mode must be chosen before any metric exists.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(path=str(tmp_path / "m"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # The supervisor's own series live in its memory: only the archives remain.
    assert out.stdout.split() == ["counter_archive", "histogram_archive"]


OWNER = """
import sys, time
from dlqproc.metrics import MetricsDir
d = MetricsDir("")
print(d.path, flush=True)
time.sleep(120)
"""

CLEANUP = """
import sys
from pathlib import Path
from dlqproc.metrics import MetricsDir
d = MetricsDir("")
print(d.path)
"""


def test_a_start_removes_only_its_own_kind_left_by_dead_replicas(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def owner() -> tuple[subprocess.Popen[str], Path]:
        proc = subprocess.Popen(
            [sys.executable, "-c", OWNER], env=env, stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        return proc, Path(proc.stdout.readline().strip())

    killed, killed_dir = owner()
    running, running_dir = owner()
    try:
        killed.kill()  # SIGKILL: its directory stays behind
        killed.wait(10)
        assert killed_dir.is_dir() and running_dir.is_dir()
        # Not ours to judge: another user's naming, or a name without a pid.
        foreign = [tmp_path / "dlqproc-metrics-abcdef", tmp_path / "someone-else"]
        for path in foreign:
            path.mkdir()
        out = subprocess.run(
            [sys.executable, "-c", CLEANUP], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert not killed_dir.exists()
        assert running_dir.is_dir() and all(p.is_dir() for p in foreign)
        # That process exited without MetricsDir.close(): the next start removes it.
        leftover = Path(out.stdout.strip())
        assert leftover.is_dir()
        subprocess.run([sys.executable, "-c", CLEANUP], env=env, check=True, timeout=60)
        assert not leftover.exists() and running_dir.is_dir()
    finally:
        running.kill()
        running.wait(10)
