"""`dlqproc console`: the start-up checks, and serving the console until a signal.

The console refuses to start (exit 2) when it would be reachable from other
machines without a token, or with a token too short to resist guessing. It
holds at most MAX_CONNECTIONS connections (`dlqproc.listener`); a request
must arrive within KEEPALIVE of its connection or of the previous response.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
from typing import Final

import uvloop
from aiohttp import web

from dlqproc import health, redact
from dlqproc.config import Config, ConsoleConfig
from dlqproc.console import auth
from dlqproc.console.app import Console
from dlqproc.listener import Limits, Listener
from dlqproc.store.exhausted_ops import DBUnavailable

log = logging.getLogger("dlqproc.console")

MAX_CONNECTIONS: Final = 128  # a few operators' browsers, six connections each at most
KEEPALIVE: Final = 15.0  # aiohttp's default, 75 s, lets idle connections hold the places


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name could resolve to anything


def startup_problem(c: ConsoleConfig) -> str | None:
    if not 0 <= c.port <= 65535:
        return f"console.port {c.port} is not a TCP port"
    if c.token and len(c.token) < auth.MIN_TOKEN:
        return f"console.token must be at least {auth.MIN_TOKEN} characters"
    if not c.token and not loopback(c.host):
        return (
            f"refusing to listen on {c.host!r} without a token: set console.token"
            " (env CONSOLE_TOKEN) or bind console.host to 127.0.0.1"
        )
    return None


def run(cfg: Config, secrets: redact.Secrets) -> int:
    problem = startup_problem(cfg.console) or (
        None
        if (p := redact.dsn_problem(cfg.postgres.dsn)) is None
        else f"invalid config postgres.dsn: {p}"
    )
    if problem is not None:
        print(f"dlqproc console: {problem}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(_serve(cfg, secrets))
    except KeyboardInterrupt:
        return 130


async def _serve(cfg: Config, secrets: redact.Secrets) -> int:
    console = Console(cfg, secrets)
    try:
        ready = await console.db.ready()
    except DBUnavailable as exc:
        print(f"dlqproc console: {secrets.scrub(str(exc))}", file=sys.stderr)
        await console.db.close()
        return 1
    if not ready:
        print("dlqproc console: the database lacks migration 003; run `dlqproc migrate`",
              file=sys.stderr)  # fmt: skip
        await console.db.close()
        return 1
    runner = web.AppRunner(
        console.app(),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=KEEPALIVE,
        max_line_size=health.MAX_REQUEST_LINE,
        max_field_size=health.MAX_HEADER_LINE,
        max_headers=health.MAX_HEADERS,
    )
    await runner.setup()
    assert runner.server is not None
    # Malformed requests get 400/414/431 without aiohttp's name, echo or traceback.
    protocol = health.quiet_protocol(runner.server)
    listener = Listener(protocol, Limits(MAX_CONNECTIONS), log, "console")
    try:
        await listener.start(cfg.console.host, cfg.console.port)
    except OSError as exc:
        await listener.close()
        await runner.cleanup()
        print(f"dlqproc console: cannot listen: {exc}", file=sys.stderr)
        return 1
    host, port = listener.addresses[0]
    auth_note = "token required" if cfg.console.token else "loopback only, no token"
    log.info("console listening on http://%s:%d (%s)", host, port, auth_note)
    print(f"dlqproc console: listening on http://{host}:{port}/", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await listener.close()
    await runner.cleanup()
    return 0
