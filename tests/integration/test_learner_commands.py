"""`sop pretrain`, `sop train-value`, `sop promote` and `sop rollback` against real Delta tables and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import sim.evaluation  # noqa: F401 - at collection: triton before any test renders (see there)
from lakehouse import Lakehouse
from learner import registry
from learner.synthetic import fill_tables
from sop.cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Constant")]
SMALL = {"hidden": [32], "encoder": {"image_size": 32, "cnn_channels": [16, 32]}}


@pytest.fixture
def env(tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in {"SOP_RUN_DIR": str(tmp_path / "run"), "SOP_LAKE_URI": str(tmp_path / "lake"),
                       "SOP_MLFLOW_TRACKING_URI": mlflow_uri, "SOP_POLICY_MODEL": json.dumps(SMALL),
                       "SOP_VALUE_MODEL": json.dumps(SMALL), "SOP_PRETRAIN_STEPS": "20", "SOP_VALUE_STEPS": "20",
                       "SOP_LEARN_BATCH_SIZE": "16", "SOP_LEARN_THREADS": "1", "SOP_LEARN_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    return mlflow_uri


def sop(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def champion(uri: str, name: str = "sop-policy") -> str:
    return str(MlflowClient(uri).get_model_version_by_alias(name, "champion").version)


def test_pretrain_needs_demonstrations(env: str) -> None:
    result = CliRunner().invoke(cli, ["pretrain"])
    assert result.exit_code != 0 and "sop demos" in result.output


def test_pretrain_train_value_promote_rollback(env: str, tmp_path: Path) -> None:
    uri = env
    fill_tables(Lakehouse(tmp_path / "lake"), tasks=("drawer-open-v3", "box-close-v3"), demos_per_task=2,
                online_per_task=2, length=20, image_size=32)
    progress = tmp_path / "pretrain-progress.json"
    out = sop("pretrain", "--eval", "--eval-episodes", "1", "--tasks", "drawer-open-v3", "--progress-file", str(progress))
    assert "registered" in out and "drawer-open-v3" in out
    bar = json.loads(progress.read_text())["bars"]["behaviour cloning"]  # what `sop run` shows while it trains
    assert bar["completed"] == bar["total"] == 20 and "loss" in bar["note"]
    assert champion(uri) == "1"
    base = registry.load_version("sop-policy", "1", tracking_uri=uri)
    assert base.lineage["phase"] == "pretrain" and base.lineage["learner_step"] == 20
    assert base.lineage["delta_versions"]["demonstrations"] is not None
    assert set(base.lineage["demonstration_rows"]) == {"drawer-open-v3"}
    tags = MlflowClient(uri).get_model_version("sop-policy", "1").tags
    assert json.loads(tags["sop.eval"])["episodes_per_task"] == 1

    refused = CliRunner().invoke(cli, ["pretrain", "--algorithm", "recap", "--no-promote"])
    assert refused.exit_code != 0 and "sop train-value" in refused.output  # RECAP's pretraining needs a value model
    progress = tmp_path / "value-progress.json"
    out = sop("train-value", "--progress-file", str(progress))
    assert champion(uri, "sop-value") == "1"
    bar = json.loads(progress.read_text())["bars"]["value model"]  # what `sop run --algorithm recap` shows
    assert bar["completed"] == bar["total"] == 20 and "loss" in bar["note"]
    value = registry.load_version("sop-value", "1", tracking_uri=uri)
    assert value.lineage["episodes"] == {"demonstrations": 4, "steps": 4}  # online returns too

    out = sop("pretrain", "--algorithm", "recap", "--no-promote")
    assert "valued by sop-value v1" in out
    recap_base = registry.load_version("sop-policy", "2", tracking_uri=uri)
    assert recap_base.lineage["algorithm"] == "recap" and recap_base.lineage["value_model"] == "sop-value/1"
    assert set(recap_base.lineage["epsilons"]) == {"drawer-open-v3", "box-close-v3"}
    assert all(0.2 <= share <= 0.4 for share in recap_base.lineage["positive_share"].values())
    assert recap_base.runtime.condition == "positive"

    sop("pretrain", "--no-promote")
    assert champion(uri) == "1"
    sop("promote", "--version", "3")
    assert champion(uri) == "3"
    out = sop("rollback")
    assert champion(uri) == "1" and "pinned" in out
    assert CliRunner().invoke(cli, ["rollback"]).exit_code != 0  # nothing earlier than v1
    assert CliRunner().invoke(cli, ["promote", "--version", "7"]).exit_code != 0
