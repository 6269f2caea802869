"""The robot-side settings (``sop.actor_settings``) and the demonstration rows of ``sop demos``."""

from __future__ import annotations

import numpy as np
import pytest

from rewards import recap
from sim.operator import OperatorConfig
from sim.tasks import DEFAULT_SUITE
from sop.actor_settings import load_actor_settings, parse_tasks
from sop.settings import SettingsError


def test_defaults_and_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_actor_settings()
    assert settings.tasks == DEFAULT_SUITE and settings.cameras == ("corner",)
    assert settings.actor_poll_interval_s == 0.5 and settings.operator_config() == OperatorConfig()
    monkeypatch.setenv("SOP_ACTOR_POLL_INTERVAL_S", "0.25")
    monkeypatch.setenv("SOP_ACTOR_TASKS", "reach-v3, drawer-open-v3")
    monkeypatch.setenv("SOP_OPERATOR_DIVERGENCE_THRESHOLD", "0.8")
    monkeypatch.setenv("SOP_OPERATOR_STALL_STEPS", "none")
    settings = load_actor_settings()
    assert settings.actor_poll_interval_s == 0.25 and settings.tasks == ("reach-v3", "drawer-open-v3")
    assert settings.operator_config().divergence_threshold == 0.8
    assert settings.operator_config().stall_steps is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("SOP_ACTOR_POLL_INTERVAL_S", "0", "SOP_ACTOR_POLL_INTERVAL_S"),
        ("SOP_ACTOR_CAMERAS", "corner,eye", "SOP_ACTOR_CAMERAS"),
        ("SOP_ACTOR_TASKS", "pick-place-v3,fly-v3", "fly-v3"),
        ("SOP_OPERATOR_TAKEOVER_AFTER", "0", "SOP_OPERATOR_TAKEOVER_AFTER"),
        ("SOP_OPERATOR_GRIPPER_WEIGHT", "0.9", "SOP_OPERATOR_GRIPPER_WEIGHT"),
    ],
)
def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str,
                                        message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=message):
        load_actor_settings()


def test_parse_tasks() -> None:
    assert parse_tasks("reach-v3,drawer-open-v3") == ("reach-v3", "drawer-open-v3")
    with pytest.raises(ValueError, match="known"):
        parse_tasks("reach-v9")
    with pytest.raises(ValueError, match="no task"):
        parse_tasks(" , ")


def _episode(outcome: str, n: int) -> list[dict]:
    steps = [{"episode_id": "demo:reach-v3:3", "actor_id": "demo-expert", "task": "reach-v3", "instruction": "x",
              "step_index": i, "event_time_us": 1_000 + i, "policy_version": "expert", "images": [],
              "proprio": [0.0], "action": [0.0] * 4, "policy_action": [0.1] * 4, "controller": "HUMAN",
              "env_reward": 0.0, "success": outcome == "SUCCESS" and i == n - 1} for i in range(n)]
    return [*reversed(steps), {"kind": "ENDED", "task": "reach-v3", "outcome": outcome, "num_steps": n}]


@pytest.mark.parametrize("outcome", ["SUCCESS", "TIMEOUT"])
def test_demo_rows_carry_the_processors_recap_columns(outcome: str) -> None:
    from rewards.config import RecapConfig
    from sim.demos_io import demo_app_id, demonstration_rows

    rows = demonstration_rows(_episode(outcome, 6), recap=RecapConfig(max_episode_length=10))
    targets = recap.episode_targets(outcome, 6, max_episode_length=10)
    assert [r["step_index"] for r in rows] == list(range(6))
    np.testing.assert_allclose([r["reward"] for r in rows], targets.rewards)
    np.testing.assert_allclose([r["mc_return"] for r in rows], targets.normalised_returns)
    assert rows[-1]["reward"] == (0.0 if outcome == "SUCCESS" else -10.0)
    assert all(r["outcome"] == outcome and r["episode_length"] == 6 for r in rows)
    assert all(r["advantage"] is None and r.get("kafka_offset") is None for r in rows)
    with pytest.raises(ValueError, match="ENDED"):
        demonstration_rows(_episode(outcome, 3)[:-1], recap=RecapConfig(max_episode_length=10))
    assert demo_app_id("reach-v3", 3) == "sop-demos.reach-v3.seed-3"


def test_cameras_are_given_as_a_count_or_as_names() -> None:
    from sop.actor_settings import camera_list

    assert camera_list("3") == "corner,corner2,corner3"
    assert camera_list(" topview , corner ") == "topview,corner"
    for bad in ("0", "8", "corner,corner", "fisheye", ""):
        with pytest.raises(ValueError, match="--cameras"):
            camera_list(bad)


def test_the_load_generator_sends_every_camera_at_the_size_asked() -> None:
    from producers.loadgen import LoadGenConfig, iter_fleet

    cfg = LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=1, cameras=3, image_size=224, image_pool=2)
    step = next(rec for name, rec in iter_fleet(cfg) if name == "Step")
    assert [(i["camera"], i["width"], i["height"]) for i in step["images"]] == \
        [("corner", 224, 224), ("corner2", 224, 224), ("corner3", 224, 224)]
    with pytest.raises(ValueError, match="cameras"):
        LoadGenConfig(cameras=0)
