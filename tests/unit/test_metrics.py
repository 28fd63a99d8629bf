"""The daemon's own Prometheus exposition, held against prometheus_client's parser (an
independent reading of the format) and against exact text."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pyflannel.daemon.metrics import Counter, DaemonMetrics, Gauge, Histogram, Registry


def parsed(r: Registry) -> dict[str, float]:
    text = r.exposition().decode()
    return {s.name + (str(sorted(s.labels.items())) if s.labels else ""): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_exact_text() -> None:
    r = Registry()
    g = Gauge("a_gauge", "A gauge\\with a backslash\nand a newline")
    c = Counter("b_total", "Counted", ("kind",))
    h = Histogram("c_seconds", "Timed", buckets=(0.5, 1))
    for m in (g, c, h):
        r.add(m)
    g.set(3)
    c.labels(kind='say "hi"').inc(2)
    h.observe(0.25)
    h.observe(7)
    assert r.exposition().decode() == (
        "# HELP a_gauge A gauge\\\\with a backslash\\nand a newline\n"
        "# TYPE a_gauge gauge\n"
        "a_gauge 3.0\n"
        "# HELP b_total Counted\n"
        "# TYPE b_total counter\n"
        'b_total{kind="say \\"hi\\""} 2.0\n'
        "# HELP c_seconds Timed\n"
        "# TYPE c_seconds histogram\n"
        'c_seconds_bucket{le="0.5"} 1.0\n'
        'c_seconds_bucket{le="1.0"} 1.0\n'
        'c_seconds_bucket{le="+Inf"} 2.0\n'
        "c_seconds_count 2.0\n"
        "c_seconds_sum 7.25\n")


def test_the_daemon_metrics_as_a_scraper_reads_them() -> None:
    m = DaemonMetrics()
    m.leases.set(12)
    m.refused_leases.labels(reason="overlap").inc()
    m.refused_leases.labels(reason="overlap").inc()
    m.drift_repairs.labels(kind="kernel").inc(3)
    m.observe_reconnects(2)
    m.observe_reconnects(1)  # the store's count never goes back; nor does ours
    for d in (0.0004, 0.003, 0.2, 40):
        m.reconcile_seconds.observe(d)
    got = parsed(m.registry)
    assert got["flannel_leases"] == 12
    assert got["flannel_refused_leases_total[('reason', 'overlap')]"] == 2
    assert got["flannel_drift_repairs_total[('kind', 'kernel')]"] == 3
    assert got["flannel_watch_reconnects_total"] == 2
    assert got["flannel_reconcile_duration_seconds_bucket[('le', '0.001')]"] == 1
    assert got["flannel_reconcile_duration_seconds_bucket[('le', '0.005')]"] == 2
    assert got["flannel_reconcile_duration_seconds_bucket[('le', '0.25')]"] == 3
    assert got["flannel_reconcile_duration_seconds_bucket[('le', '30.0')]"] == 3
    assert got["flannel_reconcile_duration_seconds_bucket[('le', '+Inf')]"] == 4
    assert got["flannel_reconcile_duration_seconds_count"] == 4
    assert got["flannel_reconcile_duration_seconds_sum"] == pytest.approx(40.2034)
    for name in ("flannel_routes_programmed", "flannel_neighbours_programmed",
                 "flannel_fdb_entries_programmed", "flannel_unreachable_peers",
                 "flannel_last_sync_timestamp_seconds",
                 "flannel_lease_expiration_timestamp_seconds"):
        assert got[name] == 0


@given(st.text(), st.floats(allow_nan=False))
def test_any_label_value_and_gauge_value_read_back(value: str, number: float) -> None:
    r = Registry()
    c = Counter("x_total", "x", ("v",))
    g = Gauge("y", "y")
    r.add(c)
    r.add(g)
    c.labels(v=value).inc()
    g.set(number)
    got = parsed(r)
    assert got[f"x_total[('v', {value!r})]"] == 1
    assert got["y"] == number or (math.isinf(number) and got["y"] == number)


def test_misuse_is_refused() -> None:
    c = Counter("z_total", "z", ("kind",))
    with pytest.raises(ValueError, match="takes the labels kind"):
        c.labels(other="1")
    with pytest.raises(ValueError, match="has labels"):
        c.inc()
    with pytest.raises(ValueError, match="only goes up"):
        c.labels(kind="a").inc(-1)
    r = Registry()
    r.add(Gauge("g", "g"))
    with pytest.raises(ValueError, match="registered twice"):
        r.add(Gauge("g", "g"))
