"""Register policy and value versions in a real local MLflow, load them the way actors do (download, check every
file's SHA-256 against the version's tags, build with our own code), act identically."""

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import INSTRUCTIONS, HashEmbedder, Obs, make_episode
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from infra import model_versions
from infra.model_versions import LegacyPickledVersion, TamperedVersion, fetch_version
from learner import artifacts, registry
from learner.config import EncoderConfig, ModelConfig, ValueConfig, to_dict
from learner.model import PolicyRuntime, VLAPolicy
from learner.text import EmbeddingTable
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


def as_actor(tracking_uri: str, name: str, ref: str, tmp: Path):  # noqa: ANN201 - PolicyRuntime / ValueRuntime
    """What an actor (or the processor) does: resolve, download, verify, build with SOP's own code."""
    client = MlflowClient(tracking_uri)
    version = str(client.get_model_version_by_alias(name, ref[1:]).version) if ref.startswith("@") else ref
    local = fetch_version(client, name, version, dst=tmp / f"{name}-{version}-{len(list(tmp.glob('*')))}")
    return model_versions.build(local, registry.BUILDERS)


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


def test_register_load_and_act_identically(tracking_uri: str, tmp_path: Path) -> None:
    model = trained_looking_policy(chunk=2)
    version = registry.register_policy(model, metrics={"bc_loss": 0.12}, tracking_uri=tracking_uri,
                                       lineage={"algorithm": "recap", "learner_step": 25, "delta": {"steps": 7}},
                                       embeddings=embeddings(), condition="positive", cfg_beta=1.5,
                                       experiment=EXPERIMENT)
    assert version == "1"
    local = PolicyRuntime(model, HashEmbedder(), version="local", condition="positive", cfg_beta=1.5)
    for ref in ("1", "@champion"):
        policy = as_actor(tracking_uri, "sop-policy", ref, tmp_path)
        assert policy.version == "1"
        for obs in observations(4):
            action = policy.act(obs)
            assert action.shape == (4,) and action.dtype == np.float32
            np.testing.assert_array_equal(action, local.act(obs))


def test_a_version_is_data_pinned_by_hashes_in_its_tags(tracking_uri: str, tmp_path: Path) -> None:
    model = trained_looking_policy()
    version = registry.register_policy(model, tracking_uri=tracking_uri, embeddings=embeddings(), experiment=EXPERIMENT)
    client = MlflowClient(tracking_uri)
    tags = client.get_model_version("sop-policy", version).tags
    local = fetch_version(client, "sop-policy", version, dst=tmp_path / "dl")
    assert sorted(local.files) == ["config.json", "instructions.npz", "weights.safetensors"]  # no pickle, no code
    assert tags["sop.sha256.weights.safetensors"] == model_versions.sha256_file(local.file("weights.safetensors"))
    assert tags["sop.format"] == "sop-model/2" and tags["sop.architecture"] == "sop-vla"
    config = json.loads(local.file("config.json").read_text())
    assert config["architecture"] == "sop-vla" and config["kind"] == "policy" and "encoder" in config["config"]
    weights = load_file(str(local.file("weights.safetensors")))  # plain tensors
    assert set(weights) == set(model.state_dict())

    # the same bytes changed in the artifact store (the registry's tags stay): refused before anything is parsed
    stored = Path(client.get_model_version_download_uri("sop-policy", version).removeprefix("file://"))
    target = next(stored.rglob("weights.safetensors"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(TamperedVersion, match="weights.safetensors has SHA-256"):
        fetch_version(client, "sop-policy", version, dst=tmp_path / "dl2")
    target.unlink()  # a missing file is refused too, and so is an extra one
    with pytest.raises(TamperedVersion, match=r"missing: \['weights.safetensors'\]"):
        fetch_version(client, "sop-policy", version, dst=tmp_path / "dl3")
    target.write_bytes(b"")
    (target.parent / "python_model.pkl").write_bytes(b"cos\nsystem\n")
    with pytest.raises(TamperedVersion, match="unregistered"):
        fetch_version(client, "sop-policy", version, dst=tmp_path / "dl4")


class _OldWrapper(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return model_input


def register_first_format(tracking_uri: str, tmp: Path, model: torch.nn.Module) -> str:
    """A version as the learner registered them before: a pickled pyfunc beside weights.pt/config/embeddings."""
    files = tmp / "old-files"
    files.mkdir()
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, files / "weights.pt")
    (files / "config.json").write_text(json.dumps({"format": 1, "kind": "policy", "config": to_dict(model.config),
                                                   "condition": "unconditioned", "cfg_beta": 1.0}))
    EmbeddingTable(embeddings()).save(files / "instructions.npz")
    client = MlflowClient(tracking_uri)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(EXPERIMENT).experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=_OldWrapper(), pip_requirements=[],
                                       artifacts={k: str(files / f) for k, f in
                                                  (("weights", "weights.pt"), ("config", "config.json"),
                                                   ("instructions", "instructions.npz"))},
                                       registered_model_name="sop-policy")
    return str(info.registered_model_version)


def test_first_format_pickled_versions_are_refused_and_convert_once(tracking_uri: str, tmp_path: Path) -> None:
    from learner.convert import convert_legacy

    model = trained_looking_policy()
    old = register_first_format(tracking_uri, tmp_path, model)
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("sop-policy", "champion", old)
    with pytest.raises(LegacyPickledVersion, match="pickled MLflow pyfunc.*sop registry convert"):
        as_actor(tracking_uri, "sop-policy", "@champion", tmp_path)
    new = convert_legacy("sop-policy", old, tracking_uri=tracking_uri, experiment=EXPERIMENT)
    assert new is not None and new != old
    assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == new  # the alias follows
    assert client.get_model_version("sop-policy", new).tags["lineage.converted_from"] == old
    converted = as_actor(tracking_uri, "sop-policy", "@champion", tmp_path)
    local = PolicyRuntime(model, HashEmbedder(), version="local")
    for obs in observations(3):
        np.testing.assert_array_equal(converted.act(obs), local.act(obs))
    assert convert_legacy("sop-policy", new, tracking_uri=tracking_uri, experiment=EXPERIMENT) is None


def test_alias_moves_and_latest_resumes(tracking_uri: str, tmp_path: Path) -> None:
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
    assert as_actor(tracking_uri, "sop-policy", "@champion", tmp_path).version == "1"

    latest = registry.load_latest(tracking_uri=tracking_uri)
    assert latest is not None and latest.version == "3"
    champion = registry.load_latest(tracking_uri=tracking_uri, alias="champion")
    assert champion is not None and champion.version == "1"
    resumed = registry.load_version("sop-policy", "2", tracking_uri=tracking_uri)
    assert resumed.lineage == {"learner_step": 50} and resumed.metrics == {"loss": 0.5}
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor)


def test_unseen_instruction_falls_back_to_the_encoder(tracking_uri: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register_policy(trained_looking_policy(), tracking_uri=tracking_uri, embeddings=embeddings(),
                             experiment=EXPERIMENT)
    calls: list[str] = []

    class CountingEmbedder(HashEmbedder):
        def embed(self, texts: list[str]) -> np.ndarray:
            calls.extend(texts)
            return super().embed(texts)

    monkeypatch.setattr(artifacts, "_embedding_fallback", CountingEmbedder)
    policy = as_actor(tracking_uri, "sop-policy", "1", tmp_path)
    obs = observations(1)[0]
    policy.act(obs)
    assert calls == []  # the artifact's table had it: no encoder loaded
    policy.act(Obs(images=obs.images, proprio=obs.proprio, instruction="stack the blocks", task="stack"))
    policy.act(Obs(images=obs.images, proprio=obs.proprio, instruction="stack the blocks", task="stack"))
    assert calls == ["stack the blocks"]


def test_value_model_round_trip(tracking_uri: str, tmp_path: Path, rng: np.random.Generator) -> None:
    torch.manual_seed(0)
    model = ValueModel(ValueConfig(encoder=ENC, hidden=(64,))).eval()
    version = registry.register_value(model, tracking_uri=tracking_uri, embeddings=embeddings(),
                                      lineage={"episodes": 120}, experiment=EXPERIMENT)
    loaded = as_actor(tracking_uri, "sop-value", version, tmp_path)
    assert loaded.version == version == "1"
    local = ValueRuntime(model, HashEmbedder(), version="local")
    np.testing.assert_array_equal(loaded.values(observations(5)), local.values(observations(5)))
    rows = make_episode("reach-v3", 7, rng)
    values = loaded.values_for_rows(rows)
    assert values.shape == (7,) and ((values >= -1.0) & (values <= 0.0)).all()
    np.testing.assert_array_equal(values, local.values_for_rows(rows))


def test_the_processor_refuses_a_tampered_value_version_and_keeps_its_own(tracking_uri: str,
                                                                          rng: np.random.Generator) -> None:
    from consumers.values import RegistryValueSource
    from sop.architectures import value_architectures

    torch.manual_seed(0)
    model = ValueModel(ValueConfig(encoder=ENC, hidden=(64,))).eval()
    kw = {"tracking_uri": tracking_uri, "embeddings": embeddings(), "experiment": EXPERIMENT}
    assert registry.register_value(model, **kw) == "1"
    source = RegistryValueSource(tracking_uri=tracking_uri, poll_s=1e-9, architectures=value_architectures())
    source.refresh()
    assert source.version == "1" and source.source_label == "value_model:sop-value/1"
    rows = make_episode("reach-v3", 5, rng)
    expected = ValueRuntime(model, HashEmbedder(), version="x").values_for_rows(rows)
    np.testing.assert_array_equal(source("reach-v3", rows), expected)

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert registry.register_value(model, **kw) == "2"
    client = MlflowClient(tracking_uri)
    stored = Path(client.get_model_version_download_uri("sop-value", "2").removeprefix("file://"))
    weights = stored / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    source.refresh()  # later lookups run in the background
    source.settle()
    assert source.version == "1" and "weights.safetensors has SHA-256" in source.refused["2"]
    np.testing.assert_array_equal(source("reach-v3", rows), expected)  # still the version it had
    assert RegistryValueSource(tracking_uri=tracking_uri, poll_s=1e-9).version is None  # no architectures: none


def test_a_pinned_value_version_is_the_only_one_the_processor_loads(tracking_uri: str,
                                                                    rng: np.random.Generator) -> None:
    """A replay with a new value model (`--value-version`) or a frozen RECAP run: newer versions and the champion
    alias do not move it."""
    from consumers.values import RegistryValueSource
    from sop.architectures import value_architectures

    kw = {"tracking_uri": tracking_uri, "embeddings": embeddings(), "experiment": EXPERIMENT}
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(ValueModel(ValueConfig(encoder=ENC, hidden=(64,))).eval())
        registry.register_value(models[-1], **kw)  # v1, v2, v3; the last is the champion
    rows = make_episode("reach-v3", 5, rng)
    source = RegistryValueSource(tracking_uri=tracking_uri, pinned="2", poll_s=1e-9,
                                 architectures=value_architectures())
    source.refresh()
    assert source.version == "2" and source.source_label == "value_model:sop-value/2"
    expected = ValueRuntime(models[1], HashEmbedder(), version="x").values_for_rows(rows)
    np.testing.assert_array_equal(source("reach-v3", rows), expected)
    source.refresh()
    source.settle()
    assert source.version == "2"  # the champion (v3) is not taken up later either
    missing = RegistryValueSource(tracking_uri=tracking_uri, pinned="9", poll_s=1e-9,
                                  architectures=value_architectures())
    missing.refresh()
    assert missing.version is None and missing.source_label is None  # not some other version instead
