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
