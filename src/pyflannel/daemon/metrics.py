"""Prometheus metrics of one daemon, in a registry of its own (no global state), served in
the text exposition format 0.0.4.

Our own few lines instead of prometheus_client: importing it (http.server, wsgiref, email,
urllib.request and more come along) took 5.5 MiB of RSS, a tenth of a 10k-peer daemon. The
daemon needs three metric kinds, no process collectors, and one scrape format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelValues = tuple[str, ...]
_M = TypeVar("_M", bound="_Metric")


def _number(v: float) -> str:
    """A sample value as Prometheus writes it (Go's float formatting for the specials)."""
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


def _escape(s: str, quote: bool) -> str:
    s = s.replace("\\", "\\\\").replace("\n", "\\n")
    return s.replace('"', '\\"') if quote else s


def _labels(names: tuple[str, ...], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v, True)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""
    __slots__ = ("name", "text", "labelnames")

    def __init__(self, name: str, text: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.text, self.labelnames = name, text, labelnames

    def lines(self) -> Iterator[str]:
        yield f"# HELP {self.name} {_escape(self.text, False)}"
        yield f"# TYPE {self.name} {self.kind}"
        yield from self.samples()

    def samples(self) -> Iterator[str]:
        raise NotImplementedError


class Gauge(_Metric):
    kind = "gauge"
    __slots__ = ("value",)

    def __init__(self, name: str, text: str) -> None:
        super().__init__(name, text, ())
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def samples(self) -> Iterator[str]:
        yield f"{self.name} {_number(self.value)}"


class _CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount


class Counter(_Metric):
    """A counter, with label names or without (then it counts itself)."""

    kind = "counter"
    __slots__ = ("_children",)

    def __init__(self, name: str, text: str, labelnames: tuple[str, ...] = ()) -> None:
        super().__init__(name, text, labelnames)
        self._children: dict[LabelValues, _CounterChild] = {}
        if not labelnames:
            self._children[()] = _CounterChild()

    def labels(self, **values: str) -> _CounterChild:
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {', '.join(self.labelnames)}")
        key = tuple(str(values[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels: use labels(...).inc()")
        self._children[()].inc(amount)

    def samples(self) -> Iterator[str]:
        for key, child in self._children.items():
            yield f"{self.name}{_labels(self.labelnames, key)} {_number(child.value)}"


class Histogram(_Metric):
    kind = "histogram"
    __slots__ = ("buckets", "_counts", "_sum")

    def __init__(self, name: str, text: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, text, ())
        self.buckets = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self._counts[i] += 1
                return

    def samples(self) -> Iterator[str]:
        total = 0
        for bound, n in zip(self.buckets, self._counts, strict=True):
            total += n
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {_number(total)}'
        yield f"{self.name}_count {_number(total)}"
        yield f"{self.name}_sum {_number(self._sum)}"


class Registry:
    __slots__ = ("_metrics",)

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric

    def exposition(self) -> bytes:
        """Every metric in the order it was registered, as one scrape body."""
        return "".join(line + "\n" for m in self._metrics.values()
                       for line in m.lines()).encode()


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = r = Registry()

        def add(m: _M) -> _M:
            r.add(m)
            return m

        self.leases = add(Gauge("flannel_leases", "Peer leases accepted into the routing table"))
        self.refused_leases = add(Counter("flannel_refused_leases_total",
                                          "Leases refused by validation", ("reason",)))
        self.routes = add(Gauge("flannel_routes_programmed", "Routes to peers in the kernel"))
        self.neighbours = add(Gauge("flannel_neighbours_programmed",
                                    "Permanent neighbour entries for peers (vxlan)"))
        self.fdb_entries = add(Gauge("flannel_fdb_entries_programmed",
                                     "FDB entries for peers (vxlan)"))
        self.unreachable_peers = add(Gauge(
            "flannel_unreachable_peers",
            "Peers whose route the kernel refused (not on our L2 segment)"))
        self.reconcile_seconds = add(Histogram(
            "flannel_reconcile_duration_seconds", "Duration of one reconcile pass",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)))
        self.drift_repairs = add(Counter(
            "flannel_drift_repairs_total",
            "Kernel objects restored after someone else changed them", ("kind",)))
        self.watch_reconnects = add(Counter("flannel_watch_reconnects_total",
                                            "Times the lease watch was re-established"))
        self._reconnects_seen = 0
        self.last_sync = add(Gauge("flannel_last_sync_timestamp_seconds",
                                   "Unix time of the last successful reconcile"))
        self.lease_expiration = add(Gauge("flannel_lease_expiration_timestamp_seconds",
                                          "When this node's own lease expires"))

    def observe_reconnects(self, total: int) -> None:
        """The store keeps its own count; the counter follows it."""
        if total > self._reconnects_seen:
            self.watch_reconnects.inc(total - self._reconnects_seen)
            self._reconnects_seen = total
