"""The processor's metric families from the snapshot the shell keeps, on a machine driven by the world model."""

from __future__ import annotations

from prometheus_client import generate_latest

from consumers.machine import Kind
from consumers.metrics import ProcessorMetrics
from consumers.processor import Metrics
from infra.metrics import Scrape
from tests.unit.consumers.test_machine import publish_episode
from tests.unit.consumers.world import World


def test_the_families_count_what_the_machine_did() -> None:
    world = World()
    for k in range(4):
        publish_episode(world, f"e{k}", 3 + k)
    publish_episode(world, "endless", 2, end=False)  # aborted once the world settles
    world.publish(Kind.STEP, b"\x00 not avro", eid="x")
    world.publish(Kind.STEP, b"\x00 not avro either", eid="y")
    world.settle()
    shell_metrics = Metrics()
    shell_metrics.events_in.update({"sop.steps": 22, "sop.episodes": 9})
    shell_metrics.rows_written.update({"steps": 18, "episodes": 4})
    shell_metrics.lag = {"sop.steps": {"0": 0, "1": 3}}
    exporter = ProcessorMetrics()
    exporter.publish(shell_metrics.snapshot(world.machine))
    exporter.commit(0.02)
    exporter.commit(0.3)
    m = Scrape.parse(generate_latest(exporter.registry).decode())
    assert m.by("sop_processor_events_in_total", "topic") == {"sop.steps": 22, "sop.episodes": 9}
    assert m.by("sop_processor_rows_written_total", "table") == {"steps": 18, "episodes": 4}
    assert m.by("sop_processor_episodes_closed_total", "reason") == {"complete": 4, "forced": 0, "aborted": 1,
                                                                     "poisoned": 0}
    assert m.by("sop_processor_dead_letters_total", "reason") == {"corrupt": 2}
    assert m.value("sop_processor_open_episodes") == 0
    assert m.value("sop_processor_consumer_lag_messages", topic="sop.steps", partition="1") == 3
    assert m.value("sop_processor_commit_latency_seconds_count") == 2
    assert m.value("sop_processor_commit_latency_seconds_sum") == 0.32
    assert m.value("sop_processor_flushes_total") == 0
