"""dlqproc on a 3-node NATS JetStream cluster: start-up that waits for JetStream, and
two replicas through a stream leader's SIGKILL and a replica's SIGKILL.

Slow: run with `python3 dev.py test -- -m slow -k cluster`.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import api

from dlqproc.broker import Broker, ConsumerSpec
from dlqproc.topology import HISTORY_BASES, REALTIME_BASES
from support.cluster import NatsCluster
from support.expected import expected, publish, stored_ids
from support.service import PIPELINE_ENV, Service, wait_until

pytestmark = pytest.mark.slow

DLQ_SETTINGS = {
    "description": "operator's DLQ: 14 days, 1 GiB",
    "max_age": 14 * 86400.0,
    "duplicate_window": 600.0,
    "max_bytes": 1 << 30,
    "num_replicas": 3,
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "cluster") as c:
        yield c


def create_streams(cluster: NatsCluster) -> None:
    """What the operator creates: R3 events streams and an R3 DLQ stream with its own limits."""
    configs = [
        api.StreamConfig(
            name="wa_events_stream",
            subjects=[f"{b}.*" for b in REALTIME_BASES],
            max_age=30 * 86400,
            num_replicas=3,
        ),
        api.StreamConfig(
            name="wa_history_events_stream",
            subjects=[f"{b}.*" for b in HISTORY_BASES],
            retention=api.RetentionPolicy.INTEREST,
            max_age=30 * 86400,
            num_replicas=3,
        ),
        api.StreamConfig(name="dlq_stream", subjects=["v1.dlq.>"], **DLQ_SETTINGS),  # type: ignore[arg-type]
    ]

    async def go(js: Any) -> None:
        deadline = time.monotonic() + 60
        for config in configs:
            while True:  # JetStream answers once the cluster has elected its meta leader
                try:
                    await js.add_stream(config)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

    cluster.run(go)


def dlq_settings(cluster: NatsCluster) -> dict[str, object]:
    async def go(js: Any) -> dict[str, object]:
        config = (await js.stream_info("dlq_stream")).config
        return {k: getattr(config, k) for k in DLQ_SETTINGS}

    return dict(cluster.run(go))


def replica(cluster: NatsCluster, dsn: str, tmp: Path, **settings: str) -> Service:
    return Service(
        cluster.url,
        dsn,
        tmp,
        **PIPELINE_ENV,
        NATS_STREAMREPLICAS="3",
        LOG_LEVEL="INFO",
        **settings,
    )


# -- start-up ----------------------------------------------------------------------


def test_startup_waits_for_jetstream_then_runs(
    cluster: NatsCluster, dsn: str, tmp_path: Path
) -> None:
    # n2 and n3 down: JetStream has no quorum, its API requests go unanswered,
    # and the first servers of NATS_URL do not accept connections at all.
    cluster.stop()
    cluster.start("n3")
    svc = replica(cluster, dsn, tmp_path, NATS_STARTUPTIMEOUT="60s")
    svc.start(wait=False)
    try:
        wait_until(lambda: svc.find("NATS topology not ready, retrying"), timeout=30)
        cluster.start("n1", "n2")
        wait_until(lambda: svc.find("Starting DLQ worker..."), timeout=60)
        assert svc.proc is not None and svc.proc.poll() is None
        svc.wait_ready(timeout=30)
    finally:
        svc.stop()


def test_startup_gives_up_after_the_startup_timeout(
    cluster: NatsCluster, dsn: str, tmp_path: Path
) -> None:
    cluster.stop()
    cluster.start("n1")
    svc = replica(cluster, dsn, tmp_path, NATS_STARTUPTIMEOUT="3s")
    svc.start(wait=False)
    assert svc.wait_exit(60) == 1
    [line] = svc.find("cannot start: NATS topology")
    assert float(line["gave_up_after"]) == 3.0 and line["error"]


# -- failover and fair sharing ------------------------------------------------------


def test_a_fetch_backoff_ends_when_nats_elects_a_new_consumer_leader(
    cluster: NatsCluster,
) -> None:
    # The mechanism behind a failover within a second of the election: the
    # pause after failed fetches ends on JetStream's leader advisory.
    spec = ConsumerSpec("elect", "elect_c", ("elect.>",), -1, 30.0, 100)

    async def setup(js: Any) -> str:
        deadline = time.monotonic() + 60
        while True:  # JetStream answers once the cluster has elected its meta leader
            try:
                await js.add_stream(name="elect", subjects=["elect.>"], num_replicas=3)
                await js.add_consumer(
                    "elect", durable_name="elect_c", ack_policy="explicit", filter_subject="elect.>"
                )
                info = await js.consumer_info("elect", "elect_c")
                return str(info.cluster.leader)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    leader = cluster.run(setup)
    survivor = next(node.url for name, node in cluster.nodes.items() if name != leader)

    async def main() -> str:
        broker = await Broker.connect(survivor, name="test-elect")
        try:
            puller = await broker.puller(spec)
            stop = asyncio.Event()
            pausing = asyncio.ensure_future(puller.backoff(3600.0, stop))
            await asyncio.sleep(0.2)
            assert not pausing.done()
            cluster.kill(leader)
            # An hour's pause, ended by the new leader's advisory (or the test fails).
            await asyncio.wait_for(pausing, 60)
            return "ended"
        finally:
            await broker.close()

    assert asyncio.run(main()) == "ended"
    # Asked of the survivors until they answer: right after an election a
    # single INFO request may go unanswered (CI saw one time out after 5 s).
    elected = cluster.await_new_leaders(leader, "elect", "elect_c", timeout=60)
    assert set(elected) == {"stream", "consumer"}


_PROGRESS = re.compile(
    r"^(message_event_service_events_processed_total|dlq_acks_success_total"
    r"|dlq_tasks_dropped_total)\{[^}]*\} ([0-9.e+]+)$",
    re.M,
)


# The realtime lane reads wa_events_stream, whose leader the test kills.
_REALTIME = re.compile(
    r"^message_event_service_events_(received|processed)_total"
    r"\{[^}]*consumer_type=\"realtime\"[^}]*\} ([0-9.e+]+)$",
    re.M,
)


class Progress:
    """Scrapes every replica's /metrics: settled messages per replica, and when they grew.

    Also, per replica, when its realtime lane last fetched (`received`) and
    settled (`processed`) more events than at the scrape before.
    """

    def __init__(self) -> None:
        self.by_replica: dict[str, dict[int, float]] = {}  # name -> incarnation -> count
        self.services: dict[str, tuple[int, Service]] = {}
        self.growth: list[float] = []  # monotonic times the total grew
        # (replica, incarnation, "received" | "processed") -> last count, and
        # the times it grew
        self.realtime: dict[tuple[str, int, str], float] = {}
        self.realtime_growth: dict[tuple[str, int, str], list[float]] = {}
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, svc: Service) -> None:
        incarnation = self.services[name][0] + 1 if name in self.services else 0
        self.services[name] = (incarnation, svc)

    def total(self) -> float:
        return sum(sum(inc.values()) for inc in self.by_replica.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, (incarnation, svc) in list(self.services.items()):
                try:
                    url = f"http://127.0.0.1:{svc.port}/metrics"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        text = resp.read().decode()
                except OSError:
                    continue
                count = sum(float(v) for _, v in _PROGRESS.findall(text))
                self.by_replica.setdefault(name, {})[incarnation] = count
                now = time.monotonic()
                for kind in ("received", "processed"):
                    value = sum(float(v) for k, v in _REALTIME.findall(text) if k == kind)
                    key = (name, incarnation, kind)
                    if value > self.realtime.get(key, 0.0):
                        self.realtime_growth.setdefault(key, []).append(now)
                    self.realtime[key] = value
            total = self.total()
            if total > self._last:
                self._last = total
                self.growth.append(time.monotonic())
            self._stop.wait(0.05)

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def first_realtime(self, kind: str, after: float, replica: str = "") -> float | None:
        """When the realtime lane (of `replica`, or of any) first `kind` events after `after`."""
        times = [
            t
            for (name, _, k), grew in self.realtime_growth.items()
            if k == kind and (not replica or name == replica)
            for t in grew
            if t > after
        ]
        return min(times, default=None)

    def longest_gap(self, start: float, end: float) -> float:
        times = [start, *(t for t in self.growth if start < t < end)]
        return max((b - a for a, b in itertools.pairwise(times)), default=end - start)


def test_two_replicas_survive_a_leader_kill_and_a_replica_kill(
    cluster: NatsCluster, dsn: str, tmp_path: Path
) -> None:
    n = 10_000
    create_streams(cluster)
    settings = {
        "NATS_DLQWORKERS": "1",
        # Two replicas on one backlog reorder more than one: an update may
        # overtake its upsert by seconds, so its retries span about 10 s.
        "NATS_DLQBASEDELAYMINUTES": "0.02",
        "NATS_DLQMAXDELAYMINUTES": "0.05",
        "NATS_DLQMAXRETRIES": "5",
        "NATS_REALTIME_ACKWAIT": "10s",
        "NATS_HISTORICAL_ACKWAIT": "10s",
    }
    a = replica(cluster, dsn, tmp_path, **settings)
    with Progress() as progress:
        # The consumers first: the history stream keeps messages only for them.
        # Both replicas are paused while the events are published, so they
        # start on the same backlog.
        progress.watch("a", a.start())
        b = replica(cluster, dsn, tmp_path, **settings)
        progress.watch("b", b.start())
        for svc in (a, b):
            svc.signal(signal.SIGSTOP)
        publish(cluster.url, n, a.env)
        for svc in (a, b):
            svc.signal(signal.SIGCONT)
        # The operator's DLQ stream came through start-up untouched.
        assert dlq_settings(cluster) == DLQ_SETTINGS

        wait_until(lambda: progress.total() > n * 0.2, timeout=120)
        leader = cluster.stream_leader("wa_events_stream")
        killed_at = time.monotonic()
        cluster.kill(leader)
        elected = cluster.await_new_leaders(
            leader, "wa_events_stream", "wa_events_realtime_consumer"
        )
        # NATS can serve the lane once both its stream and its consumer lead again.
        elected_at = max(elected.values())
        wait_until(lambda: progress.first_realtime("processed", elected_at), timeout=60)
        wait_until(lambda: progress.total() > n * 0.35, timeout=120)
        cluster.start(leader)

        wait_until(lambda: progress.total() > n * 0.6, timeout=120)
        assert b.proc is not None
        b.proc.kill()
        b.wait_exit(10)
        b = replica(cluster, dsn, tmp_path, **settings)
        progress.watch("b", b.start())

        invalid, orphans, ids = expected(n, 7, 0.02)
        try:
            wait_until(lambda: len(b.exhausted()) >= invalid + orphans, timeout=180, interval=1.0)
            b.wait_drained(timeout=120)
        finally:
            print("\nconsumers:", b.consumers(), "exhausted:", len(b.exhausted()))
        done_at = time.monotonic()
    failover = progress.longest_gap(killed_at, killed_at + 20)
    fetched_at = progress.first_realtime("received", elected_at)
    stored_at = progress.first_realtime("processed", elected_at)
    assert fetched_at is not None and stored_at is not None
    per_replica = ", ".join(
        f"{name} fetched +{t - elected_at:.2f}s"
        for name in ("a", "b")
        if (t := progress.first_realtime("received", elected_at, name)) is not None
    )
    print(
        f"\nfailover of wa_events_stream (leader {leader} SIGKILLed):"
        f" NATS elected the stream leader after {elected['stream'] - killed_at:.2f}s"
        f" and the consumer leader after {elected['consumer'] - killed_at:.2f}s;"
        f" dlqproc fetched again {fetched_at - elected_at:.2f}s"
        f" and stored {stored_at - elected_at:.2f}s after that ({per_replica});"
        f" kill to stored: {stored_at - killed_at:.2f}s"
    )
    split = {name: sum(inc.values()) for name, inc in progress.by_replica.items()}
    total = sum(split.values())
    run_gap = progress.longest_gap(killed_at - 5, done_at)
    print(
        f"\nfailover stall after SIGKILL of stream leader {leader}: {failover:.2f}s;"
        f" longest gap in progress over the run: {run_gap:.2f}s"
        f"\nwork split: "
        + ", ".join(f"{k} {v:.0f} ({v / total:.0%})" for k, v in sorted(split.items()))
        + f" of {total:.0f} settled messages"
    )

    assert stored_ids(b.query, ids) == ids
    exhausted = b.exhausted()
    reasons = [r["reason"] for r in exhausted]
    print("exhausted by reason:", Counter(reasons), "expected invalid", invalid, "orphans", orphans)
    assert reasons.count("validation") == invalid
    assert reasons.count("retries_exhausted") == orphans
    assert len(exhausted) == invalid + orphans
    # The operator's DLQ stream kept its settings through failures and restores.
    assert dlq_settings(cluster) == DLQ_SETTINGS
    a.stop()
    b.stop()
