"""The learner's Prometheus metrics: what a site scrapes from `sop learn` (rank 0 under torchrun).

:func:`learner_families` maps the status :func:`learner.online.run_learning` already keeps (the JSON of
``learner/status.json``) onto metric families; it is pure. :class:`LearnerMetrics` is the learner's registry: that
status (published whenever it is rewritten) plus the step-time and data-wait histograms and the step counter,
observed after every learner step.

| metric | type | labels |
|---|---|---|
| ``sop_learner_steps_total`` | counter | learner steps taken by this process |
| ``sop_learner_step_seconds`` / ``sop_learner_data_wait_seconds`` | histogram | one step (batch wait included) / the wait for its batch |
| ``sop_learner_step`` | gauge | the learner step (resumed ones included) |
| ``sop_learner_omega_on`` | gauge | ``task``: the online share of the adaptive mix |
| ``sop_learner_window_loss`` | gauge | ``task``, ``source`` (online/offline): sliding-window mean loss |
| ``sop_learner_buffer_rows`` | gauge | ``task``, ``source``: rows held to sample from |
| ``sop_learner_policy_version_registered`` | gauge | the newest version registered (or resumed from) |
| ``sop_learner_versions_registered_total``, ``…_publish_failures_total``, ``…_publish_refused_non_finite_total`` | counter | |
| ``sop_learner_quarantined_rows_total`` | counter | ``reason``: rows refused when read (learner.quarantine) |
| ``sop_learner_skipped_steps_total``, ``…_prefetch_waits_total``, ``…_feeder_errors_total`` | counter | |
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from infra.metrics import SnapshotCollector, new_registry, version_number

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def learner_families(status: Mapping[str, Any]) -> list[Metric]:
    """Metric families of one learner status (the fields of ``learner/status.json``; missing ones are 0)."""
    omega = GaugeMetricFamily("sop_learner_omega_on", "Online share of each task's samples (the adaptive mix)",
                              labels=["task"])
    for task, w in sorted((status.get("omega_on") or {}).items()):
        omega.add_metric([task], w)
    loss = GaugeMetricFamily("sop_learner_window_loss", "Sliding-window mean training loss per task and source",
                             labels=["task", "source"])
    for task, by_source in sorted((status.get("losses") or {}).items()):
        for source, value in sorted(by_source.items()):
            if _finite(value):
                loss.add_metric([task, source], value)
    buffers = GaugeMetricFamily("sop_learner_buffer_rows", "Rows held to sample from, per task and source",
                                labels=["task", "source"])
    for task, by_source in sorted((status.get("buffers") or {}).items()):
        for source, n in sorted(by_source.items()):
            buffers.add_metric([task, source], n)
    quarantined = CounterMetricFamily("sop_learner_quarantined_rows", "Rows refused when read, by reason",
                                      labels=["reason"])
    for reason, n in sorted((status.get("quarantined") or {}).items()):
        quarantined.add_metric([reason], n)
    out: list[Metric] = [
        GaugeMetricFamily("sop_learner_step", "The learner step (steps of the version resumed from included)",
                          value=status.get("step") or 0),
        GaugeMetricFamily("sop_learner_policy_version_registered", "The newest policy version registered by this "
                          "learner (or resumed from); NaN: none", value=version_number(status.get("last_version"))),
        omega, loss, buffers, quarantined]
    for key, name, doc in (
            ("versions_registered", "sop_learner_versions_registered", "Policy versions registered by this process"),
            ("publish_failures", "sop_learner_publish_failures", "Registrations that failed (retried at the next)"),
            ("publish_refused_non_finite", "sop_learner_publish_refused_non_finite",
             "Versions not registered because a weight was not finite"),
            ("skipped_steps", "sop_learner_skipped_steps", "Steps with a non-finite loss or gradient: no update"),
            ("prefetch_waits", "sop_learner_prefetch_waits", "Times the trainer found no batch ready"),
            ("feeder_errors", "sop_learner_feeder_errors", "Failed reads of the Delta tables (retried)")):
        out.append(CounterMetricFamily(name, doc, value=status.get(key) or 0))
    return out


class LearnerMetrics:
    """The learner's registry: :meth:`on_step` after every step, :meth:`publish` with every status."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.status = SnapshotCollector(learner_families)
        self.registry.register(self.status)
        self.steps = Counter("sop_learner_steps", "Learner steps taken by this process", registry=self.registry)
        self.step_seconds = Histogram("sop_learner_step_seconds", "One learner step, the wait for its batch "
                                      "included", buckets=STEP_BUCKETS, registry=self.registry)
        self.data_wait_seconds = Histogram("sop_learner_data_wait_seconds", "The wait of one step for its batch",
                                           buckets=WAIT_BUCKETS, registry=self.registry)

    def on_step(self, metrics: Mapping[str, float]) -> None:
        """One step's metrics as :meth:`learner.trainer.Learner.step` returns them (``step_ms``, ``data_wait_ms``)."""
        self.steps.inc()
        if _finite(metrics.get("step_ms")):
            self.step_seconds.observe(metrics["step_ms"] / 1e3)
        if _finite(metrics.get("data_wait_ms")):
            self.data_wait_seconds.observe(metrics["data_wait_ms"] / 1e3)

    def publish(self, status: Mapping[str, Any]) -> None:
        self.status.publish(dict(status))
