"""The multiprocess metrics directory: folding dead processes, surviving torn files."""

from __future__ import annotations

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
