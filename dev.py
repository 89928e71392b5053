#!/usr/bin/env python3
"""Developer entry point that needs nothing but Python 3.11+.

    python3 dev.py demo   # dlqproc on an embedded NATS + Postgres, sample workload
    python3 dev.py test   # lint, type-check and the whole test suite
    python3 dev.py run -- <dlqproc args>

Creates .venv/ and installs the project with its test extras on first use (and
again whenever pyproject.toml changes).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
STAMP = VENV / ".dlqproc-installed"


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs under any python3
        sys.exit("dlqproc needs Python 3.11 or newer")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing dlqproc and its test dependencies into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(want)


def run(*cmd: str) -> int:
    child = subprocess.Popen(list(cmd), cwd=ROOT)
    # Ctrl-C reaches the child too (the terminal signals the whole foreground
    # group), and the child decides what it means: dev.py waits for it to stop
    # rather than dying with a traceback and leaving it behind. Ignored only
    # now: a child started with SIGINT ignored would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "help"
    if command not in {"demo", "test", "run"}:
        print(__doc__)
        return 0 if command == "help" else 2
    ensure_env()
    rest = argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if command == "demo":
        return run(str(BIN / "dlqproc"), "demo", *rest)
    if command == "run":
        return run(str(BIN / "dlqproc"), *rest)
    for step in (
        [str(BIN / "ruff"), "check", "."],
        [str(BIN / "ruff"), "format", "--check", "."],
        [str(BIN / "mypy"), "--strict", "dlqproc", "bench"],
    ):
        if code := run(*step):
            print(f"failed: {' '.join(step)}", file=sys.stderr)
            return code
    return run(str(BIN / "pytest"), *rest)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
