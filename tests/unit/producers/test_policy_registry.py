"""Registering the expert stand-in in a real local MLflow and loading it back as a Policy: data, built by the
robot's own code for its declared architecture, never unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from infra.model_versions import LegacyPickledVersion, UnknownArchitecture, VersionRefused
from producers.interfaces import Policy
from producers.policies import load_policy_from_registry, parse_model_uri, register_policy_config
from sim.expert import ExpertPolicy, expert_action
from sim.expert_version import build_expert, register_expert_policy
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

pytestmark = pytest.mark.filterwarnings("ignore")

ARCHITECTURES = {"scripted-expert": build_expert}


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

    policy = load_policy_from_registry("models:/sop-policy@champion", architectures=ARCHITECTURES, tracking_uri=uri,
                                       dst_path=str(tmp_path / "dl"))
    assert isinstance(policy, Policy) and isinstance(policy, ExpertPolicy)
    assert policy.version == "1"  # the alias still points at version 1
    assert load_policy_from_registry("models:/sop-policy/2", architectures=ARCHITECTURES, tracking_uri=uri,
                                     dst_path=str(tmp_path / "dl2")).version == "2"
    stored = [p.name for p in (tmp_path / "art").rglob("*") if p.is_file()]
    assert sorted(stored) == ["config.json", "config.json"]  # an architecture and its settings: no code, no pickle
    config = json.loads(next((tmp_path / "art").rglob("config.json")).read_text())
    assert config == {"format": "sop-model/2", "kind": "policy", "architecture": "scripted-expert",
                      "noise_sigma": 0.0, "seed": None}

    with MetaWorldRobot(MetaWorldRobotConfig(task="drawer-open-v3", render=False)) as robot:
        obs = robot.reset(seed=1)
    np.testing.assert_array_equal(policy.act(obs), expert_action(obs.task, obs.proprio))


def test_versions_the_robot_cannot_build_are_refused_clearly(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    art = str(tmp_path / "art")
    version = register_policy_config("their-net", {"layers": 3}, uri, artifact_location=art)
    with pytest.raises(UnknownArchitecture, match="'their-net', which this process has no code for.*scripted-expert"):
        load_policy_from_registry(f"models:/sop-policy/{version}", architectures=ARCHITECTURES, tracking_uri=uri)
    with pytest.raises(VersionRefused, match="noise_sigma >= 0"):
        version = register_policy_config("scripted-expert", {"noise_sigma": "os.system"}, uri)
        load_policy_from_registry(f"models:/sop-policy/{version}", architectures=ARCHITECTURES, tracking_uri=uri)


class NotAPolicy(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        raise AssertionError("a pickled model must never be loaded, let alone run")


def test_a_pickled_pyfunc_version_is_refused_without_unpickling(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("old", artifact_location=str(tmp_path / "art"))
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            info = mlflow.pyfunc.log_model(name="m", python_model=NotAPolicy(), pip_requirements=[],
                                           registered_model_name="sop-policy")
    finally:
        mlflow.set_tracking_uri(None)
    pickled = next((tmp_path / "art").rglob("python_model.pkl"))
    pickled.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")  # would run code
    with pytest.raises(LegacyPickledVersion, match="pickled MLflow pyfunc.*never unpickles"):
        load_policy_from_registry(f"models:/sop-policy/{info.registered_model_version}", architectures=ARCHITECTURES,
                                  tracking_uri=uri)
    assert not (tmp_path / "pwned").exists()
