"""Log lines about events that can arrive by the thousand: one line per period, with a count.

A flood (refused connections, failed sign-ins) must be visible in the log
without writing a line per event: the first event of a quiet spell is logged
at once, the ones after it are counted and summed up in one line per period
(on the event loop's timer, so the last burst is reported even if nothing
follows it). Samples are a few distinct values (client addresses), never more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final

EVERY: Final = 10.0  # seconds between two lines of one summary
SAMPLES: Final = 5


class Summary:
    def __init__(
        self,
        log: logging.Logger,
        message: str,
        *,
        every: float = EVERY,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log, self._message, self._every, self._level = log, message, every, level
        self._clock = clock
        self._count = 0
        self._samples: list[str] = []
        self._since: float | None = None  # when the last line was written
        self._timer: asyncio.TimerHandle | None = None
        self.total = 0  # events since start, logged or pending
        self.lines = 0  # lines written

    def add(self, sample: str = "") -> None:
        self.total += 1
        self._count += 1
        if sample and sample not in self._samples and len(self._samples) < SAMPLES:
            self._samples.append(sample)
        now = self._clock()
        if self._since is None or now - self._since >= self._every:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop: the next event writes the line
            self._timer = loop.call_later(self._since + self._every - now, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._count:
            return
        now = self._clock()
        extra: dict[str, object] = {"count": self._count, "samples": self._samples}
        if self._since is not None:
            extra["seconds"] = round(now - self._since, 1)
        self._log.log(self._level, self._message, extra=extra)
        self.lines += 1
        self._count, self._samples, self._since = 0, [], now

    def close(self) -> None:
        """Writes what is pending and stops the timer."""
        self.flush()
