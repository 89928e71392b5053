"""Row values as PostgreSQL's COPY text format reads them: pure, run in the worker.

A row becomes one line: its values in column order, tab-separated, newline
terminated, NULL as \\N, and backslash, newline, carriage return and tab
escaped. Each value is the text PostgreSQL's input function for the column
reads, which is what jsonb_populate_recordset made of the value's JSON form:
a string as itself, a number or boolean as its JSON text, an object or array
(for jsonb columns) as its JSON text, a date, datetime, UUID or decimal as its
ISO/text form. So the supervisor hands PostgreSQL these bytes unread.

Two things PostgreSQL refuses stay refused, as with JSON: a NUL in text (a
NUL byte is invalid in a COPY line) and a \\u0000 inside a jsonb value. A lone
surrogate cannot be encoded as UTF-8 and raises here, in the worker.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec


def _refuse(value: Any) -> Any:
    raise TypeError(f"cannot store a {type(value).__name__} value")


_json = msgspec.json.Encoder(enc_hook=_refuse)
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_SPECIAL = frozenset("\\\n\r\t")
NULL = "\\N"


def _escape(text: str) -> str:
    # Most values need no escape; scanning is cheaper than translating.
    if _SPECIAL.isdisjoint(text):
        return text
    return text.translate(_ESCAPES)


def field(value: Any) -> str:
    """One value as a COPY text field (escaped)."""
    kind = type(value)
    if kind is str:
        return _escape(value)
    if value is None:
        return NULL
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    encoded = _json.encode(value)
    if kind is dict or kind is list or kind is tuple:
        return _escape(encoded.decode())
    if encoded == b"null":  # a NaN or infinite float: JSON has no such number
        return NULL
    if encoded[:1] == b'"':  # dates, datetimes, UUIDs, decimals: their text form
        return _escape(msgspec.json.decode(encoded, type=str))
    return encoded.decode()  # floats and int subclasses


def line(values: Iterable[Any]) -> bytes:
    """One row as a COPY text line. Raises TypeError or ValueError for a value
    no column can hold (UnicodeEncodeError for a lone surrogate)."""
    return ("\t".join(map(field, values)) + "\n").encode("utf-8")
