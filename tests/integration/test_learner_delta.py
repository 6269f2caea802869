"""The online learner on real Delta tables and the real MLflow registry, in-process.

New closed episodes appended to `steps` reach the sampler by incremental reads, and every registered version
carries its lineage (Delta versions read, algorithm, learner step, omega_on per task, parent version); in gated
mode a candidate becomes champion only once its live success (the `episodes` table) is not worse.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from lakehouse import Lakehouse
from learner import registry
from learner.config import EncoderConfig, ModelConfig, SamplerConfig, TrainConfig
from learner.feeder import FeederConfig
from learner.model import VLAPolicy
from learner.online import LearnConfig, LearnSummary, run_learning
from learner.promotion import GateConfig, promote
from learner.synthetic import (
    HashEmbedder,
    episode_summary,
    fill_tables,
    jpeg_pool,
    synthetic_episode,
    write_rows,
)

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

MODEL = ModelConfig(encoder=EncoderConfig(image_size=32, cnn_channels=(16, 32, 32)), hidden=(64, 64))
TASKS = ("drawer-open-v3", "box-close-v3")


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def versions(client: MlflowClient) -> dict[int, dict[str, str]]:
    try:
        return {int(v.version): v.tags for v in client.search_model_versions("name='sop-policy'")}
    except Exception:
        return {}


def lineage(tags: dict[str, str], key: str) -> Any:
    value = tags[f"lineage.{key}"]
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # strings are stored as they are


class Running:
    """run_learning on a thread, stopped by the test."""

    def __init__(self, config: LearnConfig, lake: Lakehouse, uri: str, status: Path) -> None:
        self.stop = threading.Event()
        self.summary: LearnSummary | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.summary = run_learning(config, lake=lake, tracking_uri=uri, text=HashEmbedder(),
                                            status_path=status, stop=self.stop)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def finish(self) -> LearnSummary:
        self.stop.set()
        self.thread.join(timeout=60)
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def config(**kw: Any) -> LearnConfig:
    defaults: dict[str, Any] = dict(model=MODEL, train=TrainConfig(publish_every=5, lr=1e-3),
                                    sampler=SamplerConfig(batch_size=16), feeder=FeederConfig(poll_interval_s=0.2),
                                    status_every_s=0.2, log_every=5)
    return LearnConfig(**{**defaults, **kw})


def test_new_episodes_are_read_incrementally_and_versions_carry_lineage(mlflow_uri: str, tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    demo_version = fill_tables(lake, tasks=TASKS, demos_per_task=2, online_per_task=0, length=20,
                               image_size=32)["demonstrations"]
    client = MlflowClient(mlflow_uri)
    status_path = tmp_path / "status.json"
    learner = Running(config(), lake, mlflow_uri, status_path)
    try:
        wait_for("a first version", lambda: versions(client))
        first = versions(client)[min(versions(client))]
        assert lineage(first, "delta_versions") == {"demonstrations": demo_version, "steps": None}
        assert lineage(first, "omega_on") == {t: 0.0 for t in TASKS}  # no online data yet

        frames = jpeg_pool(4, 32)
        online = synthetic_episode("drawer-open-v3", 20, np.random.default_rng(1), episode_id="live-1", demo=False,
                                   frames=frames, human_steps=range(5, 12), image_size=32)
        steps_version = write_rows(lake, "steps", online)
        newer = wait_for("a version that has read the new episode", lambda: [
            (v, tags) for v, tags in sorted(versions(client).items())
            if "lineage.delta_versions" in tags and lineage(tags, "delta_versions")["steps"] == steps_version])
        wait_for("a version trained with online samples", lambda: [
            tags for _, tags in versions(client).items()
            if "lineage.omega_on" in tags and lineage(tags, "omega_on")["drawer-open-v3"] >= 0.2])
    finally:
        summary = learner.finish()

    version, tags = newer[0]
    assert lineage(tags, "algorithm") == "hg-dagger" and lineage(tags, "phase") == "online"
    assert lineage(tags, "learner_step") % 5 == 0 and lineage(tags, "parent_version") == version - 1
    assert float(tags["metric.loss"]) > 0
    all_versions = versions(client)
    assert sorted(all_versions) == list(range(1, len(all_versions) + 1)) == [int(v) for v in summary.versions]
    assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == summary.versions[-1]
    steps = [lineage(t, "learner_step") for _, t in sorted(all_versions.items())]
    assert steps == sorted(steps) and steps[-1] == summary.final_step

    run = client.get_run(lineage(tags, "run_id"))
    history = client.get_metric_history(run.info.run_id, "omega_on/drawer-open-v3")
    assert history and max(m.value for m in history) >= 0.2
    assert run.info.status == "FINISHED"
    status = json.loads(status_path.read_text())
    assert status["state"] == "stopped (signal)" and status["last_version"] == summary.versions[-1]
    assert status["omega_on"]["drawer-open-v3"] >= 0.2 and status["omega_on"]["box-close-v3"] == 0.0
    assert status["buffers"]["drawer-open-v3"]["online"] == 7  # HG-DAgger keeps the human steps only
    assert status["delta_versions"]["steps"] == steps_version


def test_gated_promotion_waits_for_live_success(mlflow_uri: str, tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    fill_tables(lake, tasks=("drawer-open-v3",), demos_per_task=2, online_per_task=0, length=20, image_size=32)
    torch.manual_seed(0)
    base = registry.register_policy(VLAPolicy(MODEL), alias=None, tracking_uri=mlflow_uri, experiment="sop",
                                    embeddings=HashEmbedder().table(), lineage={"learner_step": 0})
    promote(base, name="sop-policy", tracking_uri=mlflow_uri)
    client = MlflowClient(mlflow_uri)
    learner = Running(config(promotion="gated", gate=GateConfig(min_episodes=6, check_interval_s=0.2)), lake,
                      mlflow_uri, tmp_path / "status.json")

    def alias(name: str) -> str | None:
        try:
            return str(client.get_model_version_by_alias("sop-policy", name).version)
        except Exception:
            return None

    def live(version: str, successes: int, n: int) -> None:
        write_rows(lake, "episodes", [episode_summary(f"{version}-{time.time_ns()}-{i}", task="drawer-open-v3",
                                                      policy_version=version,
                                                      outcome="SUCCESS" if i < successes else "TIMEOUT")
                                      for i in range(n)])

    try:
        candidate = wait_for("a candidate", lambda: alias("candidate"))
        assert candidate != base and alias("champion") == base
        wait_for("more versions", lambda: max(versions(client)) > int(candidate) + 1)
        assert alias("candidate") == candidate  # judged one at a time
        live(base, 3, 6)
        live(candidate, 5, 6)
        wait_for("the candidate to be promoted", lambda: alias("champion") == candidate)
        wait_for("the next candidate", lambda: alias("candidate") not in (None, candidate))
    finally:
        learner.finish()
    gate = json.loads(client.get_model_version("sop-policy", candidate).tags["sop.gate"])
    assert gate["decision"] == "promote" and gate["candidate_episodes"] == 6
