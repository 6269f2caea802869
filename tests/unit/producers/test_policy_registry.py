"""Registering the expert stand-in in a real local MLflow and loading it back as a Policy."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from producers.interfaces import Policy
from producers.policies import load_policy_from_registry, parse_model_uri
from sim.expert import expert_action
from sim.expert_pyfunc import ExpertPyfunc, register_expert_policy
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

pytestmark = pytest.mark.filterwarnings("ignore")


def test_parse_model_uri() -> None:
    assert parse_model_uri("models:/sop-policy@champion") == ("sop-policy", None, "champion")
    assert parse_model_uri("models:/sop-policy/3") == ("sop-policy", "3", None)
    with pytest.raises(ValueError):
        parse_model_uri("runs:/abc/policy")
    with pytest.raises(ValueError):
        parse_model_uri("models:/sop-policy/latest")


def test_register_expert_then_load_by_alias_and_act(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking_before = mlflow.get_tracking_uri()
    with pytest.raises(ValueError, match="artifact_location"):
        register_expert_policy(uri, experiment="fresh")  # would scatter artifacts in ./mlruns
    first = register_expert_policy(uri, noise_sigma=0.0, artifact_location=str(tmp_path / "art"))
    second = register_expert_policy(uri, noise_sigma=0.0, alias=None)
    assert (first, second) == ("1", "2")
    assert mlflow.get_tracking_uri() == tracking_before  # the process-wide setting is not touched

    policy = load_policy_from_registry("models:/sop-policy@champion", tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    assert isinstance(policy, Policy) and isinstance(policy, ExpertPyfunc)
    assert policy.version == "1"  # the alias still points at version 1
    assert load_policy_from_registry("models:/sop-policy/2", tracking_uri=uri, dst_path=str(tmp_path / "dl2")).version == "2"
    # the version number is baked into the artifact too, for readers that load it by hand
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(tracking_uri=uri).get_model_version_download_uri("sop-policy", "2"),
        dst_path=str(tmp_path / "dl3"),
    )
    assert mlflow.pyfunc.load_model(local).unwrap_python_model().version == "2"

    with MetaWorldRobot(MetaWorldRobotConfig(task="drawer-open-v3", render=False)) as robot:
        obs = robot.reset(seed=1)
    np.testing.assert_array_equal(policy.act(obs), expert_action(obs.task, obs.proprio))
    batch = pd.DataFrame({"task": [obs.task, obs.task], "proprio": [obs.proprio.tolist()] * 2})
    predicted = policy.predict(None, batch)
    assert predicted.shape == (2, 4)
    assert len(list((tmp_path / "art").rglob("python_model.pkl"))) == 2


def test_loading_something_that_is_not_a_policy_fails_clearly(tmp_path: Path) -> None:
    class NotAPolicy(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input

    path = tmp_path / "model"
    mlflow.pyfunc.save_model(str(path), python_model=NotAPolicy(), pip_requirements=[])
    with pytest.raises(TypeError, match="act"):
        load_policy_from_registry(str(path))
