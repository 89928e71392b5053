"""Structured logging: one JSON object per line on stderr, scrubbed of secrets.

Fields passed with `extra=` become top-level keys, so operators can filter on
`logger`, `source_subject`, `num_delivered` and the rest. Every record passes
the Scrub filter first, which hides the config's secrets (redact.Secrets) in
its message, its fields and its exception text, whatever logger made it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from dlqproc.redact import Secrets

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_encoder = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # already formatted (and scrubbed) by Scrub
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        try:
            return _encoder.encode(entry).decode()
        except UnicodeEncodeError:
            # Text that is not valid UTF-8 (a lone surrogate in an exception's
            # message) is logged escaped rather than lost.
            return _encoder.encode(_escaped(entry)).decode()


def _escaped(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


class Scrub(logging.Filter):
    """Replaces every secret in a record before any formatter sees it.

    A handler's filter, so records of every logger (nats-py's, asyncio's)
    pass it. Driver errors arrive as messages, `error` fields or exceptions;
    all of those are scrubbed, and a field of another type keeps its value
    unless its text holds a secret.
    """

    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self.secrets = secrets
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # bad %-args: logging would report it; keep the raw text
            message = str(record.msg)
        record.msg, record.args = self.secrets.scrub(message), None
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and not key.startswith("_"):
                record.__dict__[key] = self._field(value)
        if record.exc_info:
            text = self._formatter.formatException(record.exc_info)
            record.exc_info, record.exc_text = None, self.secrets.scrub(text)
        elif record.exc_text:
            record.exc_text = self.secrets.scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = self.secrets.scrub(record.stack_info)
        return True

    def _field(self, value: object) -> object:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str | list | tuple | dict):
            return self.secrets.scrub_tree(value)
        text = str(value)  # what the formatter would print for it
        scrubbed = self.secrets.scrub(text)
        return value if scrubbed == text else scrubbed


def setup(level: str, secrets: Secrets | None = None) -> None:
    """JSON lines on stderr at `level`, every record scrubbed of `secrets`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Scrub(secrets or Secrets()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py and psycopg are chatty at DEBUG; their warnings still come through.
    for noisy in ("nats", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
