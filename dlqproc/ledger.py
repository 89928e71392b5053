"""The in-flight ledger: every message from fetch until it is settled or handed back.

Pure bookkeeping, no I/O and no clock of its own: admission against the
in-flight budget (messages and bytes, `policy.plan_fetch`), the local queue in
fetch order, taking worker batches from it, release, and the values of the
queue and in-flight gauges. The supervisor keeps one ledger for all lanes, so
the budget is shared: the lanes' messages and bytes count together.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec

from dlqproc.policy import Budget, FetchPlan, plan_fetch

T = TypeVar("T")


class Entry(msgspec.Struct, Generic[T], frozen=True):
    item: T
    size: int  # bytes counted against the budget
    dispatched: float = 0.0  # monotonic time it went to a worker; 0: not yet


class Taken(msgspec.Struct, Generic[T], frozen=True):
    """A worker batch, and what expired in the queue on the way (now released)."""

    tokens: tuple[int, ...]
    expired: tuple[T, ...]
    size: int = 0  # the batch's bytes, counted in `working` until `returned`


class Gauges(msgspec.Struct, frozen=True):
    queue_length: int  # waiting for a worker
    in_flight: int  # held, from fetch to settle
    in_flight_bytes: int


class Ledger(Generic[T]):
    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._held: dict[int, Entry[T]] = {}
        self._bytes = 0
        self._queue: collections.deque[int] = collections.deque()
        # Bytes of the batches out at the workers: what their replies will
        # cost the supervisor grows with it (see Supervisor's pool budget).
        self._working = 0
        self._tokens = itertools.count(1)
        # Lanes whose next message did not fit the byte room they asked for.
        self._oversized: set[str] = set()

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, token: int) -> bool:
        return token in self._held

    def __getitem__(self, token: int) -> T:
        return self._held[token].item

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def working(self) -> int:
        """Bytes of the batches taken and not yet returned."""
        return self._working

    # -- admission

    def plan(self, lane: str, fetch_batch: int) -> FetchPlan:
        """How much `lane` may ask JetStream for now."""
        return plan_fetch(
            self.budget,
            len(self._held),
            self._bytes,
            fetch_batch,
            oversized=lane in self._oversized,
            lane_waiting=bool(self._oversized - {lane}),
        )

    def oversized(self, lane: str) -> bool:
        """The lane's next message exceeds the room; True when that is news."""
        news = lane not in self._oversized
        self._oversized.add(lane)
        return news

    def fitted(self, lane: str) -> bool:
        """The lane fetched; True if it was oversized, and other lanes held back for it."""
        was = lane in self._oversized
        self._oversized.discard(lane)
        return was

    def admit(self, item: T, size: int) -> int:
        """Hold a fetched message and queue it for a worker; its token."""
        token = next(self._tokens)
        self._held[token] = Entry(item, size)
        self._bytes += size
        self._queue.append(token)
        return token

    # -- batches

    def take(
        self, count: int, max_bytes: int, now: float, expired: Callable[[T], bool]
    ) -> Taken[T]:
        """Up to `count` queued messages, and `max_bytes` (the last one may cross it).

        A message `expired` says may not be processed is released, not taken.
        """
        tokens: list[int] = []
        dropped: list[T] = []
        size = 0
        while self._queue and len(tokens) < count and size < max_bytes:
            token = self._queue.popleft()
            entry = self._held[token]
            if expired(entry.item):
                self.release(token)
                dropped.append(entry.item)
                continue
            self._held[token] = msgspec.structs.replace(entry, dispatched=now)
            size += entry.size
            tokens.append(token)
        self._working += size
        return Taken(tuple(tokens), tuple(dropped), size)

    def returned(self, taken: Taken[T]) -> None:
        """A batch is back from the workers (its outcomes, or it was given up)."""
        self._working -= taken.size

    def unqueue(self) -> int | None:
        """The next queued message's token, out of the queue (still held), or None."""
        return self._queue.popleft() if self._queue else None

    # -- release

    def release(self, token: int) -> Entry[T] | None:
        """Forget a message (settled, handed back, or expired) and its bytes."""
        entry = self._held.pop(token, None)
        if entry is not None:
            self._bytes -= entry.size
        return entry

    def tokens(self) -> list[int]:
        return list(self._held)

    def items(self) -> list[T]:
        return [entry.item for entry in self._held.values()]

    def gauges(self) -> Gauges:
        return Gauges(len(self._queue), len(self._held), self._bytes)
