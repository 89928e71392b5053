"""Periodic checks: readiness of the dependencies, and the gauges read from them.

Every second: Postgres answers, NATS is connected, the pool is at strength.
Every few seconds: each consumer's pending counts (JetStream) and the
unresolved exhausted events per tenant (Postgres), as gauges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from dlqproc.broker import Broker
from dlqproc.metrics import Metrics
from dlqproc.pool import Pool
from dlqproc.settle import LaneRuntime
from dlqproc.store import Store, StoreUnavailable

log = logging.getLogger("dlqproc.probes")

READY_EVERY = 1.0
GAUGES_EVERY = 5.0


class Probes:
    def __init__(
        self,
        broker: Broker,
        store: Store,
        pool: Pool,
        lanes: Sequence[LaneRuntime],
        metrics: Metrics,
    ) -> None:
        self.broker, self.store, self.pool = broker, store, pool
        self.lanes = tuple(lanes)
        self.metrics = metrics
        self.postgres_ok = True
        self._tenants: set[str] = set()

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
        return found

    async def run(self) -> None:
        last_gauges = 0.0
        while True:
            self.postgres_ok = await self.store.ping()
            self.metrics.workers_alive.set(self.pool.alive)
            now = time.monotonic()
            if now - last_gauges >= GAUGES_EVERY:
                last_gauges = now
                await self._gauges()
            await asyncio.sleep(READY_EVERY)

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
                m.consumer_pending.labels(lane.lane.value).set(pending)
                m.consumer_ack_pending.labels(lane.lane.value).set(ack_pending)
        if self.postgres_ok:
            try:
                stats = await self.store.exhausted_stats()
            except StoreUnavailable:
                return
            # A tenant whose backlog was resolved drops to zero, not out of sight.
            for tenant in self._tenants - stats.keys():
                m.exhausted_unresolved.labels(tenant).set(0)
                m.exhausted_oldest_age.labels(tenant).set(0)
            for tenant, (count, age) in stats.items():
                m.exhausted_unresolved.labels(tenant).set(count)
                m.exhausted_oldest_age.labels(tenant).set(age)
            self._tenants |= stats.keys()
