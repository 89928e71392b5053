"""The health port on a real server: status codes for malformed requests, keep-alive,
slow clients, and /metrics that neither starves the probes nor renders more than once
for scrapes that arrive together.

Most tests run a HealthServer on its own event loop in a thread of the test
process, with a render of the test's making (counting, blocking, failing). The
starvation test runs the real metrics (100 tenants, bench/metrics.py) in a
process of its own, so the clients' work here does not share its interpreter.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import uvloop

from dlqproc.health import REQUEST_TIMEOUT, HealthServer
from dlqproc.metrics import Metrics
from support.service import wait_until

ROOT = Path(__file__).resolve().parent.parent
Render = Callable[[], tuple[bytes, str]]


class Running:
    """A HealthServer serving from its own event loop in a background thread."""

    def __init__(self, render: Render, **options: Any) -> None:
        self.alive = True
        self.problems: list[str] = []
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> HealthServer:
            server = HealthServer(
                "127.0.0.1", 0, lambda: self.alive, lambda: self.problems, render, **options
            )
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.port

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(render: Render | None = None, **options: Any) -> Running:
        running = Running(render or (lambda: (b"m 1\n", "text/plain")), **options)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()


def get(url: str, method: str = "GET", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def exchange(port: int, request: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response (the server may close after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock.makefile("rb"))


def read_response(stream: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One response from a connection's buffered reader (pipelined ones stay buffered)."""
    status_line = stream.readline()
    assert status_line, "closed without a response"
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = stream.read(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_health_and_ready_keep_their_bodies(serve: Callable[..., Running]) -> None:
    srv = serve()
    assert get(srv.url("/health"))[::2] == (200, b'{"status":"ok"}\n')
    assert get(srv.url("/health?verbose=1"))[0] == 200
    status, headers, body = get(srv.url("/ready"))
    assert (status, json.loads(body)) == (200, {"status": "ready"})
    assert headers["Content-Type"] == "application/json"
    srv.problems = ["nats: not connected"]
    status, _, body = get(srv.url("/ready"))
    assert (status, json.loads(body)) == (
        503,
        {"status": "unavailable", "problems": ["nats: not connected"]},
    )
    srv.alive = False
    assert get(srv.url("/health"))[::2] == (503, b'{"status":"down"}\n')
    status, headers, body = get(srv.url("/health"), method="HEAD")
    assert (status, body, headers["Content-Length"]) == (503, b"", "18")
    assert get(srv.url("/nope"))[0] == 404


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),  # TLS to HTTP
        (b"GET /health HTTP/1.1\nHost: x\n\n", 400),  # bare LF: answered, not waited on
        (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (
            b"GET /health HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: y\r\n" % i for i in range(100))
            + b"\r\n",
            431,
        ),
    ],
    ids=["tls", "bare-lf", "no-host", "version", "long-uri", "long-header", "many-headers"],
)
def test_malformed_requests_get_their_status_and_a_close(
    serve: Callable[..., Running], request_bytes: bytes, status: int
) -> None:
    srv = serve()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(request_bytes)
        got, _, _ = read_response(sock.makefile("rb"))
        assert got == status
        assert closed_by_server(sock)


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
@pytest.mark.parametrize("path", [b"/health", b"/ready", b"/metrics"])
def test_other_methods_get_405_with_allow(
    serve: Callable[..., Running], method: bytes, path: bytes
) -> None:
    srv = serve(render=lambda: pytest.fail("a 405 must not render"))
    request = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    status, headers, _ = exchange(srv.port, request)
    assert (status, headers.get("allow")) == (405, "GET, HEAD")
    # The body was not read: the connection is not reused.
    assert headers.get("connection") == "close"


def test_keep_alive_serves_several_requests_on_one_connection(
    serve: Callable[..., Running],
) -> None:
    srv = serve()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for path in (b"/health", b"/ready", b"/metrics", b"/health"):
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = read_response(stream)
            assert status == 200 and headers.get("connection") != "close"
        # Pipelined: both answered, in order.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        assert [read_response(stream)[:3:2] for _ in range(2)] == [(200, b'{"status":"ok"}\n')] * 2


def test_a_client_trickling_its_request_is_closed(serve: Callable[..., Running]) -> None:
    srv = serve()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as sock:
        start = time.monotonic()
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
                time.sleep(0.5)  # the slow client itself: a byte every half second
            except OSError:
                break
            if time.monotonic() - start > REQUEST_TIMEOUT + 5:
                pytest.fail("a trickling client was not closed")
        assert closed_by_server(sock)
        assert time.monotonic() - start < REQUEST_TIMEOUT + 5


def blocking_render(body: bytes = b"m 1\n") -> tuple[Render, threading.Event, list[int]]:
    """A render that waits for `release` and counts its calls."""
    release, calls = threading.Event(), [0]

    def render() -> tuple[bytes, str]:
        calls[0] += 1
        release.wait(30)
        return body, "text/plain; version=0.0.4"

    return render, release, calls


def scrape_in_threads(url: str, n: int) -> tuple[list[threading.Thread], list[Any]]:
    results: list[Any] = []

    def one() -> None:
        results.append(get(url, timeout=30))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, results


def test_concurrent_scrapes_share_one_render(serve: Callable[..., Running]) -> None:
    render, release, calls = blocking_render(b"shared 1\n")
    srv = serve(render, scrape_slots=16, reuse=0.0)
    threads, results = scrape_in_threads(srv.url("/metrics"), 12)
    wait_until(lambda: srv.server.scrapes == 12, timeout=10)
    release.set()
    for t in threads:
        t.join(30)
    assert [(r[0], r[2]) for r in results] == [(200, b"shared 1\n")] * 12
    assert calls[0] == srv.server.renders == 1
    # Nothing in flight and no reuse: the next scrape renders again.
    assert get(srv.url("/metrics"))[0] == 200
    assert calls[0] == 2


def test_a_recent_render_answers_scrapes_within_the_reuse_window(
    serve: Callable[..., Running],
) -> None:
    calls = [0]

    def render() -> tuple[bytes, str]:
        calls[0] += 1
        return b"n %d\n" % calls[0], "text/plain"

    srv = serve(render, reuse=3600.0)
    assert [get(srv.url("/metrics"))[2] for _ in range(5)] == [b"n 1\n"] * 5


def test_scrapes_past_the_slots_wait_for_one(serve: Callable[..., Running]) -> None:
    render, release, calls = blocking_render()
    srv = serve(render, scrape_slots=2)
    threads, results = scrape_in_threads(srv.url("/metrics"), 5)
    wait_until(lambda: srv.server.scrapes == 5, timeout=10)
    # Two scrapes wait on the render, three on a slot; probes wait on neither.
    assert get(srv.url("/health"), timeout=1)[0] == 200
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(r[0] for r in results) == [200] * 5
    assert calls[0] == 1  # the waiting three took the fresh render


def test_a_render_past_its_timeout_answers_503_and_never_blocks_health(
    serve: Callable[..., Running],
) -> None:
    render, release, calls = blocking_render()
    srv = serve(render, render_timeout=0.5)
    try:
        threads, results = scrape_in_threads(srv.url("/metrics"), 3)
        while any(t.is_alive() for t in threads):
            start = time.monotonic()
            assert get(srv.url("/health"), timeout=1)[0] == 200
            assert time.monotonic() - start < 1
        for t in threads:
            t.join(10)
        assert [r[0] for r in results] == [503] * 3
        assert b"timed out" in results[0][2]
        # The stuck render still runs: a new scrape joins it instead of starting another.
        assert get(srv.url("/metrics"))[0] == 503
        assert calls[0] == srv.server.renders == 1
    finally:
        release.set()
    wait_until(lambda: get(srv.url("/metrics"))[0] == 200, timeout=10)
    assert calls[0] == 1  # its late result serves the next scrapes


def test_a_failing_render_answers_500_and_is_retried(serve: Callable[..., Running]) -> None:
    calls = [0]

    def render() -> tuple[bytes, str]:
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("metrics directory unreadable")
        return b"ok 1\n", "text/plain"

    srv = serve(render)
    assert get(srv.url("/metrics"))[0] == 500
    assert get(srv.url("/metrics"))[::2] == (200, b"ok 1\n")


def test_a_scraper_that_does_not_read_loses_its_slot(serve: Callable[..., Running]) -> None:
    # Larger than what loopback's socket buffers absorb, so the write blocks.
    big = b"x" * (64 << 20)
    srv = serve(lambda: (big, "text/plain"), scrape_slots=1, write_timeout=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: srv.server.scrapes == 1, timeout=10)
        # The one slot frees once the stalled write times out.
        status, _, body = get(srv.url("/metrics"), timeout=30)
        assert status == 200 and len(body) == len(big)


def test_probes_answer_within_a_second_under_slow_clients_and_scrapers() -> None:
    """The issue's check: 60 slow clients + 32 scrapers (100 tenants), every probe < 1 s."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.metrics", "--serve", "100", "500"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = json.loads(proc.stdout.readline())["port"]
        probes, scrapes = load_and_probe(port, slow=60, scrapers=32, seconds=8.0)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert probes and all(status == 200 for status, _ in probes), probes
    slowest = max(seconds for _, seconds in probes)
    assert slowest < 1.0, f"slowest of {len(probes)} probes: {slowest:.2f}s"
    assert scrapes.count(200) >= 32, scrapes  # the scrapers were served too


def load_and_probe(
    port: int, slow: int, scrapers: int, seconds: float
) -> tuple[list[tuple[int, float]], list[int]]:
    """Slow clients and scrapers on an event loop in a thread; probes from this one."""
    stop = threading.Event()
    scrapes: list[int] = []
    connected = [0]

    async def slow_client() -> None:
        while not stop.is_set():
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                connected[0] += 1
                for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    if stop.is_set():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(2.0)
                writer.close()
            except OSError:
                await asyncio.sleep(0.1)  # closed by the server: come back, as an attacker would

    async def scraper() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = await asyncio.wait_for(reader.read(), 30)
                scrapes.append(int(data.split(b" ", 2)[1]))
                writer.close()
            except (OSError, TimeoutError, IndexError, ValueError):
                scrapes.append(0)

    async def main() -> None:
        tasks = [asyncio.create_task(slow_client()) for _ in range(slow)]
        tasks += [asyncio.create_task(scraper()) for _ in range(scrapers)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        await asyncio.wait(tasks, timeout=35)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    probes: list[tuple[int, float]] = []
    try:
        wait_until(lambda: connected[0] >= slow and len(scrapes) >= scrapers, timeout=30)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.monotonic()
            try:
                status = get(f"http://127.0.0.1:{port}/health", timeout=5)[0]
            except OSError:
                status = 0
            probes.append((status, time.monotonic() - start))
            time.sleep(0.1)  # a probe every 100 ms, 10x a kubelet's fastest period
    finally:
        stop.set()
        thread.join(40)
    return probes, scrapes


def test_a_busy_port_fails_start_with_oserror(serve: Callable[..., Running]) -> None:
    srv = serve()

    async def start_on_the_same_port() -> None:
        other = HealthServer("127.0.0.1", srv.port, lambda: True, list, lambda: (b"", ""))
        await other.start()

    with pytest.raises(OSError):
        asyncio.run(start_on_the_same_port())
    assert get(srv.url("/health"))[0] == 200  # the first one is untouched


# -- connection limits (dlqproc.listener)

FLOOD_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 18)]  # all of 127/8 is loopback on Linux


def connect_from(port: int, source: str, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def flood(port: int, n: int, sources: list[str]) -> list[socket.socket]:
    """`n` connections that send nothing, connected without waiting for the server to accept."""
    socks = []
    for i in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((sources[i % len(sources)], 0))
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
    return socks


def refused(sock: socket.socket) -> bool:
    """Whether the server closed this connection with at most its fixed 503, unread."""
    sock.setblocking(True)
    sock.settimeout(10)
    try:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 503")


def still_open(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True  # nothing to read and not closed
    except OSError:
        return False


def test_connections_over_the_cap_are_closed_and_probes_keep_a_reserve(
    serve: Callable[..., Running],
) -> None:
    render, release, _ = blocking_render()
    metrics = Metrics(10)
    srv = serve(
        render, max_connections=16, probe_reserve=8, probe_lifetime=60.0, render_timeout=60.0,
        scrape_slots=16, on_refused=metrics.health_refused.inc,
    )  # fmt: skip
    listener = srv.server.listener
    assert listener is not None
    flooder, prober = "127.0.0.2", "127.0.0.3"
    held: list[socket.socket] = []
    try:
        # Eight scrapes that wait on the render take the ordinary places...
        for _ in range(8):
            sock = connect_from(srv.port, flooder)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append(sock)
        wait_until(lambda: srv.server.scrapes == 8, timeout=10)
        # ...and of the reserve, one address gets four places: the rest is refused unread.
        more = [connect_from(srv.port, flooder) for _ in range(10)]
        held += more
        wait_until(lambda: listener.refused.total == 6, timeout=10)
        assert listener.open == 12
        assert [still_open(s) for s in more[:4]] == [True] * 4
        assert all(refused(s) for s in more[4:])
        # Another address is still answered, from the reserve: a probe, nothing else.
        with connect_from(srv.port, prober) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(sock.makefile("rb"))
            assert (status, body) == (200, b'{"status":"ok"}\n')
            assert headers.get("connection") == "close" and closed_by_server(sock)
        with connect_from(srv.port, prober) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = read_response(sock.makefile("rb"))
            assert (status, headers.get("retry-after")) == (503, "1")
        assert listener.refused.lines == 1  # six refusals, one log line so far
        exposed: list[str] = []
        metrics.health_refused.expose(exposed)
        assert "dlq_health_connections_refused_total 6.0" in exposed  # each one counted
    finally:
        release.set()
        for sock in held:
            sock.close()
    wait_until(lambda: listener.open == 0, timeout=30)
    assert get(srv.url("/health"))[0] == 200


def test_a_place_in_the_reserve_lasts_a_short_visit(serve: Callable[..., Running]) -> None:
    srv = serve(max_connections=2, probe_reserve=1, probe_lifetime=0.5)
    listener = srv.server.listener
    assert listener is not None
    with connect_from(srv.port, "127.0.0.2") as first, connect_from(srv.port, "127.0.0.2") as idle:
        wait_until(lambda: listener.open == 2, timeout=10)
        assert closed_by_server(idle)  # within its lifetime, not REQUEST_TIMEOUT
        assert still_open(first)


CHILD = """
import asyncio, json, signal
import uvloop
from dlqproc import logs
from dlqproc.health import HealthServer

logs.setup("INFO")

async def main() -> None:
    server = HealthServer("127.0.0.1", 0, lambda: True, list, lambda: (b"m 1\\n", "text/plain"))
    await server.start()
    print(json.dumps({"port": server.port}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.close()

uvloop.run(main())
"""


class Child:
    """A HealthServer in a process of its own, its JSON log lines collected."""

    def __init__(self, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                import resource

                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=limit,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.logs: list[dict[str, Any]] = []
        stderr = self.proc.stderr
        self._reader = threading.Thread(target=self._read, args=(stderr,), daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        assert line, f"the child did not start: {self.logs}"
        self.port = json.loads(line)["port"]

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                self.logs.append(json.loads(line))
            except ValueError:
                self.logs.append({"msg": line.rstrip()})

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def lines(self, contains: str) -> list[dict[str, Any]]:
        return [e for e in list(self.logs) if contains in str(e.get("msg", ""))]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        self._reader.join(10)


def test_a_flood_holds_at_most_the_cap_in_descriptors_and_logs_a_few_lines() -> None:
    from dlqproc.health import MAX_CONNECTIONS

    child = Child()
    socks: list[socket.socket] = []
    try:
        baseline = child.fds()
        start = time.monotonic()
        socks = flood(child.port, MAX_CONNECTIONS + 400, FLOOD_ADDRESSES)
        wait_until(lambda: child.lines("connections refused"), timeout=30)
        most = baseline
        sampled = time.monotonic() + 2.0
        while time.monotonic() < sampled:  # the flood's connections stay for 2 to 5 s
            most = max(most, child.fds())
            time.sleep(0.02)
        for sock in socks:
            sock.close()
        wait_until(lambda: get(f"http://127.0.0.1:{child.port}/health", timeout=5)[0] == 200)
        child.stop()
        elapsed = time.monotonic() - start
    finally:
        for sock in socks:
            sock.close()
        child.stop()
    assert most <= baseline + MAX_CONNECTIONS + 2, (baseline, most)
    lines = child.lines("connections refused")
    refusals = sum(e["count"] for e in lines)
    assert refusals >= 100, lines
    assert len(lines) <= elapsed / 10 + 2, lines  # a line per period, not per connection
    assert all(e["samples"] and len(e["samples"]) <= 5 for e in lines)


def test_the_port_outlives_running_out_of_descriptors_without_spinning() -> None:
    child = Child(nofile=48)
    socks: list[socket.socket] = []
    try:
        start = time.monotonic()
        socks = flood(child.port, 200, FLOOD_ADDRESSES)
        wait_until(lambda: child.lines("out of resources"), timeout=30)
        cpu, window = child.cpu_seconds(), time.monotonic()
        time.sleep(3.0)  # a window in which accept() keeps failing
        cpu, window = child.cpu_seconds() - cpu, time.monotonic() - window
        for sock in socks:
            sock.close()
        wait_until(lambda: get(f"http://127.0.0.1:{child.port}/health", timeout=5)[0] == 200)
        assert child.proc.poll() is None
        child.stop()
        elapsed = time.monotonic() - start
    finally:
        for sock in socks:
            sock.close()
        child.stop()
    print(f"CPU while out of descriptors: {cpu:.2f} s in {window:.1f} s")
    lines = child.lines("out of resources")
    failures = sum(e["count"] for e in lines)
    assert {s for e in lines for s in e["samples"]} == {"EMFILE"}
    # accept() is retried after 0.1 s at the soonest: a spinning loop would fail
    # it thousands of times a second.
    assert 0 < failures <= elapsed / 0.1 + 1, (failures, elapsed)
