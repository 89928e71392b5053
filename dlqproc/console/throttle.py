"""Failed token checks: how long a client must wait before its next guess is heard.

Pure (a clock is passed in). A client is its address (an IPv6 one by its
/64, which one host can fill at will). After FREE_FAILURES failed checks an
address waits BASE_DELAY, doubling with each further failure up to
MAX_DELAY; a success clears its count, and FORGET_AFTER without a failure
forgets it. At most MAX_ADDRESSES addresses are remembered, the one that
failed longest ago forgotten first, so an attacker with a million addresses
costs a bounded map (and each of its addresses still pays the global wait).

All addresses together spend one token bucket (GLOBAL_BURST failures, then
GLOBAL_RATE a second): past it every unknown client waits, so spreading
guesses over addresses buys no more than one a second. Addresses that signed
in recently (at most MAX_KNOWN) are exempt from that wait, so operators are
not locked out by someone else's guessing.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

FREE_FAILURES: Final = 5
BASE_DELAY: Final = 1.0
MAX_DELAY: Final = 900.0
FORGET_AFTER: Final = 3600.0
MAX_ADDRESSES: Final = 4096
GLOBAL_BURST: Final = 60.0
GLOBAL_RATE: Final = 1.0  # failures a second, once the burst is spent
MAX_KNOWN: Final = 256
KNOWN_FOR: Final = 12 * 3600.0  # a session's lifetime


@dataclass
class _Record:
    failures: int
    last: float  # when it last failed
    until: float  # when it may try again


def client_key(address: str | None) -> str:
    """Who a request is from, for throttling: an IPv4 address, an IPv6 /64."""
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "?"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Throttle:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_addresses: int = MAX_ADDRESSES,
        burst: float = GLOBAL_BURST,
        rate: float = GLOBAL_RATE,
    ) -> None:
        self._clock = clock
        self._max = max_addresses
        self._by_key: OrderedDict[str, _Record] = OrderedDict()  # oldest failure first
        self._known: OrderedDict[str, float] = OrderedDict()  # key -> when it signed in
        self._burst, self._rate = burst, rate
        self._tokens, self._filled = burst, clock()

    def __len__(self) -> int:
        return len(self._by_key) + len(self._known)

    def wait(self, address: str | None) -> float:
        """Seconds before this client's token may be checked (0: now)."""
        now = self._clock()
        key = client_key(address)
        record = self._record(key, now)
        if record is not None and record.until > now:
            return record.until - now
        if not self._is_known(key, now):
            tokens = self._refill(now)
            if tokens < 1:
                return (1 - tokens) / self._rate
        return 0.0

    def failed(self, address: str | None) -> None:
        now = self._clock()
        key = client_key(address)
        self._tokens = max(0.0, self._refill(now) - 1)
        record = self._record(key, now) or _Record(0, now, now)
        record.failures += 1
        record.last = now
        if record.failures >= FREE_FAILURES:
            delay = BASE_DELAY * 2.0 ** min(record.failures - FREE_FAILURES, 32)
            record.until = now + min(delay, MAX_DELAY)
        self._by_key[key] = record
        self._by_key.move_to_end(key)
        while len(self._by_key) > self._max:
            self._by_key.popitem(last=False)

    def succeeded(self, address: str | None) -> None:
        key = client_key(address)
        self._by_key.pop(key, None)
        self._known[key] = self._clock()
        self._known.move_to_end(key)
        while len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)

    def _record(self, key: str, now: float) -> _Record | None:
        record = self._by_key.get(key)
        if record is not None and now - record.last > FORGET_AFTER:
            del self._by_key[key]
            return None
        return record

    def _is_known(self, key: str, now: float) -> bool:
        since = self._known.get(key)
        if since is not None and now - since > KNOWN_FOR:
            del self._known[key]
            return False
        return since is not None

    def _refill(self, now: float) -> float:
        self._tokens = min(self._burst, self._tokens + (now - self._filled) * self._rate)
        self._filled = now
        return self._tokens


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))
