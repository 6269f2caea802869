"""`run_learning` on real Delta tables holding poisoned rows, with the real MLflow registry: it trains, every
version it registers is finite, and the quarantine counts by reason reach its status and its MLflow run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from lakehouse import Lakehouse
from learner import quarantine as q
from learner import registry
from learner.config import EncoderConfig, ModelConfig, SamplerConfig, TrainConfig
from learner.feeder import FeederConfig
from learner.online import LearnConfig, run_learning
from learner.synthetic import HashEmbedder, fill_tables, synthetic_episode, write_rows
from schemas.images import jpeg_pool

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

MODEL = ModelConfig(encoder=EncoderConfig(image_size=32, cnn_channels=(16, 32)), hidden=(32,))


def test_the_learner_trains_past_poisoned_rows_and_reports_them(mlflow_uri: str, tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    fill_tables(lake, tasks=("drawer-open-v3",), demos_per_task=2, online_per_task=1, length=20, image_size=32)
    rows = synthetic_episode("drawer-open-v3", 20, np.random.default_rng(3), episode_id="poisoned", demo=False,
                             frames=jpeg_pool(2, 32), human_steps=range(0, 20), image_size=32)
    rows[2]["proprio"] = [float("nan")] * 39
    rows[3]["proprio"] = [float("inf")] + rows[3]["proprio"][1:]
    rows[4]["images"] = [{**rows[4]["images"][0], "data": b"not a jpeg at all"}]
    rows[5]["images"] = [{**rows[5]["images"][0], "camera": "wrist"}]
    rows[6]["action"] = rows[6]["action"][:2]
    rows[7]["advantage"] = float("nan")
    write_rows(lake, "steps", rows)
    planted = {q.PROPRIO_NON_FINITE: 2, q.IMAGE_UNDECODABLE: 1, q.MISSING_CAMERA: 1, q.ACTION_LENGTH: 1,
               q.ADVANTAGE_NON_FINITE: 1}

    config = LearnConfig(model=MODEL, train=TrainConfig(publish_every=10, lr=1e-3),
                         sampler=SamplerConfig(batch_size=16), feeder=FeederConfig(poll_interval_s=0.2),
                         status_every_s=0.2, log_every=5, max_steps=30)
    summary = run_learning(config, lake=lake, tracking_uri=mlflow_uri, text=HashEmbedder(),
                           status_path=tmp_path / "status.json")

    assert summary.final_step == 30 and summary.versions == ["1", "2", "3"]
    assert summary.status["quarantined"] == planted
    assert summary.status["skipped_steps"] == 0 and summary.status["publish_refused_non_finite"] == 0
    # HG-DAgger keeps human rows: 6 of the healthy online episode, the 14 clean ones of the poisoned one.
    assert summary.status["buffers"]["drawer-open-v3"]["online"] == 6 + 14
    client = MlflowClient(mlflow_uri)
    run_id = client.get_run(summary.status["run_id"]).info.run_id
    assert client.get_metric_history(run_id, "quarantined")[-1].value == 6
    assert client.get_metric_history(run_id, "quarantined/proprio_non_finite")[-1].value == 2
    assert client.get_metric_history(run_id, "skipped_steps")[-1].value == 0
    last = registry.load_version("sop-policy", summary.versions[-1], tracking_uri=mlflow_uri)
    assert registry.non_finite_tensors(last.model) == []
    assert float(last.model.encoder.proprio_norm.count) > 0
