"""Registry garbage collection: what is kept (pure), and a collection against a real registry and episodes table."""

from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from lakehouse import Lakehouse
from learner import registry
from learner.config import EncoderConfig, ModelConfig
from learner.model import VLAPolicy
from learner.promotion import GCConfig, LiveSuccess, RegistryGC, promote, running_versions, versions_to_delete
from learner.synthetic import episode_summary, write_rows


def test_versions_to_delete_keeps_the_newest_the_promoted_the_aliased_and_the_running() -> None:
    assert versions_to_delete(range(1, 11), keep_last=3, promoted=["1", "4"], aliased=["5"], running=["2"]) \
        == [3, 6, 7]
    assert versions_to_delete([5, 1, 3, 3], keep_last=1) == [1, 3]  # unordered, duplicates
    assert versions_to_delete(range(1, 4), keep_last=5) == []
    assert versions_to_delete([], keep_last=1) == []


def test_running_versions() -> None:
    actors = {"actor-00": ("4", 100.0), "actor-01": ("9", 5_000.0)}  # actor-00 has been silent for long
    played = {"4": 100.0, "7": 4_500.0, "8": 3_000.0, "9": 5_000.0}
    assert running_versions(actors, played, now=5_000.0, active_s=900) == {"4", "7", "9"}
    assert running_versions(actors, played, now=5_000.0, active_s=0) == {"4", "9"}


def test_collect_against_the_registry(mlflow_uri: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VLAPolicy(ModelConfig(encoder=EncoderConfig(image_size=16, proprio_dim=8, cnn_channels=(8,)),
                                  hidden=(16,)))
    v = [registry.register_policy(model, alias=None, tracking_uri=mlflow_uri, experiment="sop", embeddings={})
         for _ in range(8)]
    promote(v[0], name="sop-policy", tracking_uri=mlflow_uri)  # the base: champion once
    promote(v[2], name="sop-policy", tracking_uri=mlflow_uri)  # champion now
    promote(v[3], name="sop-policy", tracking_uri=mlflow_uri, alias="candidate")  # being judged
    lake = Lakehouse(tmp_path / "lake")
    row = episode_summary("e1", task="reach-v3", policy_version=v[4], outcome="SUCCESS")
    row["actor_id"] = "actor-07"  # its newest episode, long ago: it may still run v5
    write_rows(lake, "episodes", [row])
    gc = RegistryGC(GCConfig(keep_last=2, active_s=0), name="sop-policy", tracking_uri=mlflow_uri,
                    live=LiveSuccess(lake))
    doomed, total = gc.plan()
    assert total == 8 and doomed == [int(v[1]), int(v[5])]
    client = MlflowClient(mlflow_uri)
    source = client.get_model_version("sop-policy", v[1]).source
    assert (Path(source.removeprefix("file://")) / "weights.safetensors").exists()
    result = gc.collect()
    assert result.deleted == [int(v[1]), int(v[5])] and result.kept == 6 and not result.failed
    left = sorted(int(m.version) for m in client.search_model_versions("name='sop-policy'"))
    assert left == sorted(int(x) for x in (v[0], v[2], v[3], v[4], v[6], v[7]))
    assert source.startswith("file://") and not Path(source.removeprefix("file://")).exists()  # the files went too
    # alias moves within active_s protect what they moved to (an actor may run it without a closed episode yet)
    promote(v[6], name="sop-policy", tracking_uri=mlflow_uri, alias="candidate")
    gc_recent = RegistryGC(GCConfig(keep_last=1, active_s=3600), name="sop-policy", tracking_uri=mlflow_uri,
                           live=LiveSuccess(lake))
    assert str(v[6]) not in {str(x) for x in gc_recent.plan()[0]}
    assert str(v[3]) not in {str(x) for x in gc_recent.plan()[0]}  # moved to within the hour, too
