"""The supervisor's own series: counters, gauges and histograms kept in memory, and their text.

They have prometheus_client's recording interface (`.labels(...).inc()`,
`.observe()`, `.set()`) but neither its per-sample collection nor its
multiprocess files: those cost ~30 µs a series, 5 to 20 s a scrape for 10,000
tenants, while writing the text exposition straight from these values costs
about 1 µs a line. Only the supervisor records them, on its event loop; a
scrape reads them from another thread (see `Registry.expose`).

Per-tenant series are bounded by `TenantLabels`: the first `limit` tenants a
process records keep their own `company_id` label value, every later one is
counted under `OTHER_TENANT`. The choice is fixed for the life of the process,
so every series, `_other` included, only ever grows: a counter never appears
to reset.
"""

from __future__ import annotations

import bisect
import math
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar, Final, Generic, Protocol, TypeVar

OTHER_TENANT: Final = "_other"
TENANT_LABEL: Final = "company_id"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class TenantLabels:
    """The `company_id` label value each tenant is recorded under.

    A valid tenant id starts with a letter or a digit, so a value starting with
    "_" is the service's own (`_invalid`, `_other`): it passes unchanged and
    takes no slot.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._own: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if tenant in self._own or tenant.startswith("_"):
            return tenant
        if len(self._own) < self.limit:
            self._own.add(tenant)
            return tenant
        return OTHER_TENANT

    def __len__(self) -> int:
        return len(self._own)


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self.value += amount


class GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramValue:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, the last one +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Buckets are "less than or equal": the first bound >= value.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)


class _Exposed(Protocol):
    name: str

    def expose(self, out: list[str]) -> None: ...


class Registry:
    """The families of one process, written out in registration order."""

    def __init__(self, tenants: TenantLabels | None = None) -> None:
        self.tenants = tenants
        self.families: list[_Exposed] = []

    def names(self) -> set[str]:
        return {f.name for f in self.families}

    def expose(self) -> list[str]:
        """The text exposition, as lines.

        Runs in a scrape's thread while the event loop records: each family's
        children are copied first (one C-level dict copy, atomic under the
        GIL), and a histogram's count is taken from its buckets, so a line set
        is always self-consistent even if a value moves meanwhile.
        """
        out: list[str] = []
        for family in self.families:
            family.expose(out)
        return out


class _Family(Generic[V]):
    kind: ClassVar[str]
    suffix: ClassVar[str] = ""

    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str] = (), *, registry: Registry
    ) -> None:
        self.name = name
        self.labelnames = tuple(labelnames)
        self._tenant_at = (
            self.labelnames.index(TENANT_LABEL)
            if TENANT_LABEL in self.labelnames and registry.tenants is not None
            else None
        )
        self._tenants = registry.tenants
        self._children: dict[tuple[str, ...], V] = {}
        self._prefixes: dict[tuple[str, ...], str] = {}  # rendered label sets, reused by scrapes
        self._lock = threading.Lock()  # creating a child vs. a scrape reading the prefixes
        help_text = documentation.replace("\\", r"\\").replace("\n", r"\n")
        shown = name + self.suffix
        self._head = f"# HELP {shown} {help_text}\n# TYPE {shown} {self.kind}"
        if not self.labelnames:
            self._default: V = self._child(())
        registry.families.append(self)

    def _new(self) -> V:
        raise NotImplementedError

    def labels(self, *values: str) -> V:
        child = self._children.get(values)
        if child is not None:
            return child
        key = self._key(values)
        return self._children.get(key) or self._child(key)

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        """The label values a child is kept under: the tenant bounded."""
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values!r}")
        key = [str(v) for v in values]
        if self._tenant_at is not None and self._tenants is not None:
            key[self._tenant_at] = self._tenants(key[self._tenant_at])
        return tuple(key)

    def _child(self, key: tuple[str, ...]) -> V:
        child = self._new()
        with self._lock:
            self._prefixes[key] = ",".join(
                f'{n}="{_escape(v)}"' for n, v in zip(self.labelnames, key, strict=True)
            )
            self._children[key] = child
        return child

    def expose(self, out: list[str]) -> None:
        out.append(self._head)
        with self._lock:
            children = self._children.copy()
            prefixes = self._prefixes.copy()
        for key, child in children.items():
            self._lines(out, prefixes[key], child)

    def _lines(self, out: list[str], labels: str, child: V) -> None:
        raise NotImplementedError


class Counter(_Family[CounterValue]):
    kind = "counter"
    suffix = "_total"

    def _new(self) -> CounterValue:
        return CounterValue()

    def inc(self, amount: float = 1.0) -> None:
        self._default.inc(amount)

    def _lines(self, out: list[str], labels: str, child: CounterValue) -> None:
        out.append(f"{self.name}_total{_braced(labels)} {_number(child.value)}")


class Gauge(_Family[GaugeValue]):
    kind = "gauge"

    def _new(self) -> GaugeValue:
        return GaugeValue()

    def set(self, value: float) -> None:
        self._default.set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._default.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._default.dec(amount)

    def replace(
        self,
        values: dict[tuple[str, ...], float],
        combine: Callable[[float, float], float] = operator.add,
    ) -> None:
        """Set a whole snapshot (a query's GROUP BY): every child not in it drops to 0.

        Tenants that share `_other` are folded with `combine` (a sum for
        counts, `max` for ages); a label set that left the snapshot reads 0
        rather than its last value.
        """
        folded: dict[tuple[str, ...], float] = {}
        for labels, value in values.items():
            key = self._key(labels)
            folded[key] = combine(folded[key], value) if key in folded else value
        for key in folded.keys() - self._children.keys():
            self._child(key)
        for key, child in self._children.copy().items():
            child.set(folded.get(key, 0.0))

    def _lines(self, out: list[str], labels: str, child: GaugeValue) -> None:
        out.append(f"{self.name}{_braced(labels)} {_number(child.value)}")


class Histogram(_Family[HistogramValue]):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        *,
        buckets: Sequence[float],
        registry: Registry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if b != math.inf)
        self._bounds = tuple(bounds)
        self._le = [f'le="{_number(b)}"' for b in (*bounds, math.inf)]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def observe(self, value: float) -> None:
        self._default.observe(value)

    def _lines(self, out: list[str], labels: str, child: HistogramValue) -> None:
        name, sep, braced = self.name, "," if labels else "", _braced(labels)
        total = 0
        for le, count in zip(self._le, child.counts.copy(), strict=True):
            total += count
            out.append(f"{name}_bucket{{{labels}{sep}{le}}} {total}.0")
        out.append(f"{name}_count{braced} {total}.0")
        out.append(f"{name}_sum{braced} {_number(child.sum)}")


def _braced(labels: str) -> str:
    return f"{{{labels}}}" if labels else ""


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    """A sample value as Prometheus writes it (Go's spelling of the infinities and NaN)."""
    if math.isfinite(value):
        return repr(float(value))
    if math.isnan(value):
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"
