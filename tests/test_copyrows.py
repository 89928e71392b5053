"""dlqproc.copyrows: values as COPY text lines (pure; PostgreSQL's reading is in test_bulk)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlqproc.copyrows import field, line

_UNESCAPE = {"\\\\": "\\", "\\n": "\n", "\\r": "\r", "\\t": "\t"}


def read(data: bytes) -> list[str | None]:
    """A COPY text line as PostgreSQL splits it (the escapes copyrows writes)."""
    text = data.decode("utf-8")
    assert text.endswith("\n") and "\n" not in text[:-1]
    return [
        None if raw == "\\N" else re.sub(r"\\[\\nrt]", lambda m: _UNESCAPE[m.group()], raw)
        for raw in text[:-1].split("\t")
    ]


scalars = st.none() | st.booleans() | st.integers() | st.text()
values = st.lists(scalars | st.dictionaries(st.text(), scalars), min_size=1, max_size=6)


@given(values)
def test_a_line_reads_back_as_each_values_text(row: list[Any]) -> None:
    expected = [
        None
        if v is None
        else v
        if isinstance(v, str)
        else ("true" if v else "false")
        if isinstance(v, bool)
        else str(v)
        if isinstance(v, int)
        else msgspec.json.encode(v).decode()
        for v in row
    ]
    assert read(line(row)) == expected


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (dt.date(2024, 2, 3), "2024-02-03"),
        (dt.datetime(2024, 2, 3, 4, 5, 6, tzinfo=dt.UTC), "2024-02-03T04:05:06Z"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (Decimal("1.50"), "1.50"),
        (1.5, "1.5"),
        (float("nan"), "\\N"),
        ([1, "a\tb"], '[1,"a\\\\tb"]'),  # JSON's escape, its backslash escaped for COPY
    ],
)
def test_other_values_are_written_in_their_text_forms(value: Any, text: str) -> None:
    assert field(value) == text


def test_values_no_column_can_hold_are_refused() -> None:
    with pytest.raises(TypeError):
        line([object()])
    with pytest.raises(UnicodeEncodeError):
        line(["\ud800"])
