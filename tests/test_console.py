"""The web console's security properties through aiohttp's test client, on a
real PostgreSQL: authentication, CSRF, headers, escaping, start-up refusals.
(The browser suite, tests/test_console_browser.py, drives the pages.)"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.config import ConsoleConfig, load
from dlqproc.console import app as console_app
from dlqproc.console import auth, forms, serve, throttle
from dlqproc.console.app import COUNT_CAP, Console, _local_path
from dlqproc.console.throttle import Throttle
from dlqproc.exhausted import filters
from dlqproc.exhausted.filters import FilterError
from support.exhausted import bulk_rows, exhausted_row, migrate, query, store_rows
from support.service import TESTS_DIR

TOKEN = "console-token-" + "x7Qp" * 6
XSS = {
    "chat_id": "<script>window.pwned=1</script>",
    "name": '"><img src=x onerror="window.pwned=2">',
    "url": "javascript:alert(1)",
}

Client = TestClient[Any, Any]


def _rows(dsn: str) -> list[int]:
    migrate(dsn)
    return store_rows(
        dsn,
        [
            exhausted_row(1, "acme", "v1.chats.upsert", XSS, error="<b>bold</b> failure"),
            exhausted_row(2, "globex", "v1.chats.upsert", {"chat_id": "c2"}),
        ],
    )


def _run(dsn: str, token: str, test: Callable[[Client], Awaitable[None]]) -> None:
    cfg = load(
        environ={"POSTGRES_DSN": dsn, "CONSOLE_TOKEN": token, "NATS_URL": "nats://127.0.0.1:1"}
    )

    async def go() -> None:
        console = Console(cfg)
        async with TestClient(TestServer(console.app())) as client:
            await test(client)

    asyncio.run(go())


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found[1]


async def _sign_in(client: Client, operator: str = "ann") -> str:
    page = await client.get("/login")
    csrf = _csrf(await page.text())
    got = await client.post(
        "/login",
        data={"csrf": csrf, "operator": operator, "token": TOKEN, "next": "/"},
        allow_redirects=False,
    )
    assert got.status == 303, await got.text()
    home = await client.get("/")
    assert home.status == 200
    return _csrf(await home.text())


def _headers_ok(r: ClientResponse) -> None:
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Referrer-Policy"] == "same-origin"


def test_requests_without_auth_or_csrf_are_refused(dsn: str) -> None:
    good, _ = _rows(dsn)

    async def test(client: Client) -> None:
        r = await client.get("/", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/login")
        _headers_ok(r)
        assert (await client.get("/api/jobs/1")).status == 401
        r = await client.post(f"/events/{good}/resolve", data={"note": "x"})
        assert r.status == 401
        r = await client.post(
            f"/events/{good}/resolve",
            data={"note": "x"},
            headers={"Authorization": "Bearer wrong-token-wrong-token"},
        )
        assert r.status == 401
        # Signing in needs the login form's CSRF token, and the right console token.
        page = await client.get("/login")
        _headers_ok(page)
        r = await client.post("/login", data={"operator": "ann", "token": TOKEN})
        assert r.status == 403
        csrf = _csrf(await page.text())
        r = await client.post("/login", data={"csrf": csrf, "operator": "ann", "token": "nope"})
        assert r.status == 401
        r = await client.post(
            "/login",
            data={"csrf": csrf, "operator": "ann", "token": TOKEN, "next": "//evil.example/x"},
            allow_redirects=False,
        )
        assert r.status == 303 and r.headers["Location"] == "/"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # The pre-login session id is worthless now: a new one was issued.
        assert r.cookies[auth.COOKIE].value not in page.headers["Set-Cookie"]
        home = await client.get("/")
        csrf = _csrf(await home.text())
        # Signed in, a POST still needs the session's CSRF token.
        for data in ({"note": "x"}, {"note": "x", "csrf": "forged"}):
            r = await client.post(f"/events/{good}/resolve", data=data)
            assert r.status == 403
        r = await client.post(
            f"/events/{good}/resolve",
            data={"note": "x", "csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert r.status == 403
        assert query(dsn, "SELECT resolved FROM exhausted_events WHERE id = %s", (good,)) == [
            (False,)
        ]
        # A resolve needs a note.
        r = await client.post(f"/events/{good}/resolve", data={"csrf": csrf, "note": " "})
        assert r.status == 400
        r = await client.post(
            f"/events/{good}/resolve",
            data={"csrf": csrf, "note": "fixed upstream"},
            allow_redirects=False,
        )
        assert r.status == 303
        audit = query(
            dsn, "SELECT action, actor, note FROM exhausted_audit WHERE exhausted_id = %s", (good,)
        )
        assert audit == [("resolve", "ann", "fixed upstream")]
        # A bearer token acts without a session (no browser sends one by itself).
        r = await client.post(
            f"/events/{good}/annotate",
            data={"note": "via api"},
            headers={"Authorization": f"Bearer {TOKEN}", "X-Operator": "bot"},
            allow_redirects=False,
        )
        assert r.status == 303
        assert query(dsn, "SELECT actor FROM exhausted_audit WHERE action = 'annotate'") == [
            ("bot",)
        ]
        # Signing out ends the session.
        await client.post("/logout", data={"csrf": csrf})
        assert (await client.get("/", allow_redirects=False)).status == 303

    _run(dsn, TOKEN, test)


def test_pages_escape_values_and_never_show_the_token_or_the_dsn(dsn: str) -> None:
    good, _ = _rows(dsn)

    async def test(client: Client) -> None:
        await _sign_in(client)
        pages = ["/", "/list", "/list?tenant=acme", f"/events/{good}", "/replay?tenant=acme",
                 "/list?error=%3Cscript%3E", "/list?since=bogus"]  # fmt: skip
        bodies = {}
        for path in pages:
            r = await client.get(path)
            assert r.status in (200, 400), path
            _headers_ok(r)
            bodies[path] = await r.text()
        password = dsn.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
        for path, body in bodies.items():
            assert TOKEN not in body, path
            assert dsn not in body and (not password or password not in body), path
            assert "<script>window" not in body and "<img src=x" not in body, path
            assert re.findall(r"<script[^>]*>", body) == ['<script src="/static/console.js" defer>']
        detail = bodies[f"/events/{good}"]
        assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in detail
        assert "&lt;b&gt;bold&lt;/b&gt; failure" in detail
        assert 'href="javascript' not in detail
        assert "&lt;script&gt;" in bodies["/list?error=%3Cscript%3E"]
        assert "since" in bodies["/list?since=bogus"]
        r = await client.get("/static/console.js")
        assert r.status == 200 and r.headers["X-Content-Type-Options"] == "nosniff"

    _run(dsn, TOKEN, test)


def test_without_a_token_only_a_name_is_asked() -> None:
    assert serve.startup_problem(ConsoleConfig(host="127.0.0.1")) is None
    assert serve.startup_problem(ConsoleConfig(host="::1")) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "console.example"):
        problem = serve.startup_problem(ConsoleConfig(host=host))
        assert problem is not None and "without a token" in problem
    assert serve.startup_problem(ConsoleConfig(host="0.0.0.0", token=TOKEN)) is None
    short = serve.startup_problem(ConsoleConfig(host="127.0.0.1", token="short"))
    assert short is not None and "16 characters" in short


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"CONSOLE_HOST": "0.0.0.0"}, "refusing to listen on '0.0.0.0' without a token"),
        ({"CONSOLE_TOKEN": "tiny-secret"}, "at least 16 characters"),
    ],
)
def test_console_refuses_to_start(env: dict[str, str], line: str) -> None:

    out = subprocess.run(
        [sys.executable, "-m", "dlqproc", "console"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR), "CONSOLE_HOST": "127.0.0.1", **env},
    )
    assert out.returncode == 2, out.stderr
    assert line in out.stderr
    assert "tiny-secret" not in out.stderr + out.stdout


def test_signing_in_without_a_configured_token(dsn: str) -> None:
    _rows(dsn)

    async def test(client: Client) -> None:
        page = await client.get("/login")
        body = await page.text()
        assert 'name="token"' not in body
        r = await client.post(
            "/login", data={"csrf": _csrf(body), "operator": "<script>"}, allow_redirects=False
        )
        assert r.status == 400
        r = await client.post(
            "/login", data={"csrf": _csrf(body), "operator": "ann"}, allow_redirects=False
        )
        assert r.status == 303
        # No bearer token exists to match.
        r = await client.get("/", headers={"Authorization": "Bearer "}, allow_redirects=False)
        assert r.status == 200
        r = await client.get("/api/jobs/1", headers={"Authorization": "Bearer anything"})
        assert r.status == 401

    _run(dsn, "", test)


_NAMES = ["tenant", "subject", "error", "since", "until", "reason", "state", "replayed"]
_NAMES += ["hide_superseded", "limit", "after", "other"]
_values = st.lists(st.tuples(st.sampled_from(_NAMES), st.text(max_size=30)), max_size=8)


@given(_values)
def test_any_query_is_a_filter_or_a_filter_error(pairs: list[tuple[str, str]]) -> None:
    values: dict[str, list[str]] = {}
    for k, v in pairs:
        values.setdefault(k, []).append(v)
    now = filters.utcnow()
    try:
        q = forms.parse(values, now)
    except FilterError:
        return
    # The view's own link opens the same view.
    again = forms.parse(parse_qs(urlsplit(q.link()).query, keep_blank_values=True), now)
    assert again.filter == q.filter
    # A confirmed bulk replay selects what its page counted.
    frozen: dict[str, list[str]] = {}
    for k, v in forms.frozen_values(q.filter):
        frozen.setdefault(k, []).append(v)
    assert forms.parse(frozen, filters.utcnow()).filter == q.filter


@given(st.text(max_size=40))
def test_a_redirect_after_sign_in_stays_on_the_console(path: str) -> None:
    got = _local_path(path)
    assert got == "/" or (got.startswith("/") and not got.startswith("//"))
    assert urlsplit(got).netloc == "" and urlsplit(got).scheme == ""


def test_the_list_counts_up_to_a_cap_and_the_bulk_page_exactly(dsn: str) -> None:
    migrate(dsn)
    bulk_rows(dsn, COUNT_CAP + 5, "acme")

    async def test(client: Client) -> None:
        await _sign_in(client)
        listed = await (await client.get("/list?tenant=acme")).text()
        assert f'<span id="total">{COUNT_CAP} or more</span>' in listed
        bulk = await (await client.get("/replay?tenant=acme")).text()
        assert f'<b id="bulk-count">{COUNT_CAP + 5}</b>' in bulk

    _run(dsn, TOKEN, test)


# -- throttling token guesses


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_waits_after_five_failures_doubling_and_others_do_not() -> None:
    clock = Clock()
    t = Throttle(clock)
    for _ in range(throttle.FREE_FAILURES - 1):
        t.failed("10.0.0.1")
        assert t.wait("10.0.0.1") == 0
    waits = []
    for _ in range(14):
        t.failed("10.0.0.1")
        waits.append(t.wait("10.0.0.1"))
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == throttle.MAX_DELAY
    assert t.wait("10.0.0.2") == 0
    clock.now += throttle.MAX_DELAY
    assert t.wait("10.0.0.1") == 0  # the window passed
    t.succeeded("10.0.0.1")
    t.failed("10.0.0.1")
    assert t.wait("10.0.0.1") == 0  # a success cleared the count


def test_an_ipv6_host_is_its_64_and_failures_are_forgotten() -> None:
    clock = Clock()
    t = Throttle(clock)
    for i in range(throttle.FREE_FAILURES):
        t.failed(f"2001:db8:1:2::{i + 1:x}")
    assert t.wait("2001:db8:1:2:ffff::1") == 1.0
    assert t.wait("2001:db8:1:3::1") == 0
    assert throttle.client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert throttle.client_key(None) == throttle.client_key("not an address") == "?"
    clock.now += throttle.FORGET_AFTER + 1
    t.failed("2001:db8:1:2::1")
    assert t.wait("2001:db8:1:2::1") == 0


def test_the_map_stays_bounded_under_100000_addresses() -> None:
    t = Throttle(Clock(), rate=1e9)
    for i in range(100_000):
        t.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(t) == throttle.MAX_ADDRESSES
    t.succeeded("10.1.134.159")  # the last address, one entry moves to the known ones
    assert len(t) == throttle.MAX_ADDRESSES


def test_guesses_spread_over_addresses_spend_one_global_budget() -> None:
    clock = Clock()
    t = Throttle(clock)
    t.succeeded("192.0.2.1")  # an operator who signed in
    for i in range(int(throttle.GLOBAL_BURST)):
        assert t.wait(f"10.0.{i}.1") == 0
        t.failed(f"10.0.{i}.1")
    assert t.wait("10.9.9.9") == pytest.approx(1.0 / throttle.GLOBAL_RATE)
    assert t.wait("192.0.2.1") == 0  # known operators are not locked out
    clock.now += 1.0 / throttle.GLOBAL_RATE
    assert t.wait("10.9.9.9") == 0


_ops = st.lists(
    st.tuples(
        st.sampled_from(["fail", "ok", "wait"]),
        st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::1", "2001:db8::2", "", "x"]),
        st.floats(0, 5000),
    ),
    max_size=60,
)


@given(_ops)
def test_any_history_keeps_the_bounds(ops: list[tuple[str, str, float]]) -> None:
    clock = Clock()
    t = Throttle(clock, max_addresses=3)
    for op, address, advance in ops:
        clock.now += advance
        if op == "fail":
            t.failed(address)
        elif op == "ok":
            t.succeeded(address)
        wait = t.wait(address)
        assert 0 <= wait <= throttle.MAX_DELAY
        assert len(t._by_key) <= 3
        if op == "ok":
            assert wait == 0


def test_sign_in_and_bearer_guesses_get_429_per_address(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    _rows(dsn)
    cfg = load(
        environ={"POSTGRES_DSN": dsn, "CONSOLE_TOKEN": TOKEN, "NATS_URL": "nats://127.0.0.1:1"}
    )
    clock = Clock()
    caplog.set_level(logging.INFO, "dlqproc.console")

    async def go() -> None:
        console = Console(cfg)
        console.throttle = Throttle(clock)
        server = TestServer(console.app(), host="127.0.0.1")
        await server.start_server()

        def client(source: str) -> Client:
            return TestClient(server, connector=aiohttp.TCPConnector(local_addr=(source, 0)))

        async with client("127.0.0.2") as a, client("127.0.0.3") as b, client("127.0.0.4") as c:
            csrf = _csrf(await (await a.get("/login")).text())

            async def sign_in(token: str) -> ClientResponse:
                data = {"csrf": csrf, "operator": "mallory", "token": token}
                return await a.post("/login", data=data, allow_redirects=False)

            for i in range(throttle.FREE_FAILURES):
                assert (await sign_in(f"guess-{i}-guess-guess")).status == 401
            r = await sign_in(TOKEN)  # right, but not heard
            assert (r.status, r.headers["Retry-After"]) == (429, "1")
            assert "try again in 1 s" in await r.text()
            r = await a.get("/api/jobs/1", headers={"Authorization": f"Bearer {TOKEN}"})
            assert (r.status, r.headers["Retry-After"]) == (429, "1")
            # Another address signs in as usual.
            await _sign_in(b)
            # Wrong bearer tokens count the same.
            for _ in range(throttle.FREE_FAILURES):
                r = await c.get(
                    "/api/jobs/1", headers={"Authorization": "Bearer guess-guess-guess"}
                )
                assert r.status == 401
            r = await c.get("/api/jobs/1", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status == 429
            # After the window, the right token works.
            clock.now += 1.0
            assert (await sign_in(TOKEN)).status == 303

    asyncio.run(go())
    lines = [r for r in caplog.records if "wrong token" in r.getMessage()]
    assert sum(r.__dict__["count"] for r in lines) == 2 * throttle.FREE_FAILURES
    assert len(lines) <= 3  # a line per period, not per guess
    assert {s for r in lines for s in r.__dict__["samples"]} <= {"127.0.0.2", "127.0.0.4"}
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert TOKEN not in text and "guess-" not in text


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and len(data) > 64 and data.startswith(b"HTTP/1.0"):
                break
            if len(data) > 4096:
                break
        return data


def test_the_served_console_refuses_smuggling_and_reflects_nothing(dsn: str) -> None:
    """`dlqproc console` itself, over real sockets: what aiohttp's defaults would have done."""
    migrate(dsn)
    env = {**os.environ, "POSTGRES_DSN": dsn, "CONSOLE_TOKEN": TOKEN, "CONSOLE_PORT": "0",
           "CONSOLE_HOST": "127.0.0.1", "PYTHONPATH": str(TESTS_DIR)}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "dlqproc", "console"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    try:
        found = None
        while found is None:
            line = proc.stderr.readline()
            assert line, "the console exited"
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)/", line)
        port = int(found[1])
        smuggled = {
            "duplicate length": b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Content-Length: 5\r\n\r\nabcde",
            "length and chunked": b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "long uri": b"GET /list?" + b"reason=a&" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        }
        for name, request in smuggled.items():
            got = _raw(port, request)
            status = 414 if name == "long uri" else 400
            assert got.startswith(b"HTTP/1.0 %d " % status), (name, got)
            assert b"aiohttp" not in got and b"Content-Length: 5" not in got, (name, got)
            assert b"Server: dlqproc" in got  # HTTP/1.0: the connection closes
        # A Host header is never echoed, nor is a preflight answered with CORS.
        host = b'evil.example"><script>x</script>'
        got = _raw(port, b"GET /login HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 ") and b"evil.example" not in got
        got = _raw(
            port,
            b"OPTIONS /api/jobs/1 HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
            b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
        )
        assert got.startswith(b"HTTP/1.1 401 ") and b"Access-Control" not in got
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Error handling request" not in err, err


def test_a_form_body_dribbled_in_is_cut_off(dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a form's head and then its body a byte at a time gets
    408 once the body timeout runs out, instead of holding one of the console's
    few connections for as long as it likes."""
    migrate(dsn)
    monkeypatch.setattr(console_app, "BODY_TIMEOUT", 0.5)
    stalled = asyncio.Event()

    async def dribble() -> AsyncIterator[bytes]:
        yield b"operator=a"
        stalled.set()
        await asyncio.sleep(60)  # the server must answer long before this
        yield b"&token=x"

    async def test(client: Client) -> None:
        page = await client.get("/login")
        assert page.status == 200
        r = await asyncio.wait_for(
            client.post(
                "/login",
                data=dribble(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ),
            timeout=30,
        )
        assert stalled.is_set()
        assert r.status == 408
        assert r.headers.get("Connection", "").lower() == "close"

    _run(dsn, TOKEN, test)
