"""Prometheus metrics: the names operators already use, the workers' files, and the exposition.

The series and what they count are listed in the README (Metrics, health and alerts).

The only module that imports prometheus_client. The supervisor's series (every
per-tenant one) live in its memory (`dlqproc.series`) and are written straight
to text on /metrics; their `company_id` is bounded by `server.metricsMaxTenants`
(the first N tenants keep their name, the rest are counted under `_other`).
Worker processes record with prometheus_client in multiprocess mode: each
writes its files into one directory, which the supervisor merges on /metrics.
When a worker dies its counters and histograms are folded into an archive file
and its own files removed, so worker churn neither resets a counter nor grows
the directory. Process-level series (fetches, local queue, busy workers) have
no tenant label.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest, multiprocess, values
from prometheus_client import Histogram as ProcessHistogram
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.registry import Collector

from dlqproc.series import (
    CONTENT_TYPE,
    Counter,
    CounterValue,
    Gauge,
    Histogram,
    Registry,
    TenantLabels,
)

ENV = "PROMETHEUS_MULTIPROC_DIR"
# A private directory is named after its owner's pid and holds a lock file its
# owner keeps locked for life, so a later start can tell a SIGKILLed
# replica's leftovers from a running one's (even across pid namespaces).
_PRIVATE = re.compile(r"dlqproc-metrics-(\d+)-[^/]+")
_OWNER = ".owner"
_ARCHIVE = "archive"
# server.metricsMaxTenants' default: ~40 series a tenant with both lanes busy,
# so ~20,000 series and ~2.5 MB a scrape however many tenants there are.
DEFAULT_MAX_TENANTS: Final = 500


class MetricsDir:
    """The multiprocess directory: chosen or created, prepared, compacted, rendered."""

    def __init__(self, configured: str) -> None:
        # The operator's directory is left in place (the workers' counters
        # accumulate across restarts); our own is created fresh and removed on close.
        self.owned = not configured
        self._owner: int | None = None
        if self.owned:
            remove_stale_private_dirs(Path(tempfile.gettempdir()))
            self.path = Path(tempfile.mkdtemp(prefix=f"dlqproc-metrics-{os.getpid()}-"))
            self._owner = _hold_lock(self.path / _OWNER)
        else:
            self.path = Path(configured)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # scrape vs. compaction: never both at once
        if self.owned:
            for f in self.path.glob("*.db"):
                f.unlink()
        else:
            self._drop_stale_gauges()
        # Inherited by spawned workers, whose prometheus_client reads it on
        # import; in this process it serves the handlers of an InlinePool.
        os.environ[ENV] = str(self.path)
        values.ValueClass = values.MultiProcessValue()

    def _drop_stale_gauges(self) -> None:
        # A file with our own pid is a previous run's (a container's pid 1 is
        # always 1): no metric of this process exists yet.
        for f in self.path.glob("gauge_live*_*.db"):
            pid = f.stem.rsplit("_", 1)[-1]
            if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                f.unlink()

    def process_exited(self, pid: int) -> None:
        """Fold a dead process's counters and histograms into the archive."""
        with self._lock:
            multiprocess.mark_process_dead(pid, str(self.path))
            for name in glob.glob(str(self.path / f"*_{pid}.db")):
                kind = os.path.basename(name).split("_", 1)[0]
                if kind == "gauge":  # a dead process's gauge value means nothing
                    os.unlink(name)
                    continue
                try:
                    values_ = list(MmapedDict.read_all_values_from_file(name))
                except (OSError, struct.error):
                    # Killed while creating its file: it recorded nothing.
                    values_ = []
                archive = MmapedDict(str(self.path / f"{kind}_{_ARCHIVE}.db"))
                try:
                    for key, value, timestamp, _ in values_:
                        old, _ = archive.read_value(key)
                        archive.write_value(key, old + value, timestamp)
                finally:
                    archive.close()
                os.unlink(name)

    def files(self) -> int:
        return len(list(self.path.glob("*.db")))

    def render(self, own: Registry | None = None) -> tuple[bytes, str]:
        """The exposition: the workers' merged files, then `own` (blocking: run it off the loop).

        A family of `own` wins over one of the same name in the files (an old
        version's supervisor file in an operator's directory): a scrape with
        a family twice would be refused whole.
        """
        mine = own.names() if own is not None else set()
        with self._lock:
            registry = CollectorRegistry()
            registry.register(_Files(self.path, skip=mine))
            files = generate_latest(registry)
        lines = own.expose() if own is not None else []
        if lines:
            lines.append("")
        return files + "\n".join(lines).encode(), CONTENT_TYPE

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None


def _hold_lock(path: Path) -> int:
    """An open descriptor holding an exclusive lock on `path` (released when we die).

    Not inherited by the spawned workers (O_CLOEXEC and spawn), so an orphaned
    worker never keeps a dead replica's directory looking alive.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def remove_stale_private_dirs(tmp: Path) -> list[Path]:
    """Remove private metrics directories of dlqproc processes that are gone.

    Only directories named as MetricsDir names them, owned by this user, whose
    owner no longer holds its lock (or, with no lock file, whose pid is dead):
    never another running replica's, never anything else in the temp dir.
    """
    removed = []
    for path in tmp.glob("dlqproc-metrics-*"):
        if _stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _stale(path: Path) -> bool:
    found = _PRIVATE.fullmatch(path.name)
    if found is None or path.is_symlink() or not path.is_dir():
        return False
    try:
        if path.stat().st_uid != os.getuid():
            return False
        fd = os.open(path / _OWNER, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        # Being created right now, or left without its lock: trust the pid.
        pid = int(found.group(1))
        return pid == os.getpid() or not _alive(pid)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its owner is alive and holds it
    finally:
        os.close(fd)
    return True


class _Files(Collector):
    """prometheus-client's multiprocess merge over the files that are whole.

    A process killed (or caught) while creating its file leaves it shorter than
    its header; that file holds no sample yet and must not fail the scrape.
    """

    def __init__(self, path: Path, skip: set[str]) -> None:
        self._path = path
        self._skip = skip

    def collect(self) -> Iterable[Metric]:
        files = []
        for f in self._path.glob("*.db"):
            with contextlib.suppress(OSError):
                if f.stat().st_size >= _HEADER:
                    files.append(str(f))
        merged: Iterable[Metric] = multiprocess.MultiProcessCollector.merge(files, accumulate=True)
        return [m for m in merged if m.name not in self._skip]


_HEADER = 8  # bytes: the used-size word and padding at the start of every file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _SeenTenants(TenantLabels):
    """TenantLabels that calls `first_seen` with each label value the first time it is used."""

    def __init__(self, limit: int, first_seen: Callable[[str], None]) -> None:
        super().__init__(limit)
        self._seen: set[str] = set()
        self._first_seen = first_seen

    def __call__(self, tenant: str) -> str:
        value = super().__call__(tenant)
        if value not in self._seen:
            self._seen.add(value)  # first: first_seen's own labels() calls come back here
            self._first_seen(value)
        return value


class Metrics:
    """The supervisor's series, in its memory; `registry` is what /metrics writes out."""

    def __init__(self, max_tenants: int = DEFAULT_MAX_TENANTS) -> None:
        self.tenants = _SeenTenants(max_tenants, self._zero_tenant)
        self.registry = Registry(self.tenants)
        r = self.registry
        self.fetch_requests = Counter(
            "dlq_fetch_requests", "Fetch requests made to the DLQ stream.", registry=r
        )
        self.fetch_errors = Counter(
            "dlq_fetch_errors", "DLQ fetches that failed (not empty fetches).", registry=r
        )
        self.health_refused = Counter(
            "dlq_health_connections_refused",
            "Connections to the health port closed unread: over its connection limit.",
            registry=r,
        )
        self.queue_length = Gauge(
            "dlq_queue_length",
            "DLQ messages fetched and waiting for a worker.",
            registry=r,
        )
        self.tasks_submitted = Counter(
            "dlq_tasks_submitted",
            "DLQ messages handed to the worker pool.",
            ["company_id"],
            registry=r,
        )
        self.workers_active = Gauge(
            "dlq_workers_active",
            "Worker processes busy with a batch.",
            registry=r,
        )
        self.processing_duration = Histogram(
            "dlq_processing_duration_seconds",
            "Time from handing a DLQ message to the pool until it is settled.",
            ["company_id"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.task_retries = Counter(
            "dlq_task_retries",
            "DLQ messages NAKed with a delay for another attempt.",
            ["company_id"],
            registry=r,
        )
        self.acks_success = Counter(
            "dlq_acks_success",
            "DLQ messages processed, committed and ACKed.",
            ["company_id"],
            registry=r,
        )
        self.acks_failure = Counter(
            "dlq_acks_failure",
            "DLQ messages terminated, or whose ACK/NAK/TERM failed (delayed NAKs excluded).",
            ["company_id"],
            registry=r,
        )
        self.tasks_dropped = Counter(
            "dlq_tasks_dropped", "Rows written to exhausted_events.", ["company_id"], registry=r
        )
        self.in_flight = Gauge(
            "dlq_messages_in_flight",
            "Messages held locally (queued, in workers, settling).",
            registry=r,
        )
        self.fetch_failing_seconds = Gauge(
            "dlq_fetch_failing_seconds",
            "Seconds since a lane last fetched, while its fetches fail (0: they succeed).",
            ["lane"],
            registry=r,
        )
        self.workers_alive = Gauge(
            "dlq_workers_alive",
            "Worker processes running (the pool's strength).",
            registry=r,
        )
        self.consumer_pending = Gauge(
            "dlq_consumer_pending",
            "Messages JetStream has not yet delivered to a consumer.",
            ["consumer"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "dlq_consumer_ack_pending",
            "Messages delivered to a consumer and not yet settled (incl. delayed NAKs).",
            ["consumer"],
            registry=r,
        )
        self.exhausted_unresolved = Gauge(
            "dlq_exhausted_unresolved",
            "Unresolved rows in exhausted_events.",
            ["company_id"],
            registry=r,
        )
        self.exhausted_oldest_age = Gauge(
            "dlq_exhausted_oldest_unresolved_age_seconds",
            "Age of the oldest unresolved row in exhausted_events.",
            ["company_id"],
            registry=r,
        )
        self.tenants_known = Gauge(
            "dlq_tenants_known",
            "Tenants recorded in public.dlqproc_tenants (admitted, or found existing).",
            registry=r,
        )
        self.replays = Counter(
            "dlq_replays",
            "Exhausted events replayed by operators, by result (published, refused, failed,"
            " uncertain); counted in PostgreSQL, whoever replays.",
            ["company_id", "result"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "dlq_worker_restarts", "Worker processes replaced, by reason.", ["reason"], registry=r
        )
        # Main consumers (realtime, historical).
        main_labels = ["event_type", "company_id", "consumer_type"]
        self.events_received = Counter(
            "message_event_service_events_received",
            "Events fetched by the main consumers.",
            main_labels,
            registry=r,
        )
        self.events_processed = Counter(
            "message_event_service_events_processed",
            "Events whose rows were committed and that were ACKed.",
            main_labels,
            registry=r,
        )
        self.events_failed = Counter(
            "message_event_service_events_failed",
            "Events whose processing attempt failed.",
            [*main_labels, "error_type"],
            registry=r,
        )
        self.event_duration = Histogram(
            "message_event_service_event_processing_duration_seconds",
            "Time from handing an event to the pool until it is settled.",
            main_labels,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.event_actions = Counter(
            "message_event_service_event_processing_actions",
            "What the main consumers did with each delivery, by action and error type.",
            [*main_labels, "action", "error_type"],
            registry=r,
        )

    def _zero_tenant(self, company_id: str) -> None:
        """A tenant's DLQ counters exist at 0 from when it is first seen, so that
        rate() and increase() count its first retry, ACK, failure or drop."""
        dlq = (self.task_retries, self.acks_success, self.acks_failure, self.tasks_dropped)
        for counter in dlq:
            counter.labels(company_id)

    def set_exhausted(self, stats: dict[str, tuple[int, float]]) -> None:
        """The operators' backlog from PostgreSQL: per tenant, unresolved rows and oldest age.

        A whole snapshot: a tenant whose backlog was resolved drops to zero,
        not out of sight; tenants under `_other` add their counts and keep the
        oldest age.
        """
        self.exhausted_unresolved.replace({(t,): n for t, (n, _) in stats.items()})
        self.exhausted_oldest_age.replace({(t,): age for t, (_, age) in stats.items()}, max)

    def set_replays(self, totals: dict[tuple[str, str], int]) -> None:
        """dlq_replays_total from PostgreSQL's totals ((company_id, result) -> replays).

        Replays run in short-lived processes (the CLI, the console), so they are
        counted in PostgreSQL and the service reports them like the backlog:
        every replica shows the same, restart-proof values (take max, not sum,
        across replicas). Tenants under `_other` add up; a total never goes down.
        """
        folded: dict[int, tuple[CounterValue, int]] = {}
        for (tenant, result), n in totals.items():
            child = self.replays.labels(tenant, result)
            _, seen = folded.get(id(child), (child, 0))
            folded[id(child)] = (child, seen + n)
        for child, total in folded.values():
            if total > child.value:
                child.inc(total - child.value)


class WorkerMetrics:
    """Series recorded inside the worker processes (prometheus_client, multiprocess files)."""

    def __init__(self) -> None:
        self.handler_seconds = ProcessHistogram(
            "dlq_handler_duration_seconds",
            "Time a handler took for one event, measured in the worker process.",
            ["event_type"],
            buckets=_DURATION_BUCKETS,
            registry=CollectorRegistry(),
        )
