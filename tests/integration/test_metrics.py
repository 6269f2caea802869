"""Prometheus endpoints scraped over HTTP while the real parts run: `sop process` against the test broker and Delta,
an actor (MetaWorld robot, the real registry, every record through Kafka) and the learner on Delta tables with
poisoned rows. The counters must equal what was sent; `sop status` shows the processor's figures."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Producer

from infra.metrics import MetricsEndpoint, Scrape, announcements, scrape
from lakehouse import Lakehouse
from learner import quarantine as q
from learner.config import EncoderConfig, ModelConfig, SamplerConfig, TrainConfig
from learner.feeder import FeederConfig
from learner.metrics import LearnerMetrics
from learner.online import LearnConfig, run_learning
from learner.synthetic import HashEmbedder, fill_tables, synthetic_episode, write_rows
from producers.actor import ActorConfig
from producers.actor_runner import RunnerConfig, nothing, run_robot_process
from producers.loadgen import LoadGenConfig, iter_fleet
from producers.metrics import ActorMetrics
from producers.policies import register_policy_config
from producers.publisher import EventPublisher, PublisherConfig
from producers.registry_source import RegistrySourceConfig
from schemas.images import jpeg_pool
from sim.expert_version import register_expert_policy
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
from sim.tasks import ONLINE_SEEDS
from sop.architectures import policy_architectures
from tests.integration.processing import ProcessorProcess, count, wait_for
from tests.integration.test_actor_stack import consume_all

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def _until(condition, what: str, *, timeout_s: float = 120, alive=lambda: True):  # noqa: ANN001, ANN202
    """Poll ``condition`` (a bound on a hang, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert alive(), f"stopped before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.2)


def _endpoint(run_dir: Path, role: str, *, alive=lambda: True) -> str:  # noqa: ANN001
    found = _until(lambda: [a for a in announcements(run_dir / "metrics") if a.role == role], f"a {role} endpoint",
                   alive=alive)
    assert len(found) == 1, found
    return found[0].url


def test_the_processor_endpoint_counts_every_event_sent(kafka, topics, tmp_path) -> None:
    records = list(iter_fleet(LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=9, seed=31, min_steps=5,
                                            max_steps=30, intervention_rate=0.5)))
    sent = Counter(name for name, _ in records)
    episodes = sum(1 for name, r in records if name == "EpisodeEvent" and r["kind"] == "ENDED")
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        for name, rec in records:
            pub.publish(name, rec, key=rec["episode_id"])
        assert pub.flush(30) == 0
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(2):
        raw.produce(topics["Step"], b"\x00 garbage %d" % i, b"somebody")
    raw.flush(10)
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake).start()
    try:
        url = _endpoint(tmp_path, "processor", alive=lambda: proc.running)

        def settled() -> Scrape | None:
            m = scrape(url)
            lag = m.by("sop_processor_consumer_lag_messages", "partition", topic=topics["Step"])
            done = (m.value("sop_processor_rows_written_total", table="steps") == sent["Step"]
                    and m.value("sop_processor_dead_letters_total", reason="corrupt") == 2
                    and m.value("sop_processor_episodes_closed_total", reason="complete") == episodes
                    and len(lag) == 2 and not any(lag.values()))
            return m if done else None

        wait_for(settled, timeout_s=180, processor=proc)
        time.sleep(2)  # nothing more may arrive
        m = scrape(url)
        assert m.by("sop_processor_events_in_total", "topic") == {
            topics["Step"]: sent["Step"] + 2, topics["EpisodeEvent"]: sent["EpisodeEvent"],
            topics["InterventionEvent"]: sent["InterventionEvent"]}
        assert m.by("sop_processor_rows_written_total", "table") == {
            "steps": sent["Step"], "episodes": episodes, "interventions": sent["InterventionEvent"]}
        assert count(lake, "SELECT count(*) FROM steps") == sent["Step"]
        assert m.by("sop_processor_dead_letters_total", "reason") == {"corrupt": 2}
        assert m.by("sop_processor_episodes_closed_total", "reason") == {"complete": episodes, "forced": 0,
                                                                         "aborted": 0, "poisoned": 0}
        assert m.value("sop_processor_open_episodes") == 0
        assert m.value("sop_processor_commit_latency_seconds_count") == m.value("sop_processor_flushes_total") >= 1
        assert m.value("sop_processor_flush_failures_total") == 0
        assert m.by("sop_processor_events_counted_total", "kind") == {}

        env = {**proc.env, "COLUMNS": "250"}
        status = subprocess.run([sys.executable, "-m", "sop", "status"], env=env, capture_output=True, text=True,
                                timeout=120)
        assert status.returncode == 0, status.stderr[-3000:]
        assert f"{topics['Step']} {sent['Step'] + 2:,}" in status.stdout, status.stdout
        assert f"{sent['Step'] + sent['InterventionEvent'] + episodes:,} rows" in status.stdout, status.stdout
        assert f"{episodes} episodes closed (complete {episodes})" in status.stdout, status.stdout
        assert "corrupt 2" in status.stdout and "p0:0 p1:0" in status.stdout, status.stdout
    finally:
        proc.stop()
    assert announcements(tmp_path / "metrics") == []  # a clean stop takes its announcement away


class _Quiet:
    def waiting(self, wait_s: float, why: Exception) -> None: ...
    def switch(self, switch: object) -> None: ...
    def refusal(self, refusal: object) -> None: ...
    def status(self, status: object, publisher: object) -> None: ...

    def running(self):  # noqa: ANN201
        return nothing()


@contextmanager
def _served(registry, role: str, run_dir: Path):  # noqa: ANN001, ANN202
    endpoint = MetricsEndpoint(registry, role=role, name=f"it-{role}", host="127.0.0.1", port=0,
                               announce_dir=run_dir / "metrics").start()
    try:
        yield endpoint.url
    finally:
        endpoint.close()


def test_an_actor_endpoint_counts_its_steps_episodes_and_refusals(kafka, topics, mlflow_uri, tmp_path) -> None:
    register_expert_policy(mlflow_uri, noise_sigma=0.3, seed=1)
    metrics = ActorMetrics(control_hz=None)
    config = RunnerConfig(actor=ActorConfig(actor_id="it-actor", seed_start=ONLINE_SEEDS.start),
                          source=RegistrySourceConfig(tracking_uri=mlflow_uri, poll_interval_s=0.2,
                                                        architectures=policy_architectures()),
                          policy_wait_s=60, status_interval_s=0.1, flush_timeout_s=30)
    stop = threading.Event()
    outcome = []

    def body() -> None:
        outcome.append(run_robot_process(
            config, make_robots=lambda: [MetaWorldRobot(MetaWorldRobotConfig(task="reach-v3", image_size=32,
                                                                             max_steps=40))],
            operator=None, reporter=_Quiet(), stop_event=stop, metrics=metrics,
            make_publisher=lambda on_failure: EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics),
                                                             on_failure=on_failure, raise_on_failure=False)))

    with _served(metrics.registry, "actor", tmp_path) as url:
        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        try:
            _until(lambda: (scrape(url).value("sop_actor_episodes_total") or 0) >= 1, "a first episode",
                   alive=thread.is_alive)
            assert scrape(url).value("sop_actor_policy_version") == 1
            assert register_policy_config("no-such-architecture", {}, mlflow_uri) == "2"  # refused: not a known one
            _until(lambda: scrape(url).value("sop_actor_refused_versions_total") == 1, "the refusal",
                   alive=thread.is_alive)
            before = scrape(url).value("sop_actor_steps_total")
            _until(lambda: scrape(url).value("sop_actor_steps_total") > before, "steps after the refusal",
                   alive=thread.is_alive)
        finally:
            stop.set()
            thread.join(60)
        (done,) = outcome
        assert done.ok
        m = scrape(url)  # the last status, after the flush
    st, pub = done.status, done.publisher
    assert m.value("sop_actor_steps_total") == st.steps > 0
    assert m.value("sop_actor_episodes_total") == st.episodes >= 2  # the last one ABORTED by the stop
    # the stop aborts the episode under way, unless it landed between two episodes
    assert m.value("sop_actor_episodes_aborted_total") == st.aborted <= 1
    assert m.value("sop_actor_policy_version") == 1 and m.value("sop_actor_refused_versions_total") == 1
    assert m.value("sop_actor_control_rate_target_hz") == 0
    assert m.value("sop_actor_events_published_total") == m.value("sop_actor_events_delivered_total") == \
        pub.delivered == st.steps + 2 * st.episodes
    assert m.value("sop_actor_publish_errors_total") == 0 and m.value("sop_actor_events_in_flight") == 0
    assert len(consume_all(kafka, topics, pub.delivered)) == pub.delivered


def test_the_learner_endpoint_counts_steps_versions_and_quarantined_rows(mlflow_uri, tmp_path) -> None:
    torch.set_num_threads(1)
    lake = Lakehouse(tmp_path / "lake")
    fill_tables(lake, tasks=("drawer-open-v3",), demos_per_task=2, online_per_task=1, length=20, image_size=32)
    rows = synthetic_episode("drawer-open-v3", 20, np.random.default_rng(3), episode_id="poisoned", demo=False,
                             frames=jpeg_pool(2, 32), human_steps=range(0, 20), image_size=32)
    rows[2]["proprio"] = [float("nan")] * 39
    rows[4]["images"] = [{**rows[4]["images"][0], "data": b"not a jpeg at all"}]
    rows[6]["action"] = rows[6]["action"][:2]
    write_rows(lake, "steps", rows)
    model = ModelConfig(encoder=EncoderConfig(image_size=32, cnn_channels=(16, 32)), hidden=(32,))
    config = LearnConfig(model=model, train=TrainConfig(publish_every=10, lr=1e-3), sampler=SamplerConfig(batch_size=8),
                         feeder=FeederConfig(poll_interval_s=0.2), status_every_s=0.2, log_every=10, max_steps=30)
    metrics = LearnerMetrics()
    summary = []
    with _served(metrics.registry, "learner", tmp_path) as url:
        thread = threading.Thread(target=lambda: summary.append(run_learning(
            config, lake=lake, tracking_uri=mlflow_uri, text=HashEmbedder(), prometheus=metrics)), daemon=True)
        thread.start()
        _until(lambda: (scrape(url).value("sop_learner_steps_total") or 0) >= 1, "a first step",
               alive=thread.is_alive, timeout_s=180)
        thread.join(180)
        (done,) = summary
        m = scrape(url)
    assert done.final_step == 30 and done.versions == ["1", "2", "3"]
    assert m.value("sop_learner_steps_total") == 30 == m.value("sop_learner_step")
    assert m.value("sop_learner_step_seconds_count") == 30 == m.value("sop_learner_data_wait_seconds_count")
    assert m.value("sop_learner_step_seconds_sum") >= m.value("sop_learner_data_wait_seconds_sum") > 0
    assert m.value("sop_learner_versions_registered_total") == 3
    assert m.value("sop_learner_policy_version_registered") == 3
    assert m.by("sop_learner_quarantined_rows_total", "reason") == {
        q.PROPRIO_NON_FINITE: 1, q.IMAGE_UNDECODABLE: 1, q.ACTION_LENGTH: 1} == done.status["quarantined"]
    omega = m.by("sop_learner_omega_on", "task")
    assert list(omega) == ["drawer-open-v3"] and 0.2 <= omega["drawer-open-v3"] <= 0.8
    assert omega == done.status["omega_on"]
    assert m.value("sop_learner_buffer_rows", task="drawer-open-v3", source="offline") == 40
