"""An actor against the real stack: MetaWorld robots rendering small frames, the policy from a real MLflow
registry (followed live), the simulated operator, every record through a real Kafka broker and decoded back."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from consumers.decoding import DecodingConsumer, DecodingConsumerConfig
from infra.model_versions import LocalVersion
from producers.actor import Actor, ActorConfig
from producers.fleet import ActorMonitor
from producers.policies import register_policy_config
from producers.publisher import EventPublisher, PublisherConfig
from producers.registry_source import RegistryPolicySource, RegistrySourceConfig
from sim.expert_version import register_expert_policy
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
from sim.operator import GatedExpertOperator
from sim.tasks import ONLINE_SEEDS, instruction_for
from sop.architectures import policy_architectures

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]

TASKS = ("reach-v3", "drawer-open-v3")


@dataclass
class Running:
    actor: Actor
    source: RegistryPolicySource
    publisher: EventPublisher
    monitor: ActorMonitor

    def wait(self, what: Callable[[], bool], *, timeout_s: float = 90.0) -> None:
        """Wait for a condition (a bound on a hang, not a timing assertion)."""
        deadline = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < deadline, "the actor did not get there"
            time.sleep(0.05)

    def episodes_done(self) -> int:
        return len(self.actor.history)


@contextmanager
def running_actor(kafka, topics: dict[str, str], mlflow_uri: str) -> Iterator[Running]:  # noqa: ANN001
    robots = [MetaWorldRobot(MetaWorldRobotConfig(task=t, image_size=32, max_steps=60)) for t in TASKS]
    architectures = {**policy_architectures(), "corrupt": corrupt_weights, "wrong-shape": ActsWithTheWrongShape}
    source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=mlflow_uri, poll_interval_s=0.2,
                                                       architectures=architectures),
                                  probe=robots[0].reset(seed=10_000))
    publisher = EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics))
    monitor = ActorMonitor("it-actor")
    actor = Actor(robots, source, GatedExpertOperator(), monitor.sink(publisher),
                  ActorConfig(actor_id="it-actor", seed_start=ONLINE_SEEDS.start), on_episode=monitor.on_episode)
    source.start()
    source.wait_ready(60)
    thread = threading.Thread(target=actor.run, daemon=True)
    thread.start()
    try:
        yield Running(actor, source, publisher, monitor)
    finally:
        actor.stop()
        thread.join(60)
        source.close()
        for robot in robots:
            robot.close()
    assert not thread.is_alive()
    assert publisher.flush(30) == 0 and publisher.stats.failed == 0


def consume_all(kafka, topics: dict[str, str], count: int) -> list:  # noqa: ANN001
    consumer = DecodingConsumer(DecodingConsumerConfig(
        bootstrap=kafka.bootstrap, group_id=f"g-{uuid.uuid4().hex[:6]}",
        topics=[topics[n] for n in ("Step", "EpisodeEvent", "InterventionEvent")],
        deadletter_topic=topics["deadletter"]))
    with consumer:
        got = list(consumer.messages(timeout_s=60, max_messages=count))
    assert len(got) == count and consumer.counts.deadlettered == 0
    return got


@dataclass
class Episode:
    started: dict
    ended: dict
    steps: list[dict]
    interventions: list[dict]

    @property
    def version(self) -> str:
        return self.started["policy_version"]


def episodes_of(messages: list) -> list[Episode]:
    """Episodes in the order the actor ran them, each checked for a well-formed record stream."""
    by_id: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for m in messages:
        assert m.key == m.record["episode_id"]
        by_id[m.record["episode_id"]][m.name].append(m.record)
    episodes = []
    for episode_id, records in by_id.items():
        events = records["EpisodeEvent"]
        assert [e["kind"] for e in events] == ["STARTED", "ENDED"], episode_id
        steps = records["Step"]
        assert [s["step_index"] for s in steps] == list(range(len(steps)))  # key = episode: in order
        assert events[1]["num_steps"] == len(steps)
        episodes.append(Episode(events[0], events[1], steps, records["InterventionEvent"]))
    return sorted(episodes, key=lambda e: e.started["episode_id"])  # ids end in the actor's episode number


def test_actor_publishes_decodable_episodes_and_switches_versions_between_episodes(kafka, topics, mlflow_uri) -> None:
    register_expert_policy(mlflow_uri, noise_sigma=0.3, seed=1)
    with running_actor(kafka, topics, mlflow_uri) as run:
        run.wait(lambda: run.episodes_done() >= 2)
        register_expert_policy(mlflow_uri, noise_sigma=0.3, seed=2)  # the learner registers version 2
        run.wait(lambda: run.source.version == "2")
        switched_at = run.source.history[-1].loaded_at
        after_switch = run.episodes_done()
        run.wait(lambda: run.episodes_done() >= after_switch + 3)
    published = run.publisher.stats.delivered
    episodes = episodes_of(consume_all(kafka, topics, published))

    assert len(episodes) == len(run.actor.history) >= 5
    assert {e.started["task"] for e in episodes} == set(TASKS)
    assert {e.ended["outcome"] for e in episodes[:-1]} <= {"SUCCESS", "TIMEOUT"}
    assert sum(len(e.steps) for e in episodes) == run.monitor.status().steps
    for e in episodes:  # every step carries the version that acted, and a version holds for a whole episode
        # (the episode cut short by the stop may have no step at all)
        assert {s["policy_version"] for s in e.steps} <= {e.version} == {e.ended["policy_version"]}
        assert e.steps or e.ended["outcome"] == "ABORTED"
        assert all(s["images"][0]["width"] == 32 and s["images"][0]["encoding"] == "jpeg" for s in e.steps)
        assert all(len(s["action"]) == 4 and len(s["proprio"]) == 39 for s in e.steps)
        kinds = [i["kind"] for i in e.interventions]
        assert kinds == ["STARTED", "ENDED"] * (len(kinds) // 2)
        human = {s["step_index"] for s in e.steps if s["controller"] == "HUMAN"}
        assert all(np.isfinite(s["action"]).all() for s in e.steps) and len(human) <= len(e.steps)
    versions = [e.version for e in episodes]
    first_new = versions.index("2")
    assert versions == ["1"] * first_new + ["2"] * (len(versions) - first_new)  # switches only between episodes
    # the switch is taken at the next episode: at most the episode already starting runs the old version
    late = [e for e in episodes if e.version == "1" and e.started["event_time_us"] / 1e6 > switched_at]
    assert len(late) <= 1


def corrupt_weights(local: LocalVersion) -> object:
    """An architecture whose weights cannot be read."""
    raise RuntimeError("corrupt weights")


class ActsWithTheWrongShape:
    def __init__(self, local: LocalVersion) -> None:
        self.version = local.version

    def act(self, observation):  # type: ignore[no-untyped-def]
        return np.zeros(2, np.float32)


def register_small_vla(mlflow_uri: str) -> str:
    """A learned-looking policy version (sop-vla: safetensors weights + config + embeddings), alias left alone."""
    import torch

    from learner import registry
    from learner.config import EncoderConfig, ModelConfig
    from learner.model import VLAPolicy
    from learner.synthetic import HashEmbedder

    torch.manual_seed(0)
    model = VLAPolicy(ModelConfig(encoder=EncoderConfig(image_size=32, cnn_channels=(8, 16)), hidden=(32,)))
    texts = [instruction_for(t) for t in TASKS]
    return registry.register_policy(model.eval(), alias=None, tracking_uri=mlflow_uri, experiment="sop",
                                    embeddings=dict(zip(texts, HashEmbedder().embed(texts), strict=True)))


def stored_file(mlflow_uri: str, version: str, name: str) -> Path:
    """A file of a version where the artifact store keeps it (what someone with write access to it can change)."""
    source = MlflowClient(mlflow_uri).get_model_version_download_uri("sop-policy", version)
    return Path(source.removeprefix("file://")) / name


def test_broken_versions_are_refused_and_the_actor_keeps_acting(kafka, topics, mlflow_uri) -> None:
    register_expert_policy(mlflow_uri, noise_sigma=0.3, seed=1)
    client = MlflowClient(mlflow_uri)
    tampered = register_small_vla(mlflow_uri)  # "2": real weights, then changed in the artifact store
    weights = stored_file(mlflow_uri, tampered, "weights.safetensors")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of a tensor: still a loadable file
    weights.write_bytes(bytes(data))
    with running_actor(kafka, topics, mlflow_uri) as run:
        run.wait(lambda: run.episodes_done() >= 1)
        client.set_registered_model_alias("sop-policy", "champion", tampered)
        run.wait(lambda: tampered in run.source.refused)
        assert register_policy_config("corrupt", {}, mlflow_uri) == "3"
        run.wait(lambda: "3" in run.source.refused)
        assert register_policy_config("wrong-shape", {}, mlflow_uri) == "4"
        run.wait(lambda: "4" in run.source.refused)
        refused_at = run.source.refusals[-1].at
        before = run.episodes_done()
        run.wait(lambda: run.episodes_done() >= before + 2)
        assert run.source.version == "1" and run.source.refused_count == 3
        assert "TamperedVersion" in run.source.refused["2"] and "weights.safetensors has SHA-256" in run.source.refused["2"]
        assert "corrupt weights" in run.source.refused["3"] and "shape (2,)" in run.source.refused["4"]
        intact = register_small_vla(mlflow_uri)  # the same weights, untouched: the actor takes it
        client.set_registered_model_alias("sop-policy", "champion", intact)
        run.wait(lambda: run.source.version == intact)
        switched = run.episodes_done()
        run.wait(lambda: run.episodes_done() >= switched + 2)  # the episode under way at the switch, then one of it
    episodes = episodes_of(consume_all(kafka, topics, run.publisher.stats.delivered))
    acted = {s["policy_version"] for e in episodes for s in e.steps}
    assert acted <= {"1", intact} and "1" in acted and tampered not in acted
    assert sum(e.started["event_time_us"] / 1e6 > refused_at and e.version == "1" for e in episodes) >= 2  # kept acting
    assert any(e.version == intact and e.steps for e in episodes)
