"""Prometheus metrics of one daemon, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class DaemonMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.leases = Gauge("flannel_leases", "Peer leases accepted into the routing table",
                            registry=r)
        self.refused_leases = Counter("flannel_refused_leases_total",
                                      "Leases refused by validation", ["reason"], registry=r)
        self.routes = Gauge("flannel_routes_programmed", "Routes to peers in the kernel",
                            registry=r)
        self.neighbours = Gauge("flannel_neighbours_programmed",
                                "Permanent neighbour entries for peers (vxlan)", registry=r)
        self.fdb_entries = Gauge("flannel_fdb_entries_programmed",
                                 "FDB entries for peers (vxlan)", registry=r)
        self.unreachable_peers = Gauge("flannel_unreachable_peers",
                                       "Peers whose route the kernel refused (not on our L2 "
                                       "segment)", registry=r)
        self.reconcile_seconds = Histogram(
            "flannel_reconcile_duration_seconds", "Duration of one reconcile pass", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.drift_repairs = Counter("flannel_drift_repairs_total",
                                     "Kernel objects restored after someone else changed them",
                                     ["kind"], registry=r)
        self.watch_reconnects = Counter("flannel_watch_reconnects_total",
                                        "Times the lease watch was re-established", registry=r)
        self._reconnects_seen = 0
        self.last_sync = Gauge("flannel_last_sync_timestamp_seconds",
                               "Unix time of the last successful reconcile", registry=r)
        self.lease_expiration = Gauge("flannel_lease_expiration_timestamp_seconds",
                                      "When this node's own lease expires", registry=r)

    def observe_reconnects(self, total: int) -> None:
        """The store keeps its own count; the counter follows it."""
        if total > self._reconnects_seen:
            self.watch_reconnects.inc(total - self._reconnects_seen)
            self._reconnects_seen = total
