"""Pieces of the online learner: resuming past a version a crash cut short, the status file, its settings."""

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.tracking import MlflowClient

from learner import registry
from learner.config import ConfigError, EncoderConfig, ModelConfig
from learner.model import VLAPolicy
from learner.online import LearnConfig, load_resumable, write_status

MODEL = ModelConfig(encoder=EncoderConfig(image_size=16, proprio_dim=8, cnn_channels=(8,)), hidden=(16,))


def test_resume_skips_a_version_whose_upload_was_cut_short(mlflow_uri: str) -> None:
    assert load_resumable("sop-policy", tracking_uri=mlflow_uri) is None
    torch.manual_seed(0)
    for step in (25, 50):
        registry.register_policy(VLAPolicy(MODEL), alias=None, tracking_uri=mlflow_uri, experiment="sop",
                                 lineage={"learner_step": step})
    source = MlflowClient(mlflow_uri).get_model_version("sop-policy", "2").source
    shutil.rmtree(urlparse(source).path)  # as if the learner died between creating v2 and uploading it
    resumed = load_resumable("sop-policy", tracking_uri=mlflow_uri)
    assert resumed is not None and resumed.version == "1" and resumed.lineage["learner_step"] == 25


def test_status_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "learner" / "status.json"
    write_status(path, {"step": 1, "omega_on": {"a": 0.5}})
    write_status(path, {"step": 2, "omega_on": {"a": 0.25}})
    assert json.loads(path.read_text()) == {"step": 2, "omega_on": {"a": 0.25}}
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_learn_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="promotion"):
        LearnConfig(promotion="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must differ"):
        LearnConfig(candidate_alias="champion")
