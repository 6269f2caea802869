"""Promotion with a history, roll-back, the pin, and the live-success gate."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from lakehouse import Lakehouse
from learner import registry
from learner.config import EncoderConfig, ModelConfig
from learner.model import VLAPolicy
from learner.promotion import (
    GATE_TAG,
    GateConfig,
    PromotionError,
    PromotionGate,
    Tally,
    champion_history,
    gate_decision,
    pinned,
    promote,
    rollback,
)
from learner.synthetic import episode_summary, write_rows

ENC = EncoderConfig(image_size=16, proprio_dim=8, cnn_channels=(8,))


def register(uri: str, n: int) -> list[str]:
    torch.manual_seed(0)
    model = VLAPolicy(ModelConfig(encoder=ENC, hidden=(16,)))
    return [registry.register_policy(model, alias=None, tracking_uri=uri, experiment="sop",
                                     embeddings={}) for _ in range(n)]


def champion(uri: str) -> str:
    return str(MlflowClient(uri).get_model_version_by_alias("sop-policy", "champion").version)


@pytest.mark.parametrize(("cand", "champ", "expected"), [
    ({"a": Tally(5, 10)}, {"a": Tally(9, 10)}, "wait"),  # 10 < min_episodes
    ({"a": Tally(10, 20)}, None, "promote"),  # no champion episodes: nothing says it is better
    ({"a": Tally(10, 20)}, {"a": Tally(3, 5)}, "promote"),  # too few champion episodes to judge
    ({"a": Tally(12, 20)}, {"a": Tally(60, 100)}, "promote"),  # equal is not worse
    ({"a": Tally(11, 20)}, {"a": Tally(60, 100)}, "reject"),
    # per-task average: the candidate ran mostly the easy task, which must not flatter it
    ({"easy": Tally(15, 15), "hard": Tally(0, 5)}, {"easy": Tally(20, 20), "hard": Tally(10, 20)}, "reject"),
])
def test_gate_decision(cand: dict, champ: dict | None, expected: str) -> None:
    assert gate_decision(cand, champ, min_episodes=20)[0] == expected


def test_gate_tolerance() -> None:
    assert gate_decision({"a": Tally(11, 20)}, {"a": Tally(60, 100)}, min_episodes=20, tolerance=0.05)[0] == "promote"


def test_promote_and_roll_back_with_history(mlflow_uri: str) -> None:
    v1, v2, v3 = register(mlflow_uri, 3)
    assert promote(v1, name="sop-policy", tracking_uri=mlflow_uri) is None
    assert promote(v2, name="sop-policy", tracking_uri=mlflow_uri) == v1
    assert promote(v3, name="sop-policy", tracking_uri=mlflow_uri) == v2
    assert champion_history(name="sop-policy", tracking_uri=mlflow_uri) == [v1, v2]
    assert rollback(name="sop-policy", tracking_uri=mlflow_uri) == (v3, v2)
    assert champion(mlflow_uri) == v2 and pinned(name="sop-policy", tracking_uri=mlflow_uri) == v2
    assert rollback(name="sop-policy", tracking_uri=mlflow_uri) == (v2, v1)
    with pytest.raises(PromotionError, match="no earlier version"):
        rollback(name="sop-policy", tracking_uri=mlflow_uri)
    promote(v3, name="sop-policy", tracking_uri=mlflow_uri, pin=False)
    assert champion(mlflow_uri) == v3 and not pinned(name="sop-policy", tracking_uri=mlflow_uri)
    with pytest.raises(PromotionError, match="no version '99'"):
        promote("99", name="sop-policy", tracking_uri=mlflow_uri)


def test_gate_promotes_a_candidate_once_it_has_enough_live_episodes(mlflow_uri: str, tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    v1, v2, v3, v4 = register(mlflow_uri, 4)
    promote(v1, name="sop-policy", tracking_uri=mlflow_uri)
    gate = PromotionGate(lake, name="sop-policy", tracking_uri=mlflow_uri, config=GateConfig(min_episodes=10))
    assert gate.check() is None
    assert gate.offer(v2) and not gate.offer(v3)  # one candidate at a time
    assert str(MlflowClient(mlflow_uri).get_model_version_by_alias("sop-policy", "candidate").version) == v2

    def live(version: str, successes: int, n: int, t0: int) -> None:
        write_rows(lake, "episodes", [episode_summary(f"{version}-{t0}-{i}", task="drawer-open-v3",
                                                      policy_version=version,
                                                      outcome="SUCCESS" if i < successes else "TIMEOUT",
                                                      t0_us=1_795_000_000_000_000 + t0 + i)
                                      for i in range(n)])

    live(v1, 5, 10, 0)
    live(v2, 4, 6, 100)
    assert gate.check() == "wait"
    live(v2, 4, 4, 200)  # 8 of 10 against the champion's 5 of 10
    assert gate.check() == "promote"
    assert champion(mlflow_uri) == v2 and gate.pending is None
    assert GATE_TAG in MlflowClient(mlflow_uri).get_model_version("sop-policy", v2).tags

    assert gate.offer(v4)
    live(v4, 1, 10, 300)
    assert gate.check() == "reject"
    assert champion(mlflow_uri) == v2
    # a restarted learner does not judge a decided candidate again
    assert PromotionGate(lake, name="sop-policy", tracking_uri=mlflow_uri).pending is None
