"""An actor's metric families from what its monitor and publisher count."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from infra.metrics import Scrape
from producers.fleet import ActorMonitor
from producers.interfaces import EpisodeStats
from producers.metrics import ActorMetrics
from producers.publisher import PublisherStats


def _step(version: str, human: bool) -> dict:
    return {"policy_version": version, "controller": "HUMAN" if human else "POLICY", "event_time_us": 1_000_000}


def test_the_families_follow_the_monitor_and_the_publisher() -> None:
    monitor = ActorMonitor("a1")
    for i in range(7):
        monitor.on_step(_step("3", human=i < 2))
    monitor.on_episode(EpisodeStats(episode_id="e1", task="t", policy_version="3", outcome="SUCCESS", num_steps=4,
                                    interventions=1, human_steps=2))
    monitor.on_episode(EpisodeStats(episode_id="e2", task="t", policy_version="3", outcome="ABORTED", num_steps=3,
                                    interventions=0, human_steps=0))
    publisher = PublisherStats(produced=20, delivered=12, failed=1, spool_pending=4, spool_bytes=4096, spills=1,
                               paused=True)
    exporter = ActorMetrics(control_hz=30.0)
    exporter.publish(monitor.status(switches=[{"version": "3"}]), publisher, refusals=2)
    m = Scrape.parse(generate_latest(exporter.registry).decode())
    assert m.value("sop_actor_policy_version") == 3
    assert m.value("sop_actor_control_rate_target_hz") == 30
    assert m.value("sop_actor_steps_total") == 7 and m.value("sop_actor_human_steps_total") == 2
    assert m.value("sop_actor_episodes_total") == 2 and m.value("sop_actor_episodes_succeeded_total") == 1
    assert m.value("sop_actor_episodes_aborted_total") == 1 and m.value("sop_actor_takeovers_total") == 1
    assert m.value("sop_actor_refused_versions_total") == 2 and m.value("sop_actor_version_switches_total") == 1
    assert m.value("sop_actor_events_published_total") == 20 and m.value("sop_actor_events_delivered_total") == 12
    assert m.value("sop_actor_publish_errors_total") == 1
    assert m.value("sop_actor_events_in_flight") == publisher.in_flight == 3
    assert m.value("sop_actor_spool_pending_messages") == 4 and m.value("sop_actor_spool_bytes") == 4096
    assert m.value("sop_actor_paused") == 1 and m.value("sop_actor_spool_spills_total") == 1


def test_before_any_step_the_version_is_nan() -> None:
    exporter = ActorMetrics(control_hz=None)
    exporter.publish(ActorMonitor("a1").status(), None, refusals=0)
    m = Scrape.parse(generate_latest(exporter.registry).decode())
    assert math.isnan(m.value("sop_actor_policy_version")) and m.value("sop_actor_control_rate_target_hz") == 0
    assert m.value("sop_actor_events_published_total") == 0
