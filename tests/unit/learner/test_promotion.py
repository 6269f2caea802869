"""Promotion with a history log, roll-back, the pin (and its race with the learner), and the canary gate."""

import json
import math
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import learner.promotion as promotion
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
    history_log,
    metric_test,
    pinned,
    promote,
    promote_unless_pinned,
    prune_log,
    replay_history,
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


def good(n: int, autonomous: float = 0.8, takeover: float = 0.2) -> Tally:
    return Tally(n, round(n * autonomous), round(n * takeover), n)


# ---- the rule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cand", "champ", "expected"), [
    ({"a": Tally(10, 0, 10)}, {"a": good(100)}, "wait"),  # 10 < min_episodes, however bad
    ({"a": Tally(20, 0, 20)}, None, "promote"),  # no champion episodes: no evidence against it
    ({"a": Tally(20, 0, 20)}, {"a": good(5)}, "promote"),  # too few champion episodes to judge
    ({"a": good(20)}, {"a": good(100)}, "promote"),  # equal is not worse
    ({"a": good(20, 0.7, 0.3)}, {"a": good(100)}, "promote"),  # a little worse, within the noise of 20 episodes
    # the arm does nothing: every episode rescued by the operator (raw success 1.0, autonomous 0)
    ({"a": Tally(20, 0, 20, 20)}, {"a": good(100)}, "reject"),
    # autonomous success alike, but the operator takes over far more often
    ({"a": Tally(20, 16, 14, 20)}, {"a": Tally(100, 80, 10, 100)}, "reject"),
    # per-task average: the candidate ran mostly the easy task, which must not flatter it
    ({"easy": Tally(15, 15, 0), "hard": Tally(5, 0, 5)},
     {"easy": Tally(100, 100, 0), "hard": Tally(100, 60, 40)}, "reject"),
    # a task only the candidate ran is not compared
    ({"a": good(20), "new": Tally(10, 0, 10)}, {"a": good(100)}, "promote"),
])
def test_gate_decision(cand: dict, champ: dict | None, expected: str) -> None:
    assert gate_decision(cand, champ, min_episodes=20).decision == expected


def test_raw_success_is_not_what_is_judged() -> None:
    rescued = {"a": Tally(30, 3, 27, 30)}  # every episode succeeded, 27 of them with the operator's help
    alone = {"a": Tally(100, 70, 30, 75)}
    verdict = gate_decision(rescued, alone, min_episodes=20)
    assert verdict.decision == "reject" and "autonomous" in verdict.why


def test_the_statistic_is_the_stated_agresti_caffo_z() -> None:
    cand, champ = {"a": Tally(20, 10, 0)}, {"a": Tally(40, 30, 0)}
    test = metric_test(cand, champ, ["a"], "autonomous", +1, margin=0.0, alpha=0.05)
    pc, ph = 11 / 22, 31 / 42
    z = (pc - ph) / math.sqrt(pc * (1 - pc) / 22 + ph * (1 - ph) / 42)
    assert test.z == pytest.approx(z) and test.worse == (z < -1.6448536)
    assert test.candidate == 0.5 and test.champion == 0.75
    lower = metric_test(cand, champ, ["a"], "autonomous", +1, margin=0.0, alpha=0.01)
    assert test.worse and not lower.worse  # z ≈ -1.88: worse at 5 %, not at 1 %


def test_margin_lets_a_small_regression_pass() -> None:
    cand, champ = {"a": Tally(60, 36, 24)}, {"a": Tally(200, 150, 50)}
    assert gate_decision(cand, champ, min_episodes=20).decision == "reject"
    assert gate_decision(cand, champ, min_episodes=20, tolerance=0.1).decision == "promote"


# ---- the history log (pure) --------------------------------------------------------------------------------------
def move(a: str | None, b: str, alias: str = "champion") -> dict:
    return {"event": "move", "alias": alias, "from": a, "to": b}


def back(a: str, b: str) -> dict:
    return {"event": "rollback", "alias": "champion", "from": a, "to": b}


def test_replay_history() -> None:
    assert replay_history([], [move(None, "1"), move("1", "2"), move("2", "3")]) == ["1", "2"]
    assert replay_history([], [move(None, "1"), move("1", "2"), move("2", "3"), back("3", "2")]) == ["1"]
    # the same roll-back made twice at once (both from 3 to 2) pops once
    assert replay_history([], [move(None, "1"), move("1", "2"), move("2", "3"), back("3", "2"), back("3", "2")]) \
        == ["1"]
    assert replay_history(["7"], [move("8", "9"), move("x", "y", alias="candidate")]) == ["7", "8"]
    assert replay_history([], [{"event": "gate", "alias": "champion", "version": "4", "decision": "reject"}]) == []


# ---- against a registry --------------------------------------------------------------------------------------------
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
    events = [(e["event"], e["to"]) for e in history_log(name="sop-policy", tracking_uri=mlflow_uri)]
    assert events == [("move", v1), ("move", v2), ("move", v3), ("rollback", v2), ("rollback", v1), ("move", v3)]


def test_a_roll_back_during_an_automatic_promotion_wins(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    v1, v2, v3 = register(mlflow_uri, 3)
    promote(v1, name="sop-policy", tracking_uri=mlflow_uri)
    promote(v2, name="sop-policy", tracking_uri=mlflow_uri)
    real = promotion.promote

    def promote_then_someone_rolls_back(*args: object, **kwargs: object) -> str | None:
        previous = real(*args, **kwargs)  # the learner checked the pin, then moved the alias to v3 ...
        rollback(name="sop-policy", tracking_uri=mlflow_uri)  # ... while an operator rolled back
        return previous

    monkeypatch.setattr(promotion, "promote", promote_then_someone_rolls_back)
    assert not promote_unless_pinned(v3, name="sop-policy", tracking_uri=mlflow_uri, reason="auto")
    monkeypatch.setattr(promotion, "promote", real)
    target = pinned(name="sop-policy", tracking_uri=mlflow_uri)
    assert target is not None and champion(mlflow_uri) == target  # the champion is where the roll-back put it
    assert not promote_unless_pinned(v3, name="sop-policy", tracking_uri=mlflow_uri, reason="auto")  # pinned
    assert champion(mlflow_uri) == target
    assert history_log(name="sop-policy", tracking_uri=mlflow_uri)[-1]["event"] == "restore"


def test_the_log_is_pruned_into_the_bottom_of_the_stack(mlflow_uri: str) -> None:
    versions = register(mlflow_uri, 6)
    for v in versions:
        promote(v, name="sop-policy", tracking_uri=mlflow_uri)
    before = champion_history(name="sop-policy", tracking_uri=mlflow_uri)
    assert prune_log(MlflowClient(mlflow_uri), "sop-policy", keep=2) == 4
    assert len(history_log(name="sop-policy", tracking_uri=mlflow_uri)) == 2
    assert champion_history(name="sop-policy", tracking_uri=mlflow_uri) == before == versions[:-1]


def live(lake: Lakehouse, version: str, *, autonomous: int, rescued: int = 0, failed: int = 0, t0: int,
         actor: str = "actor-01", task: str = "drawer-open-v3") -> None:
    rows = []
    for i, kind in enumerate(["auto"] * autonomous + ["rescued"] * rescued + ["failed"] * failed):
        row = episode_summary(f"{version}-{t0}-{i}", task=task, policy_version=version,
                              outcome="TIMEOUT" if kind == "failed" else "SUCCESS",
                              t0_us=1_795_000_000_000_000 + (t0 + i) * 1_000_000)
        row.update(actor_id=actor, num_interventions=int(kind == "rescued"), human_steps=10 * (kind == "rescued"))
        rows.append(row)
    write_rows(lake, "episodes", rows)


def test_the_gate_promotes_and_rejects_on_live_episodes(mlflow_uri: str, tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    v1, v2, v3, v4, v5 = register(mlflow_uri, 5)
    promote(v1, name="sop-policy", tracking_uri=mlflow_uri)
    gate = PromotionGate(lake, name="sop-policy", tracking_uri=mlflow_uri, config=GateConfig(min_episodes=10))
    assert gate.check() is None
    assert gate.offer(v2) and not gate.offer(v3)  # one candidate at a time
    client = MlflowClient(mlflow_uri)
    assert str(client.get_model_version_by_alias("sop-policy", "candidate").version) == v2

    live(lake, v1, autonomous=5, rescued=4, failed=1, t0=0, actor="actor-00")
    live(lake, v2, autonomous=4, rescued=2, t0=100)
    assert gate.check() == "wait"
    live(lake, v2, autonomous=3, rescued=1, t0=200)  # 7 of 10 alone against the champion's 5 of 10
    assert gate.check() == "promote"
    assert champion(mlflow_uri) == v2 and gate.pending is None
    tag = json.loads(client.get_model_version("sop-policy", v2).tags[GATE_TAG])
    assert tag["decision"] == "promote" and tag["candidate_episodes"] == 10

    # a candidate put up by hand replaces the learner's undecided one
    assert gate.offer(v3)
    promote(v4, name="sop-policy", tracking_uri=mlflow_uri, alias="candidate")
    # the arm does nothing: the operator rescues every episode
    live(lake, v4, autonomous=0, rescued=10, t0=300)
    assert gate.check() == "reject" and gate.decisions[-1] == (v4, "reject")
    assert champion(mlflow_uri) == v2
    gates = [e for e in history_log(name="sop-policy", tracking_uri=mlflow_uri) if e["event"] == "gate"]
    assert [(e["version"], e["decision"]) for e in gates] == [(v2, "promote"), (v4, "reject")]
    assert gate.last["recent"][-1]["decision"] == "reject"
    # a restarted learner does not judge a decided candidate again
    assert PromotionGate(lake, name="sop-policy", tracking_uri=mlflow_uri).pending is None
    assert gate.offer(v5)
