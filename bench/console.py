"""python -m bench console: the web console's pages on a big exhausted_events table.

Fills --rows rows (1,000,000) with bench/exhausted.py's generator on an
embedded PostgreSQL (or --postgres-dsn), serves the console in process
(dlqproc.console.app on a real TCP port) and times whole HTTP requests
(query, count, template, transfer) for the list page with no filter and with
each single filter of bench/exhausted.py's cases, the second page (keyset),
a detail page and the overview. The target is the list page under 200 ms;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp.test_utils import TestServer

from bench.exhausted import _fill, _migrate, _servers
from dlqproc.config import load
from dlqproc.console.app import Console

TOKEN = "bench-console-token-0123456789"
PAGES: dict[str, dict[str, str]] = {
    "no filter (unresolved)": {},
    "tenant=t42": {"tenant": "t42"},
    "subject=v1.messages.*.t42": {"subject": "v1.messages.*.t42"},
    "subject=v1.history.>": {"subject": "v1.history.>"},
    "reason=validation": {"reason": "validation"},
    "error=timeout": {"error": "timeout"},
    "since=2h": {"since": "2h"},
    "state=resolved": {"state": "resolved"},
    "state=all replayed=yes": {"state": "all", "replayed": "yes"},
    "replayed=no": {"replayed": "no"},
    "tenant=t42 reason=not_found since=7d": {
        "tenant": "t42",
        "reason": "not_found",
        "since": "7d",
    },
}


async def _get(session: aiohttp.ClientSession, url: str, repeats: int) -> tuple[float, str]:
    took, body = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        async with session.get(url) as r:
            body = await r.text()
            assert r.status == 200, (url, r.status, body[:300])
        took.append((time.perf_counter() - start) * 1000)
    return statistics.median(took), body


async def _pages(dsn: str, repeats: int) -> list[dict[str, Any]]:
    cfg = load(environ={"POSTGRES_DSN": dsn, "CONSOLE_TOKEN": TOKEN})
    console = Console(cfg)
    server = TestServer(console.app())
    await server.start_server()
    out: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Operator": "bench"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            base = str(server.make_url("/"))[:-1]

            async def page(name: str, path: str) -> str:
                ms, body = await _get(session, base + path, repeats)
                out.append({"page": name, "ms": ms, "bytes": len(body)})
                print(f"{name:45} {ms:8.1f} ms  {len(body):>7} bytes")
                return body

            for name, query in PAGES.items():
                await page("list " + name, "/list?" + urlencode(query))
            first = await page("list, 500 rows a page", "/list?limit=500")
            last = first.rsplit('data-id="', 1)[1].split('"', 1)[0]
            await page("list, the page after id " + last, f"/list?after={last}")
            await page("detail", f"/events/{last}")
            await page("overview", "/")
    finally:
        await server.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench console", description=__doc__)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--postgres-dsn", default="")
    p.add_argument("--nats-url", default="")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    with _servers(args) as (dsn, _):
        asyncio.run(_migrate(dsn))
        start = time.perf_counter()
        _fill(dsn, args.rows, 0)
        print(f"filled {args.rows} rows in {time.perf_counter() - start:.0f} s")
        pages = asyncio.run(_pages(dsn, args.repeats))
    if args.out:
        args.out.write_text(json.dumps({"rows": args.rows, "pages": pages}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
