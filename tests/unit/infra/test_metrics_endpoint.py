"""infra.metrics: the snapshot collector, reading a scrape back, histogram quantiles, and one endpoint served
over loopback HTTP (its own registry, a free port, an announcement that goes with it)."""

from __future__ import annotations

import math
import socket

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from infra.metrics import (
    MetricsEndpoint,
    MetricsPortError,
    Scrape,
    SnapshotCollector,
    announcements,
    histogram_quantile,
    new_registry,
    scrape,
    serve,
    version_number,
)


def families(snap):  # noqa: ANN001, ANN201
    c = CounterMetricFamily("sop_test_events", "events", labels=["topic"])
    for topic, n in snap["events"].items():
        c.add_metric([topic], n)
    return [c, GaugeMetricFamily("sop_test_open", "open", value=snap["open"])]


def test_a_snapshot_collector_serves_the_latest_snapshot_only() -> None:
    registry = CollectorRegistry()
    collector = SnapshotCollector(families)
    registry.register(collector)
    assert Scrape.parse(generate_latest(registry).decode()).samples == []  # nothing before the first snapshot
    collector.publish({"events": {"a": 3, "b": 4}, "open": 2})
    collector.publish({"events": {"a": 5, "b": 4}, "open": 1})
    m = Scrape.parse(generate_latest(registry).decode())
    assert m.by("sop_test_events_total", "topic") == {"a": 5.0, "b": 4.0}
    assert m.value("sop_test_events_total") == 9.0 and m.value("sop_test_events_total", topic="a") == 5.0
    assert m.value("sop_test_open") == 1.0 and m.value("sop_test_missing") is None
    assert m.value("sop_test_events_total", 0.0, topic="c") == 0.0


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    buckets = [(0.1, 5.0), (0.5, 8.0), (1.0, 8.0), (math.inf, 10.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.1 + 0.4 * 2 / 3)
    assert histogram_quantile(0.99, buckets) == 1.0  # in the +Inf bucket: the highest finite bound
    with pytest.raises(ValueError):
        histogram_quantile(1.5, buckets)


def test_quantile_of_a_real_histogram() -> None:
    registry = CollectorRegistry()
    h = Histogram("sop_test_seconds", "t", buckets=(0.01, 0.1, 1.0), registry=registry)
    for value in [0.005] * 50 + [0.05] * 45 + [0.5] * 5:
        h.observe(value)
    m = Scrape.parse(generate_latest(registry).decode())
    assert m.value("sop_test_seconds_count") == 100
    assert m.quantile(0.5, "sop_test_seconds") == pytest.approx(0.01)
    assert 0.01 < m.quantile(0.9, "sop_test_seconds") <= 0.1
    assert 0.1 < m.quantile(0.99, "sop_test_seconds") <= 1.0


def test_version_number() -> None:
    assert version_number("12") == 12.0
    assert math.isnan(version_number(None)) and math.isnan(version_number("expert"))


def test_an_endpoint_serves_its_own_registry_on_a_free_port_and_announces_itself(tmp_path) -> None:
    registries = [new_registry(), new_registry()]
    collectors = [SnapshotCollector(families), SnapshotCollector(families)]
    for registry, collector, n in zip(registries, collectors, (1, 2), strict=True):
        registry.register(collector)
        collector.publish({"events": {"steps": n}, "open": 0})
    with MetricsEndpoint(registries[0], role="processor", name="g@host-1", host="127.0.0.1", port=0,
                         announce_dir=tmp_path) as one, \
            MetricsEndpoint(registries[1], role="actor", name="actor/00", host="127.0.0.1", port=0,
                            announce_dir=tmp_path) as two:
        assert one.port != two.port and one.port > 0
        assert scrape(one.url).value("sop_test_events_total") == 1.0  # each process part its own registry
        assert scrape(two.url).value("sop_test_events_total") == 2.0
        assert scrape(one.url).value("process_start_time_seconds") > 0  # the process collector
        found = announcements(tmp_path)
        assert [(a.role, a.name, a.url) for a in found] == [("actor", "actor/00", two.url),
                                                             ("processor", "g@host-1", one.url)]
        assert all(a.alive for a in found)
        with pytest.raises(MetricsPortError, match="THE_PORT_SETTING: cannot listen"):
            serve(new_registry(), role="x", name="y", host="127.0.0.1", port=one.port, announce_dir=None,
                  setting="THE_PORT_SETTING")
    assert announcements(tmp_path) == []  # closing removes the announcement
    with pytest.raises(OSError):
        scrape(one.url, timeout_s=1)


def test_off_serves_nothing_and_a_dead_process_is_not_alive(tmp_path) -> None:
    assert serve(new_registry(), role="x", name="y", host="127.0.0.1", port="off", announce_dir=tmp_path,
                 setting="S") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "actor-a-1.json").write_text(
        f'{{"role": "actor", "name": "a", "url": "http://127.0.0.1:1/metrics", "pid": 999999999, '
        f'"host": "{socket.gethostname()}", "started_at": 0}}')
    (tmp_path / "broken.json").write_text("{")
    (found,) = announcements(tmp_path)
    assert not found.alive
