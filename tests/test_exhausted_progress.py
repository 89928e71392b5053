"""A bulk replay's progress as an operator sees it: a bar redrawn in place on
a real pseudo-terminal, plain lines when stderr is a pipe; real NATS and PostgreSQL."""

from __future__ import annotations

import io
import re

from hypothesis import given
from hypothesis import strategies as st

from dlqproc.embedded import NatsServer
from dlqproc.exhausted import progress
from dlqproc.exhausted.engine import Counts
from support.exhausted import add_stream, bulk_rows, cli, in_pty, migrate

ROWS = 600
# What the bar draws: job, done/total, percent, rate, ETA, then the counts.
BAR = re.compile(
    rb"job (\d+): (\d+)/(\d+) \( *([\d.]+)%\)  ([\d,]+) ev/s  ETA (\S+)"
    rb"  published (\d+) refused 0 failed 0 skipped 0"
)


def _job(dsn: str, own_nats: NatsServer) -> None:
    migrate(dsn)
    add_stream(own_nats.url, "EVENTS", ["v1.chats.upsert.*"])
    bulk_rows(dsn, ROWS, "acme")


def test_the_bar_is_redrawn_in_place_on_a_terminal_and_ends_with_a_final_line(
    dsn: str, own_nats: NatsServer
) -> None:
    _job(dsn, own_nats)
    code, drawn = in_pty(
        "replay", "--tenant", "acme", "--yes", "--rate", "300", dsn=dsn, nats_url=own_nats.url
    )
    assert code == 0, drawn
    text = drawn.replace(b"\r\n", b"\n")  # the terminal's own newline translation
    assert b"\rjob " in text, text
    start = text.index(b"\rjob ")
    bar, _, after = text[start:].partition(b"\n")
    draws = [m for part in bar.split(b"\r") if (m := BAR.fullmatch(part.rstrip(b" ")))]
    # Every redraw is a carriage return and the whole line again, never a newline.
    assert len(draws) == bar.count(b"\r") and len(draws) >= 3, bar
    done = [int(m[2]) for m in draws]
    assert done == sorted(done) and all(int(m[3]) == ROWS for m in draws)
    # A rate and an ETA while the job runs (300 rows a second: about two seconds).
    assert any(
        int(m[5].replace(b",", b"")) > 0 and re.fullmatch(rb"\d+[smhd]", m[6]) for m in draws
    )
    last = draws[-1]
    assert (int(last[2]), last[4]) == (ROWS, b"100.0"), bar[-300:]
    # The bar's final state stays on its own line; the summary comes after it.
    assert re.search(rb"job \d+ done: published 600, refused 0, failed 0", after), after


def test_no_bar_without_a_terminal_but_plain_lines(dsn: str, own_nats: NatsServer) -> None:
    _job(dsn, own_nats)
    out = cli(
        "replay", "--tenant", "acme", "--yes", "--rate", "300", dsn=dsn, nats_url=own_nats.url
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\r" not in out.stdout
    lines = [m for line in out.stderr.splitlines() if (m := BAR.fullmatch(line.encode()))]
    assert len(lines) >= 2, out.stderr
    done = [int(m[2]) for m in lines]
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == ROWS
    assert "published 600" in out.stdout


@given(
    total=st.integers(min_value=0, max_value=100_000),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5_000), st.floats(min_value=0, max_value=5)),
        max_size=200,
    ),
)
def test_progress_output_is_bounded_whatever_the_counts(
    total: int, steps: list[tuple[int, float]]
) -> None:
    """Plain lines: ordered, one per tenth of the job (or LINE_EVERY) at most, no
    carriage return. The bar: redraws only, one newline, at its end."""
    for kind in (progress.Lines, progress.Bar):
        out = io.StringIO()
        p = kind(out, 7, total)
        done, now = 0, p.start
        for step, gap in steps:
            done, now = min(total, done + step), now + gap
            p.counts = Counts(published=done)
            p.update(p.counts, now)
        p.end()
        text = out.getvalue()
        final = f"job 7: {done}/{total} "
        if kind is progress.Lines:
            lines = text.split("\n")
            assert "\r" not in text and lines[-1] == "" and lines[-2].startswith(final)
            seen = [int(line.split(" ")[2].split("/")[0]) for line in lines[:-1]]
            assert seen == sorted(seen)
            elapsed = now - p.start
            assert len(seen) <= progress.LINE_STEP + 2 + elapsed / progress.LINE_EVERY
        else:
            assert text.count("\n") == 1 and text.endswith("\n")
            assert text.rsplit("\r", 1)[1].startswith(final)
