"""The learner's registration when the registry fails mid-way: retried, and a learner step is registered once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

import learner.online as online
import learner.publishing as publishing_module
from infra.registry import ensure_registered_model, version_complete, versions_tagged
from learner import registry
from learner.config import EncoderConfig, ModelConfig
from learner.model import VLAPolicy
from learner.online import LearnConfig, _Publishing
from learner.synthetic import HashEmbedder

MODEL = ModelConfig(encoder=EncoderConfig(image_size=16, proprio_dim=8, cnn_channels=(8,)), hidden=(16,))


@pytest.fixture
def publishing(mlflow_uri: str) -> _Publishing:
    client = MlflowClient(mlflow_uri)
    run = client.create_run(client.get_experiment_by_name("sop").experiment_id)
    p = _Publishing(config=LearnConfig(model=MODEL, experiment="sop"), tracking_uri=mlflow_uri, text=HashEmbedder(),
                    lineage=dict, condition="unconditioned", cfg_beta=1.0, run_id=run.info.run_id, gate=None,
                    parent=None)
    p.backoff_s = 0.0
    return p


def steps_registered(uri: str) -> list[str]:
    return sorted(v.tags["lineage.learner_step"] for v in MlflowClient(uri).search_model_versions("name='sop-policy'"))


def failing_after(real: Any, fails: list[str]) -> Any:  # noqa: ANN401
    """register_policy that, while ``fails`` has entries, registers and then loses the answer (``"after"``), or
    leaves a version without its files (``"half"``), or fails before anything exists (``"before"``)."""

    def register(model: VLAPolicy, **kw: Any) -> str:  # noqa: ANN401
        how = fails.pop(0) if fails else None
        if how == "before":
            raise ConnectionError("the registry is restarting")
        if how == "half":
            client = MlflowClient(kw["tracking_uri"])
            exp = client.get_experiment_by_name("sop").experiment_id
            ensure_registered_model(client, "sop-policy")
            logged = client.create_logged_model(experiment_id=exp, name="sop-policy", source_run_id=kw["run_id"])
            tags = publishing_module._tags(kw["metrics"], kw["lineage"])
            client.create_model_version("sop-policy", source=logged.artifact_location, run_id=kw["run_id"],
                                        tags=tags, model_id=logged.model_id)
            raise ConnectionError("the registry went away during the upload")
        version = real(model, **kw)
        if how == "after":
            raise ConnectionError("the answer was lost")
        if how == "twice":  # what MLflow's HTTP retry of a create_model_version does when the first one landed
            client = MlflowClient(kw["tracking_uri"])
            first = client.get_model_version("sop-policy", version)
            client.create_model_version("sop-policy", source=first.source, run_id=kw["run_id"], tags=first.tags)
        return version

    return register


@pytest.mark.parametrize(("fails", "adopted", "removed"), [
    (["before"], 0, 0),   # nothing was created: registered again
    (["after"], 1, 0),    # it landed: the retry adopts it instead of registering the step again
    (["half"], 0, 1),     # a version without its files: deleted, then registered whole
    (["twice"], 0, 1),    # a second copy of one registration: deleted
    (["before", "half", "after"], 1, 1),
])
def test_a_failed_registration_is_retried_and_the_step_registered_once(
        publishing: _Publishing, mlflow_uri: str, monkeypatch, fails: list[str], adopted: int, removed: int) -> None:
    torch.manual_seed(0)
    monkeypatch.setattr(online.registry, "register_policy", failing_after(registry.register_policy, list(fails)))
    version = publishing(VLAPolicy(MODEL), 25, {"loss": 0.1})
    assert version is not None
    assert steps_registered(mlflow_uri) == ["25"]
    assert (publishing.adopted, publishing.removed, publishing.failures) == (adopted, removed, 0)
    assert publishing.retried == len(fails) - (fails == ["twice"])
    client = MlflowClient(mlflow_uri)
    assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == version
    assert version_complete(client, client.get_model_version("sop-policy", version))
    assert registry.load_version("sop-policy", version, tracking_uri=mlflow_uri).lineage["learner_step"] == 25
    assert publishing(VLAPolicy(MODEL), 50, {"loss": 0.1}) is not None  # the next step as usual
    assert steps_registered(mlflow_uri) == ["25", "50"]


def test_a_registry_that_stays_away_costs_one_step_not_the_learner(publishing: _Publishing, mlflow_uri: str,
                                                                    monkeypatch) -> None:
    monkeypatch.setattr(online.registry, "register_policy",
                        failing_after(registry.register_policy, ["before"] * (publishing.retries + 1)))
    assert publishing(VLAPolicy(MODEL), 25, {"loss": 0.1}) is None
    assert (publishing.failures, publishing.retried) == (1, publishing.retries)
    assert steps_registered(mlflow_uri) == []
    assert publishing(VLAPolicy(MODEL), 50, {"loss": 0.1}) is not None
    assert steps_registered(mlflow_uri) == ["50"]


def test_versions_tagged_matches_every_tag(publishing: _Publishing, mlflow_uri: str) -> None:
    publishing(VLAPolicy(MODEL), 25, {"loss": 0.1})
    client = MlflowClient(mlflow_uri)
    run = publishing.run_id
    assert [v.version for v in versions_tagged(client, "sop-policy", {"lineage.learner_step": "25",
                                                                     "lineage.run_id": run})] == [1]
    assert versions_tagged(client, "sop-policy", {"lineage.learner_step": "25", "lineage.run_id": "other"}) == []
    assert versions_tagged(client, "sop-policy", {"lineage.learner_step": "2"}) == []


class FlakyFeeder:
    def __init__(self, errors: list[BaseException]) -> None:
        self.errors, self.calls = errors, 0

    def load_initial(self) -> dict:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {}


def test_the_first_read_waits_for_the_object_store(monkeypatch) -> None:
    import threading

    from deltalake.exceptions import DeltaError, SchemaMismatchError

    monkeypatch.setattr(online, "storage_backoff", lambda attempt, cap_s: 0.01)
    feeder = FlakyFeeder([OSError("Generic S3 error: connection refused"), DeltaError("Generic S3 error")])
    online._load_initial(feeder, timeout_s=5, stop=threading.Event())  # type: ignore[arg-type]
    assert feeder.calls == 3
    refused = FlakyFeeder([SchemaMismatchError("not a table of ours")])
    with pytest.raises(SchemaMismatchError):
        online._load_initial(refused, timeout_s=5, stop=threading.Event())  # type: ignore[arg-type]
    assert refused.calls == 1
    away = FlakyFeeder([OSError("refused")] * 1000)
    with pytest.raises(OSError, match="refused"):
        online._load_initial(away, timeout_s=0.2, stop=threading.Event())  # type: ignore[arg-type]
