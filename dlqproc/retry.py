"""Start-up retries: the one backoff dlqproc uses while a dependency comes up.

From 0.1 s, doubling to 2 s, until a deadline; each retry logged with its
error and the wait before the next attempt. Used for PostgreSQL (the store)
and for JetStream's topology (app), so both wait the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

_T = TypeVar("_T")

FIRST_DELAY = 0.1
MAX_DELAY = 2.0


async def until_deadline(
    call: Callable[[], Awaitable[_T]],
    deadline: float,
    *,
    log: logging.Logger,
    message: str,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    give_up_on: tuple[type[Exception], ...] = (),
) -> _T:
    """`call`'s result; its error once the next wait would pass `deadline`
    (time.monotonic), or at once for an error of `give_up_on`."""
    delay = FIRST_DELAY
    while True:
        try:
            return await call()
        except give_up_on:
            raise
        except retry_on as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning(message, extra={"error": str(exc) or type(exc).__name__, "retry_in": delay})
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
