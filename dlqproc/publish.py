"""Publishing many messages to JetStream fast, optionally at a fixed rate.

Used by `dlqproc publish` (the old service's `cmd/tester`). Up to `concurrency`
publishes are in flight at once, each waiting for its JetStream
acknowledgement; a rate limit spaces them out without busy-waiting; a progress
line on `progress` is redrawn at most ten times a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TextIO

import msgspec

from dlqproc.broker import Broker, Credentials, PublishFailed

Item = tuple[str, bytes, dict[str, str] | None]  # (subject, body, headers)

DEFAULT_CONCURRENCY = 256
PROGRESS_INTERVAL = 0.1


class PublishReport(msgspec.Struct, frozen=True):
    attempted: int
    acked: int
    failed: int
    seconds: float
    first_error: str = ""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.acked == self.attempted

    def summary(self) -> str:
        return (
            f"published {self.attempted}, acknowledged {self.acked},"
            f" failed {self.failed} in {self.seconds:.2f} s"
        )


class RateLimiter:
    """Token bucket of `rate` tokens a second holding at most `burst` (GCRA form).

    `acquire` sleeps until the next token is due, so a slow consumer of tokens
    never builds up more than `burst` of them and no loop spins.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        # Default burst: a tenth of a second's worth, at least one token.
        self.tolerance = max(1.0, burst if burst is not None else rate / 10) * self.interval
        self._next = 0.0  # theoretical arrival time of the next token

    async def acquire(self) -> None:
        now = time.monotonic()
        due = max(self._next, now - self.tolerance + self.interval)
        self._next = due + self.interval
        if due > now:
            await asyncio.sleep(due - now)


async def _aiter(items: Iterable[Item] | AsyncIterable[Item]) -> AsyncIterator[Item]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


class _Progress:
    def __init__(self, stream: TextIO, total: int | None, duration: float | None) -> None:
        self.stream = stream
        self.total = total
        self.duration = duration
        self.width = 0

    def draw(self, sent: int, acked: int, failed: int, elapsed: float) -> None:
        rate = acked / elapsed if elapsed > 0 else 0.0
        if self.total is not None:
            pct = 100.0 * sent / self.total if self.total else 100.0
            head = f"{sent}/{self.total} ({pct:5.1f}%)"
        elif self.duration is not None:
            head = f"{sent} sent, {elapsed:.1f}/{self.duration:g} s"
        else:
            head = f"{sent} sent"
        line = f"{head}  {rate:,.0f} ev/s  acked {acked}  failed {failed}"
        pad = max(0, self.width - len(line))
        self.width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


async def publish(
    url: str,
    items: Iterable[Item] | AsyncIterable[Item],
    rate: float | None = None,
    duration: float | None = None,
    progress: TextIO | None = None,
    *,
    total: int | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    timeout: float = 5.0,
    connect_timeout: float = 10.0,
    credentials: Credentials | None = None,
) -> PublishReport:
    """Publish every item (or until `duration` seconds have passed) and wait for the acks.

    `total`, when known, is only shown in the progress line. A connection that
    cannot be made within `connect_timeout`, or whose credentials a server
    refuses, raises ConnectionError (broker.ConnectFailed); a publish JetStream
    does not acknowledge counts as failed. `credentials` are the service's
    (config nats.user, token, files, TLS), so none need be written in `url`.
    """
    broker = await Broker.connect(
        url, name="dlqproc-publish", timeout=connect_timeout, credentials=credentials
    )
    try:
        return await _run(broker, items, rate, duration, progress, total, concurrency, timeout)
    finally:
        await broker.close()


async def _run(
    broker: Broker,
    items: Iterable[Item] | AsyncIterable[Item],
    rate: float | None,
    duration: float | None,
    progress: TextIO | None,
    total: int | None,
    concurrency: int,
    timeout: float,
) -> PublishReport:
    slots = asyncio.Semaphore(max(1, concurrency))
    limiter = RateLimiter(rate) if rate else None
    tasks: set[asyncio.Task[None]] = set()
    attempted = acked = failed = 0
    first_error = ""
    start = time.monotonic()
    deadline = start + duration if duration is not None else None

    async def one(subject: str, body: bytes, headers: dict[str, str] | None) -> None:
        nonlocal acked, failed, first_error
        try:
            await broker.publish(subject, body, headers, timeout=timeout)
        except PublishFailed as exc:
            failed += 1
            first_error = first_error or f"{subject}: {exc}"
        else:
            acked += 1
        finally:
            slots.release()

    bar = _Progress(progress, total, duration) if progress is not None else None

    async def redraw() -> None:
        assert bar is not None
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            bar.draw(attempted, acked, failed, time.monotonic() - start)

    drawer = asyncio.create_task(redraw()) if bar is not None else None
    try:
        async for subject, body, headers in _aiter(items):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if limiter is not None:
                await limiter.acquire()
                if deadline is not None and time.monotonic() >= deadline:
                    break
            await slots.acquire()
            attempted += 1
            task = asyncio.create_task(one(subject, body, headers))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        if drawer is not None:
            drawer.cancel()
        for task in tasks:
            task.cancel()
    seconds = time.monotonic() - start
    if bar is not None:
        bar.draw(attempted, acked, failed, seconds)
        bar.end()
    return PublishReport(attempted, acked, failed, seconds, first_error)
