"""The metrics port settings, the ports `sop run` / `sop fleet` give their children, and what `sop status` shows of
each kind of process, read from the metric families the processes serve."""

from __future__ import annotations

import time
from pathlib import Path

import click
import pytest
from prometheus_client import generate_latest

from consumers.metrics import ProcessorMetrics
from infra.metrics import Announcement, Scrape
from learner.metrics import LearnerMetrics
from producers.fleet import ActorMonitor
from producers.metrics import ActorMetrics
from producers.publisher import PublisherStats
from sop.actor_settings import load_actor_settings
from sop.learner_settings import load_learner_settings
from sop.metrics import child_ports, plan_ports, status_rows
from sop.settings import SettingsError, load_settings


@pytest.mark.parametrize(("value", "expected"), [("9101", 9101), ("0", 0), ("off", "off"), ("OFF", "off")])
def test_a_port_setting_is_a_port_zero_or_off(monkeypatch, value: str, expected: object) -> None:
    monkeypatch.setenv("SOP_PROCESSOR_METRICS_PORT", value)
    assert load_settings().processor_metrics_port == expected


@pytest.mark.parametrize("value", ["-1", "65536", "ninety", "1.5"])
def test_a_bad_port_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv("SOP_PROCESSOR_METRICS_PORT", value)
    with pytest.raises(SettingsError, match="SOP_PROCESSOR_METRICS_PORT: .*or 'off'"):
        load_settings()
    monkeypatch.delenv("SOP_PROCESSOR_METRICS_PORT")
    monkeypatch.setenv("SOP_ACTOR_METRICS_PORT", value)
    with pytest.raises(SettingsError, match="SOP_ACTOR_METRICS_PORT"):
        load_actor_settings()
    monkeypatch.setenv("SOP_LEARN_METRICS_PORT", value)
    with pytest.raises(SettingsError, match="SOP_LEARN_METRICS_PORT"):
        load_learner_settings()


def test_defaults_are_any_free_port_on_loopback() -> None:
    assert load_settings().processor_metrics_port == 0 and load_settings().metrics_host == "127.0.0.1"
    assert load_actor_settings().actor_metrics_port == 0 and load_learner_settings().learn_metrics_port == 0


def test_children_never_share_a_fixed_port() -> None:
    assert child_ports(9100, 3) == [9100, 9101, 9102]
    assert child_ports(0, 2) == [0, 0] and child_ports("off", 2) == ["off", "off"]
    assert plan_ports({"processor": (9100, 2), "learner": (9300, 1), "actor": (9200, 4)}) == {
        "processor": [9100, 9101], "learner": [9300], "actor": [9200, 9201, 9202, 9203]}
    with pytest.raises(click.ClickException, match="9101 would serve both processor 1 and actor 0"):
        plan_ports({"processor": (9100, 2), "actor": (9101, 2)})
    with pytest.raises(click.ClickException, match="below 65536"):
        child_ports(65535, 2)


def _announced(role: str, name: str) -> Announcement:
    return Announcement(role=role, name=name, url="http://127.0.0.1:1/metrics", pid=1, host="h",
                        started_at=time.time(), path=Path("x.json"))


def _text(rows: list[tuple[str, str, str]]) -> str:
    return "\n".join(" | ".join(row) for row in rows)


def test_status_shows_each_processors_figures() -> None:
    exporter = ProcessorMetrics()
    exporter.publish({"events_in": {"sop.steps": 1200, "sop.episodes": 20}, "rows_written": {"steps": 1199},
                      "episodes_closed_by": {"complete": 9, "forced": 1}, "deadletters_by_reason": {"corrupt": 1},
                      "counted": {"steps_duplicate": 3, "steps_replayed": 0}, "open_episodes": 2,
                      "lag": {"sop.steps": {"0": 5, "1": 0}}})
    for seconds in (0.02, 0.03, 0.04):
        exporter.commit(seconds)
    text = _text(status_rows(_announced("processor", "g@h-1"), Scrape.parse(generate_latest(exporter.registry).decode())))
    assert "processor g@h-1 | running" in text
    assert "  in | 1,220 | sop.episodes 20 · sop.steps 1,200" in text
    assert "1,199 rows" in text and "10 episodes closed (complete 9 · forced 1)" in text and "2 open" in text
    assert "commit p50 " in text and "ms p99 " in text
    assert "  dead letters | 1 | corrupt 1" in text and "  counted, not stored | 3 | steps_duplicate 3" in text
    assert "  lag sop.steps | 5 | p0:5 p1:0" in text


def test_status_shows_the_learners_figures() -> None:
    exporter = LearnerMetrics()
    exporter.on_step({"step_ms": 40.0, "data_wait_ms": 2.0})
    exporter.publish({"step": 41, "omega_on": {"drawer-open-v3": 0.55}, "last_version": "3",
                      "versions_registered": 2, "quarantined": {"action_length": 4}})
    text = _text(status_rows(_announced("learner", "learner@h"), Scrape.parse(generate_latest(exporter.registry).decode())))
    assert "  steps | 41 | 1 here · step 40ms (data wait 2ms) · last registered v3 (2 here, 0 failed)" in text
    assert "ω_on |  | drawer-open=0.55" in text and "  quarantined rows | 4 | action_length 4" in text


def test_status_shows_each_actors_figures() -> None:
    monitor = ActorMonitor("actor-00")
    monitor.on_step({"policy_version": "5", "controller": "POLICY", "event_time_us": 1})
    exporter = ActorMetrics(control_hz=30.0)
    exporter.publish(monitor.status(), PublisherStats(produced=3, delivered=3, spool_pending=7), refusals=1)
    text = _text(status_rows(_announced("actor", "actor-00"), Scrape.parse(generate_latest(exporter.registry).decode())))
    assert "actor actor-00 | running" in text
    assert "  acting | v5 | " in text and "of 30" in text and "1 steps" in text and "3 acked" in text
    assert "1 versions refused" in text and "spool 7 waiting" in text
