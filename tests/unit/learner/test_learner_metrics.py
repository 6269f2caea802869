"""The learner's metric families from its status, and the per-step histograms."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from infra.metrics import Scrape
from learner.metrics import LearnerMetrics


def test_status_and_steps_become_metrics() -> None:
    exporter = LearnerMetrics()
    for step_ms, wait_ms in ((30.0, 1.0), (50.0, 0.2), (float("nan"), 0.1)):
        exporter.on_step({"step_ms": step_ms, "data_wait_ms": wait_ms, "loss": 0.1})
    exporter.publish({"state": "running", "step": 530, "omega_on": {"a-v3": 0.25, "b-v3": 0.8},
                      "losses": {"a-v3": {"online": 0.04, "offline": None}, "b-v3": {"online": 0.02, "offline": 0.01}},
                      "buffers": {"a-v3": {"online": 12, "offline": 300}}, "quarantined": {"image_undecodable": 2},
                      "last_version": "7", "versions_registered": 3, "publish_failures": 1, "skipped_steps": 0,
                      "prefetch_waits": 4, "feeder_errors": 0, "publish_refused_non_finite": 0})
    m = Scrape.parse(generate_latest(exporter.registry).decode())
    assert m.value("sop_learner_steps_total") == 3
    assert m.value("sop_learner_step_seconds_count") == 2  # a NaN timing is not observed
    assert m.value("sop_learner_step_seconds_sum") == 0.08
    assert m.value("sop_learner_data_wait_seconds_count") == 3
    assert m.value("sop_learner_step") == 530
    assert m.by("sop_learner_omega_on", "task") == {"a-v3": 0.25, "b-v3": 0.8}
    assert m.by("sop_learner_window_loss", "source", task="a-v3") == {"online": 0.04}  # None is left out
    assert m.value("sop_learner_buffer_rows", task="a-v3", source="offline") == 300
    assert m.by("sop_learner_quarantined_rows_total", "reason") == {"image_undecodable": 2}
    assert m.value("sop_learner_policy_version_registered") == 7
    assert m.value("sop_learner_versions_registered_total") == 3
    assert m.value("sop_learner_publish_failures_total") == 1
    assert m.value("sop_learner_prefetch_waits_total") == 4


def test_a_learner_that_has_registered_nothing_says_nan() -> None:
    exporter = LearnerMetrics()
    exporter.publish({"state": "starting", "step": 0, "last_version": None})
    m = Scrape.parse(generate_latest(exporter.registry).decode())
    assert math.isnan(m.value("sop_learner_policy_version_registered"))
    assert m.value("sop_learner_quarantined_rows_total") is None and m.value("sop_learner_steps_total") == 0
