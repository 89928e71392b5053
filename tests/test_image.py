"""The container image, built here and run as a container would run it (slow).

There is no Docker engine: buildah builds the real Dockerfile (--isolation
chroot) on the local Debian base deploy/base-image.sh makes, kept between runs
in buildah's storage (CI starts clean and makes it, ~4 min).

Running it: the image's rootfs (`buildah mount` of a container from the image)
is bind-mounted read-only on a fresh mount point inside new mount and PID
namespaces (`unshare --mount --pid --fork`), with the writable paths the
manifests provide (a tmpfs on /tmp, the emptyDir of deploy/k8s) and /proc, /dev;
then chroot as the image's USER runs the image's ENTRYPOINT + CMD with the
image's ENV only. That is what a container runtime does with
readOnlyRootFilesystem, minus cgroups and a network namespace (the servers
are on the host's loopback): the same files, the same uid, the same PID 1
(tini), nothing writable but /tmp. buildah run cannot make the root read-only
and its chroot isolation has no PID namespace, hence this.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dlqproc.embedded import NatsServer, free_port
from support.service import Service, envelope, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BASE = "localhost/dlqproc-base:bookworm"
IMAGE = "localhost/dlqproc:test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (.ci/run installs it)")
        pytest.skip(f"{name} is not installed (apt-get install buildah debootstrap)")
    return path


def _buildah(*args: str, timeout: float = 120) -> str:
    out = subprocess.run([_tool("buildah"), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    _tool("buildah")
    _tool("debootstrap")
    exists = subprocess.run([_tool("buildah"), "inspect", BASE], capture_output=True)
    if exists.returncode != 0:
        made = subprocess.run(
            [str(ROOT / "deploy" / "base-image.sh"), BASE],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    build = [
        "bud",
        "--isolation",
        "chroot",
        "--layers",
        "--build-arg",
        f"BASE={BASE}",
        "-t",
        IMAGE,
    ]
    if HOST_CA.is_file():
        # pip in the build trusts what this machine trusts (a proxy's CA included).
        build += ["-v", f"{HOST_CA}:/etc/ssl/certs/ca-certificates.crt:ro"]
    _buildah(*build, str(ROOT), timeout=1200)
    return IMAGE


class Rootfs:
    """The image's rootfs, mounted; its config (entrypoint, cmd, env, user)."""

    def __init__(self, image: str) -> None:
        self.ctr = _buildah(
            "from", "--pull-never", "--name", f"dlqproc-t-{uuid.uuid4().hex[:8]}", image
        )
        self.path = Path(_buildah("mount", self.ctr))
        config = json.loads(_buildah("inspect", "--type", "image", image))["OCIv1"]["config"]
        self.entrypoint: list[str] = config["Entrypoint"]
        self.cmd: list[str] = config.get("Cmd") or []
        self.env: list[str] = config.get("Env") or []
        self.user: str = config["User"]

    def close(self) -> None:
        _buildah("umount", self.ctr)
        _buildah("rm", self.ctr)

    def popen(
        self,
        args: list[str] | None,
        env: dict[str, str],
        entrypoint: list[str] | None = None,
        **kw: Any,
    ) -> subprocess.Popen[str]:
        """The image's entrypoint with `args` (default its CMD) as a read-only container."""
        where = Path(f"/tmp/dlqproc-ro-{uuid.uuid4().hex[:8]}")
        where.mkdir()
        first = self.entrypoint if entrypoint is None else entrypoint
        command = [*first, *(self.cmd if args is None else args)]
        # PID 1 is this shell; it execs chroot, which execs env, which execs the
        # entrypoint: tini ends up PID 1.
        script = f"""set -e
mount --make-rprivate /
mount --bind {self.path} {where}
mount -o remount,bind,ro {where}
mount -t proc proc {where}/proc
mount -t tmpfs -o mode=1777,size=64m tmpfs {where}/tmp
mount --rbind /dev {where}/dev
exec chroot --userspec={self.user} {where} /usr/bin/env -i "$@"
"""
        full_env = [*self.env, *(f"{k}={v}" for k, v in env.items())]
        return subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "sh",
                "-c",
                script,
                "sh",
                *full_env,
                *command,
            ],
            text=True,
            **kw,
        )


@pytest.fixture(scope="module")
def rootfs(image: str) -> Iterator[Rootfs]:
    fs = Rootfs(image)
    yield fs
    fs.close()


def _run(
    rootfs: Rootfs, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = rootfs.popen(list(args), env or {}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_version_and_config_inside_the_image(rootfs: Rootfs) -> None:
    import dlqproc

    out = _run(rootfs, "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"dlqproc {dlqproc.__version__}", out
    out = _run(
        rootfs,
        "--config",
        "/etc/dlqproc/default.yaml",
        "config",
        "--json",
        env={"POSTGRES_DSN": "postgresql://u:pw-in-image@db/x", "NATS_TOKEN": "tok-in-image"},
    )
    assert out.returncode == 0, out
    shown = json.loads(out.stdout)
    assert shown["nats"]["dlqWorkers"] == 8
    assert "pw-in-image" not in out.stdout and "tok-in-image" not in out.stdout


def test_the_root_is_read_only_and_tmp_writable(rootfs: Rootfs) -> None:
    check = (
        "import os, tempfile; ro = os.statvfs('/').f_flag & os.ST_RDONLY;"
        " tempfile.mkstemp(dir='/tmp'); print(bool(ro), os.getuid())"
    )
    proc = rootfs.popen(
        ["/opt/dlqproc/bin/python", "-c", check],
        {},
        entrypoint=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == ["True", "10001"]


def _ns_processes(outer: int) -> list[tuple[int, str, str]]:
    """(host pid, state, command) of the processes in the PID namespace whose
    first process is `outer`'s child (unshare forks it)."""
    [first] = [int(p) for p in Path(f"/proc/{outer}/task/{outer}/children").read_text().split()]
    want = os.readlink(f"/proc/{first}/ns/pid")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns" / "pid") != want:
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), state, cmd))
    return found


def test_run_in_the_image_serves_settles_and_stops(
    rootfs: Rootfs, nats_server: NatsServer, dsn: str, tmp_path: Path
) -> None:
    helper = Service(nats_server.url, dsn, tmp_path)  # publishing and queries only
    port = free_port()
    env = {
        "NATS_URL": nats_server.url,
        "POSTGRES_DSN": dsn,
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(port),
        "HANDLERS_MODULE": "dlqproc.handlers.demo",
        "NATS_DLQSTREAM": helper.stream,
        "NATS_DLQSUBJECT": helper.subject,
        "NATS_REALTIME_ENABLED": "false",
        "NATS_HISTORICAL_ENABLED": "false",
        "NATS_DLQWORKERS": "2",
        "NATS_SHUTDOWNGRACE": "10s",
    }
    log = (tmp_path / "image.log").open("w")
    proc = rootfs.popen(None, env, stdout=log, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return proc.poll() is not None

        wait_until(ready, timeout=90, interval=0.2)
        assert proc.poll() is None, (tmp_path / "image.log").read_text()

        # A few DLQ messages: three succeed, one is not JSON (exhausted at once).
        bodies = [envelope("demo.ok", "acme", {"id": f"e{i}", "text": "x"}) for i in range(3)]
        helper.publish("acme", [*bodies, b"\xffnot json"])
        wait_until(helper.settled, timeout=60, interval=0.2)
        assert helper.query("SELECT count(*) FROM daisi_acme.demo_events") == [(3,)]
        assert [r["reason"] for r in helper.exhausted()] == ["not_json"]

        # PID 1 is tini, dlqproc and its workers below it; a killed worker is
        # replaced and reaped: no zombie in the namespace.
        procs = _ns_processes(proc.pid)
        workers = [p for p, _, cmd in procs if "multiprocessing" in cmd and "spawn_main" in cmd]
        assert len(workers) == 2, procs
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: (
                len([p for p, s, c in _ns_processes(proc.pid) if "spawn_main" in c and s != "Z"])
                == 2
                and workers[0] not in [p for p, _, _ in _ns_processes(proc.pid)]
            ),
            timeout=60,
            interval=0.2,
        )
        assert not [p for p in _ns_processes(proc.pid) if p[1] == "Z"]

        # SIGTERM (what the kubelet sends, to tini, which forwards it): exit 0
        # within the grace period.
        [tini] = [p for p, _, cmd in _ns_processes(proc.pid) if cmd.startswith("/usr/bin/tini")]
        os.kill(tini, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "image.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "image.log").read_text()
    assert "Read-only file system" not in text and "Traceback" not in text, text
