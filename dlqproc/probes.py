"""Periodic checks: readiness of the dependencies and of the flow, and gauges.

Every second: Postgres answers, NATS is connected, the pool is at strength.
Every few seconds: each consumer's pending counts (JetStream), the
unresolved exhausted events per tenant and the tenants known (Postgres), as
gauges.
Readiness also asks the flow itself: a lane that has not fetched for a while
although its consumer has messages pending, and a commit failure that repeats
word for word.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from dlqproc.broker import Broker
from dlqproc.metrics import Metrics
from dlqproc.pool import Pool
from dlqproc.settle import LaneRuntime
from dlqproc.store import Store, StoreUnavailable

log = logging.getLogger("dlqproc.probes")

READY_EVERY = 1.0
GAUGES_EVERY = 5.0
REPEATED_COMMIT_FAILURES = 3


class Flow(Protocol):
    """What readiness needs to know of the supervisor."""

    # Read-only: readiness only looks.
    @property
    def last_fetch(self) -> dict[str, float]: ...  # lane -> monotonic time its fetch last returned
    @property
    def commit_failures(self) -> int: ...  # consecutive commit failures with the same error
    @property
    def commit_error(self) -> str: ...
    @property
    def fetch_failing(self) -> set[str]: ...  # lanes whose last fetch failed


class Probes:
    def __init__(
        self,
        broker: Broker,
        store: Store,
        pool: Pool,
        lanes: Sequence[LaneRuntime],
        metrics: Metrics,
        flow: Flow | None = None,
        stall_after: float = 30.0,
    ) -> None:
        self.broker, self.store, self.pool = broker, store, pool
        self.lanes = tuple(lanes)
        self.metrics = metrics
        self.flow = flow
        self.stall_after = stall_after
        self.postgres_ok = True
        self._pending: dict[str, int] = {}  # lane -> JetStream's pending count

    def problems(self) -> list[str]:
        """What keeps the service from doing its work right now (empty: ready)."""
        found = []
        if not self.broker.connected:
            found.append("nats: not connected")
        if not self.postgres_ok:
            found.append("postgres: not reachable")
        alive = self.pool.alive
        if alive < self.pool.size:
            found.append(f"workers: {alive} of {self.pool.size} running")
        if self.flow is not None:
            found.extend(self._flow_problems(self.flow))
        return found

    def _flow_problems(self, flow: Flow) -> list[str]:
        found = []
        now, limit = time.monotonic(), self.stall_after
        for lane, last in flow.last_fetch.items():
            pending = self._pending.get(lane, 0)
            if pending > 0 and now - last > limit:
                found.append(
                    f"fetch: {lane} has not fetched for {now - last:.0f}s"
                    f" with {pending} messages pending"
                )
        if flow.commit_failures >= REPEATED_COMMIT_FAILURES:
            found.append(
                f"commit: the same failure {flow.commit_failures} times in a row:"
                f" {flow.commit_error[:300]}"
            )
        return found

    async def run(self) -> None:
        last_gauges = 0.0
        while True:
            self.postgres_ok = await self.store.ping()
            self.metrics.workers_alive.set(self.pool.alive)
            if self.flow is not None:
                self._fetch_gauges(self.flow)
            now = time.monotonic()
            if now - last_gauges >= GAUGES_EVERY:
                last_gauges = now
                await self._gauges()
            await asyncio.sleep(READY_EVERY)

    def _fetch_gauges(self, flow: Flow) -> None:
        """How long each lane's fetches have been failing, for the DLQFetchStalled alert."""
        now = time.monotonic()
        for lane, last in flow.last_fetch.items():
            failing = lane in flow.fetch_failing
            self.metrics.fetch_failing_seconds.labels(lane).set(now - last if failing else 0.0)

    async def _gauges(self) -> None:
        m = self.metrics
        if self.broker.connected:
            for lane in self.lanes:
                spec = lane.puller.spec
                try:
                    pending, ack_pending = await self.broker.pending(spec.stream, spec.durable)
                except Exception as exc:
                    log.debug("consumer info failed", extra={"error": str(exc)})
                    continue
                self._pending[lane.lane.value] = pending
                m.consumer_pending.labels(lane.lane.value).set(pending)
                m.consumer_ack_pending.labels(lane.lane.value).set(ack_pending)
        if self.postgres_ok:
            try:
                stats = await self.store.exhausted_stats()
            except StoreUnavailable:
                return
            m.set_exhausted(stats)
            try:
                m.tenants_known.set(await self.store.tenants_known())
                m.set_replays(await self.store.replay_totals())
            except StoreUnavailable as exc:
                log.debug("tenant count or replay totals failed", extra={"error": str(exc)})
