"""Register policy and value versions in a real local MLflow, load them the way actors do, act identically."""

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import INSTRUCTIONS, HashEmbedder, Obs, make_episode
from mlflow.tracking import MlflowClient

from learner import artifacts, registry
from learner.config import EncoderConfig, ModelConfig, ValueConfig
from learner.model import PolicyRuntime, VLAPolicy
from learner.value import ValueModel, ValueRuntime

ENC = EncoderConfig(image_size=32, proprio_dim=8, cnn_channels=(16, 32))
EXPERIMENT = "sop-test"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "art"))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # what an actor does before mlflow.pyfunc.load_model("models:/...")
    yield uri
    mlflow.set_tracking_uri(previous)


def trained_looking_policy(chunk: int = 1) -> VLAPolicy:
    torch.manual_seed(0)
    model = VLAPolicy(ModelConfig(encoder=ENC, action_dim=4, chunk=chunk))
    model.encoder.proprio_norm.update(torch.randn(256, 8) * 3 + 1)  # the stats must travel with the weights
    return model.eval()


def observations(n: int) -> list[Obs]:
    rng = np.random.default_rng(3)
    return [Obs(images={"corner": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)},
                proprio=rng.normal(0, 2, 8).astype(np.float32), instruction=INSTRUCTIONS["reach-v3"], task="reach-v3")
            for _ in range(n)]


def embeddings() -> dict[str, np.ndarray]:
    texts = list(INSTRUCTIONS.values())
    return dict(zip(texts, HashEmbedder().embed(texts), strict=True))


def test_register_load_and_act_identically(tracking_uri: str) -> None:
    model = trained_looking_policy(chunk=2)
    version = registry.register_policy(model, metrics={"bc_loss": 0.12}, tracking_uri=tracking_uri,
                                       lineage={"algorithm": "recap", "learner_step": 25, "delta": {"steps": 7}},
                                       embeddings=embeddings(), condition="positive", cfg_beta=1.5,
                                       experiment=EXPERIMENT)
    assert version == "1"
    local = PolicyRuntime(model, HashEmbedder(), version="local", condition="positive", cfg_beta=1.5)
    for uri in ("models:/sop-policy/1", "models:/sop-policy@champion"):
        policy = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        assert policy.version == "1"
        for obs in observations(4):
            action = policy.act(obs)
            assert action.shape == (4,) and action.dtype == np.float32
            np.testing.assert_array_equal(action, local.act(obs))
    frame = pd.DataFrame([{"images": o.images, "proprio": o.proprio, "instruction": o.instruction}
                          for o in observations(3)])
    np.testing.assert_array_equal(mlflow.pyfunc.load_model("models:/sop-policy/1").predict(frame),
                                  local.act_batch(observations(3))[:, 0])


def test_alias_moves_and_latest_resumes(tracking_uri: str) -> None:
    assert registry.load_latest(tracking_uri=tracking_uri) is None
    first, second = trained_looking_policy(), trained_looking_policy()
    with torch.no_grad():
        second.head[-1].bias.add_(0.3)
    kw = {"tracking_uri": tracking_uri, "embeddings": embeddings(), "experiment": EXPERIMENT}
    assert registry.register_policy(first, lineage={"learner_step": 25}, **kw) == "1"
    assert registry.register_policy(second, lineage={"learner_step": 50}, metrics={"loss": 0.5}, **kw) == "2"
    client = MlflowClient(tracking_uri)
    assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == "2"
    assert registry.register_policy(first, alias=None, **kw) == "3"  # a candidate: the alias stays
    assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == "2"
    registry.move_alias("1", tracking_uri=tracking_uri)  # roll back
    assert mlflow.pyfunc.load_model("models:/sop-policy@champion").unwrap_python_model().version == "1"

    latest = registry.load_latest(tracking_uri=tracking_uri)
    assert latest is not None and latest.version == "3"
    champion = registry.load_latest(tracking_uri=tracking_uri, alias="champion")
    assert champion is not None and champion.version == "1"
    resumed = registry.load_version("sop-policy", "2", tracking_uri=tracking_uri)
    assert resumed.lineage == {"learner_step": 50} and resumed.metrics == {"loss": 0.5}
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor)


def test_unseen_instruction_falls_back_to_the_encoder(tracking_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register_policy(trained_looking_policy(), tracking_uri=tracking_uri, embeddings=embeddings(),
                             experiment=EXPERIMENT)
    calls: list[str] = []

    class CountingEmbedder(HashEmbedder):
        def embed(self, texts: list[str]) -> np.ndarray:
            calls.extend(texts)
            return super().embed(texts)

    monkeypatch.setattr(artifacts, "_embedding_fallback", CountingEmbedder)
    policy = mlflow.pyfunc.load_model("models:/sop-policy/1").unwrap_python_model()
    obs = observations(1)[0]
    policy.act(obs)
    assert calls == []  # the artifact's table had it: no encoder loaded
    policy.act(Obs(images=obs.images, proprio=obs.proprio, instruction="stack the blocks", task="stack"))
    policy.act(Obs(images=obs.images, proprio=obs.proprio, instruction="stack the blocks", task="stack"))
    assert calls == ["stack the blocks"]


def test_value_model_round_trip(tracking_uri: str, rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = ValueModel(ValueConfig(encoder=ENC, hidden=(64,))).eval()
    version = registry.register_value(model, tracking_uri=tracking_uri, embeddings=embeddings(),
                                      lineage={"episodes": 120}, experiment=EXPERIMENT)
    loaded = mlflow.pyfunc.load_model(f"models:/sop-value/{version}").unwrap_python_model()
    assert loaded.version == version == "1"
    local = ValueRuntime(model, HashEmbedder(), version="local")
    np.testing.assert_array_equal(loaded.values(observations(5)), local.values(observations(5)))
    rows = make_episode("reach-v3", 7, rng)
    values = loaded.values_for_rows(rows)
    assert values.shape == (7,) and ((values >= -1.0) & (values <= 0.0)).all()
    np.testing.assert_array_equal(values, local.values_for_rows(rows))


def test_policy_needs_loading_before_acting() -> None:
    with pytest.raises(RuntimeError, match="load this model"):
        registry.SOPPolicy(name="sop-policy", version="1").act(observations(1)[0])
