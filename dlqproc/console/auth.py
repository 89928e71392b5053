"""Operator sessions, the console token and CSRF tokens.

Pure (no I/O). A browser holds one session cookie: a random id naming a
session kept in memory, which carries its own CSRF token and, once the
operator has signed in, the operator's name (the audit trail's actor). Signing
in replaces the session id, so an id planted before sign-in is worthless.
Tokens are compared with hmac.compare_digest. Sessions expire and their
number is bounded, so a client minting sessions cannot grow memory.
"""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

COOKIE = "dlqproc_console"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 10_000
MIN_TOKEN = 16
# What an operator name may be: it lands in the audit trail and in pages.
_OPERATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


@dataclass
class Session:
    id: str
    csrf: str
    expires: float
    operator: str | None = None  # None: not signed in


def valid_operator(name: str) -> bool:
    return _OPERATOR.fullmatch(name) is not None


def token_ok(configured: str, given: str | None) -> bool:
    """Whether `given` is the console token (always False when none is configured)."""
    if not configured or given is None:
        return False
    return hmac.compare_digest(configured.encode(), given.encode("utf-8", "replace"))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None."""
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Sessions:
    def __init__(self, ttl: float = SESSION_TTL, limit: int = MAX_SESSIONS) -> None:
        self.ttl, self.limit = ttl, limit
        self._by_id: OrderedDict[str, Session] = OrderedDict()

    def _new(self, operator: str | None) -> Session:
        while len(self._by_id) >= self.limit:
            self._by_id.popitem(last=False)
        s = Session(
            secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time() + self.ttl, operator
        )
        self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        if s.expires < time.time():
            del self._by_id[sid]
            return None
        return s

    def anonymous(self) -> Session:
        return self._new(None)

    def sign_in(self, old: Session | None, operator: str) -> Session:
        """A new session for `operator`; the old id (if any) is dropped."""
        if old is not None:
            self._by_id.pop(old.id, None)
        return self._new(operator)

    def drop(self, s: Session) -> None:
        self._by_id.pop(s.id, None)


def csrf_ok(s: Session | None, given: str | None) -> bool:
    if s is None or not given:
        return False
    return hmac.compare_digest(s.csrf.encode(), given.encode("utf-8", "replace"))
