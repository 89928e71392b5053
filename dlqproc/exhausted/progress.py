"""How a replay job shows its progress: a bar redrawn in place on a terminal,
plain lines elsewhere (a log file or a pipe must not fill with redraws).

Both take the engine's Counts through their call and end() with the job's
final counts on a line of its own.
"""

from __future__ import annotations

import time
from typing import TextIO

from dlqproc.exhausted import render
from dlqproc.exhausted.engine import Counts

REDRAW_EVERY = 0.1  # seconds between redraws of the bar
LINE_EVERY = 30.0  # at least this often a plain line, whatever the progress
LINE_STEP = 10  # and one each time another tenth of the job is done


class Progress:
    """done/total, percent, rate since the start, ETA, the counts, and why the job waits."""

    def __init__(self, stream: TextIO, job_id: int, total: int) -> None:
        self.stream, self.job_id, self.total = stream, job_id, total
        self.start = time.monotonic()
        self.base: int | None = None  # done when this process began (a resumed job)
        self.counts = Counts()

    def line(self, c: Counts, now: float) -> str:
        done = c.done
        if self.base is None:
            self.base = done
        rate = (done - self.base) / max(now - self.start, 1e-6)
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = render.age((self.total - done) / rate) if rate > 0 and self.total > done else "-"
        text = (
            f"job {self.job_id}: {done}/{self.total} ({pct:5.1f}%)  {rate:,.0f} ev/s  ETA {eta}"
            f"  published {c.published} refused {c.refused} failed {c.failed}"
            f" skipped {c.skipped}"
        )
        if c.paused:
            text += f"  PAUSED: {c.paused[:80]}"
        return text

    def __call__(self, c: Counts) -> None:
        self.counts = c
        self.update(c, time.monotonic())

    def update(self, c: Counts, now: float) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


class Bar(Progress):
    """One line, redrawn in place (carriage return, padded over the longer line before)."""

    def __init__(self, stream: TextIO, job_id: int, total: int) -> None:
        super().__init__(stream, job_id, total)
        self.width = 0
        self.last = 0.0

    def update(self, c: Counts, now: float) -> None:
        if now - self.last >= REDRAW_EVERY:
            self.last = now
            self._draw(self.line(c, now))

    def _draw(self, text: str) -> None:
        pad = max(0, self.width - len(text))
        self.width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def end(self) -> None:
        self._draw(self.line(self.counts, time.monotonic()))
        self.stream.write("\n")
        self.stream.flush()


class Lines(Progress):
    """A line each time another tenth is done, or LINE_EVERY passed."""

    def __init__(self, stream: TextIO, job_id: int, total: int) -> None:
        super().__init__(stream, job_id, total)
        self.step = -1
        self.last = self.start
        self.written: int | None = None  # the done count of the last line written

    def update(self, c: Counts, now: float) -> None:
        step = LINE_STEP * c.done // self.total if self.total else LINE_STEP
        if step > self.step or now - self.last >= LINE_EVERY:
            self.step, self.last = step, now
            self._write(c, now)

    def _write(self, c: Counts, now: float) -> None:
        text = self.line(c, now)
        # The same counts twice in a row say nothing new.
        if self.written != c.done or c.paused:
            self.stream.write(text + "\n")
            self.stream.flush()
        self.written = c.done

    def end(self) -> None:
        self._write(self.counts, time.monotonic())


def for_stream(stream: TextIO, job_id: int, total: int) -> Progress:
    """A bar when `stream` is a terminal, plain lines otherwise."""
    return Bar(stream, job_id, total) if stream.isatty() else Lines(stream, job_id, total)
