"""The processor's Prometheus metrics: what a site scrapes from each `sop process` worker.

:func:`processor_families` maps the snapshot the shell already keeps (:meth:`consumers.processor.Metrics.snapshot`,
published after every flush) onto metric families; it is pure. :class:`ProcessorMetrics` is the registry of one
worker: that snapshot plus the commit-latency histogram, observed in the flush thread.

| metric | type | labels |
|---|---|---|
| ``sop_processor_events_in_total`` | counter | ``topic``: every event read from each input topic |
| ``sop_processor_rows_written_total`` | counter | ``table``: rows committed to each Delta table |
| ``sop_processor_dead_letters_total`` | counter | ``reason``: events sent to the dead-letter topic (``sop.reason``) |
| ``sop_processor_events_counted_total`` | counter | ``kind``: neither stored nor dead-lettered (duplicates, re-reads, …) |
| ``sop_processor_episodes_closed_total`` | counter | ``reason``: complete / forced / aborted / poisoned |
| ``sop_processor_open_episodes`` | gauge | episodes held, not closed yet |
| ``sop_processor_consumer_lag_messages`` | gauge | ``topic``, ``partition``: high watermark − committed offset |
| ``sop_processor_commit_latency_seconds`` | histogram | one Delta commit of a flush (all its tables) |
| ``sop_processor_flushes_total``, ``…_flush_failures_total``, ``…_dead_letter_send_failures_total``, ``…_value_model_errors_total`` | counter | |
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from infra.metrics import SnapshotCollector, new_registry

CLOSE_REASONS = ("complete", "forced", "aborted", "poisoned")
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def processor_families(snap: Mapping[str, Any]) -> list[Metric]:
    """Metric families of one snapshot of :meth:`consumers.processor.Metrics.snapshot` (keys it lacks are 0)."""
    events_in = CounterMetricFamily("sop_processor_events_in", "Events read from each input topic (each one ends "
                                    "stored, dead-lettered or counted)", labels=["topic"])
    for topic, n in sorted((snap.get("events_in") or {}).items()):
        events_in.add_metric([topic], n)
    rows = CounterMetricFamily("sop_processor_rows_written", "Rows committed to each Delta table", labels=["table"])
    for table, n in sorted((snap.get("rows_written") or {}).items()):
        rows.add_metric([table], n)
    dead = CounterMetricFamily("sop_processor_dead_letters", "Events sent to the dead-letter topic, by sop.reason",
                               labels=["reason"])
    for reason, n in sorted((snap.get("deadletters_by_reason") or {}).items()):
        dead.add_metric([reason], n)
    counted = CounterMetricFamily("sop_processor_events_counted", "Events neither stored nor dead-lettered: "
                                  "copies of held steps, events already stored read again, past a replay's end",
                                  labels=["kind"])
    for kind, n in sorted((snap.get("counted") or {}).items()):
        counted.add_metric([kind], n)
    closed = CounterMetricFamily("sop_processor_episodes_closed", "Episodes closed, by how: complete (end and every "
                                 "step), forced, aborted (no end), poisoned (rows could not be computed)",
                                 labels=["reason"])
    by_reason = snap.get("episodes_closed_by") or {}
    for reason in CLOSE_REASONS:
        closed.add_metric([reason], by_reason.get(reason, 0))
    lag = GaugeMetricFamily("sop_processor_consumer_lag_messages", "Messages of each assigned input partition not "
                            "committed yet (high watermark - committed offset)", labels=["topic", "partition"])
    for topic, parts in sorted((snap.get("lag") or {}).items()):
        for partition, n in sorted(parts.items(), key=lambda kv: int(kv[0])):
            lag.add_metric([topic, str(partition)], n)
    out: list[Metric] = [events_in, rows, dead, counted, closed, lag,
                         GaugeMetricFamily("sop_processor_open_episodes", "Episodes held, not closed yet",
                                           value=snap.get("open_episodes", 0))]
    for key, name, doc in (
            ("flushes", "sop_processor_flushes", "Flushes that committed to Delta"),
            ("flush_failures", "sop_processor_flush_failures", "Flushes whose Delta commit failed (retried)"),
            ("deadletters_failed", "sop_processor_dead_letter_send_failures",
             "Dead letters the broker refused (resent; the input stays unacknowledged)"),
            ("value_model_errors", "sop_processor_value_model_errors",
             "Episodes whose value-model inference failed (the running baseline was used)")):
        out.append(CounterMetricFamily(name, doc, value=snap.get(key, 0)))
    return out


class ProcessorMetrics:
    """One worker's registry: the shell's snapshot (:meth:`publish`) and the commit latency (:meth:`commit`)."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.snapshot = SnapshotCollector(processor_families)
        self.registry.register(self.snapshot)
        self.commit_latency = Histogram("sop_processor_commit_latency_seconds",
                                        "Time of one flush's Delta commit (every table it writes)",
                                        buckets=COMMIT_BUCKETS, registry=self.registry)

    def publish(self, snap: Mapping[str, Any]) -> None:
        self.snapshot.publish(snap)

    def commit(self, seconds: float) -> None:
        self.commit_latency.observe(seconds)
