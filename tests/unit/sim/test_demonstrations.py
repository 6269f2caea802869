"""Offline demonstrations: records, labels, noise, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from producer_fakes import check_episode_records

from producers.images import decode_image
from sim.demos import demo_episode_id, generate_demonstrations
from sim.expert import expert_action
from sim.tasks import DEMO_SEEDS

pytestmark = pytest.mark.filterwarnings("ignore:Constant")


def _as_sink_records(episode: list[dict]) -> list[tuple[str, dict, str]]:
    *steps, ended = episode
    started = {**ended, "kind": "STARTED", "outcome": None, "num_steps": None}
    return [("EpisodeEvent", started, ended["episode_id"])] + [("Step", s, s["episode_id"]) for s in steps] + [
        ("EpisodeEvent", ended, ended["episode_id"])
    ]


def test_demonstration_episodes_are_valid_and_labelled_with_the_clean_expert_action() -> None:
    episodes = list(
        generate_demonstrations(["reach-v3", "drawer-open-v3"], episodes_per_task=1, noise_sigma=0.2, seed=7, image_size=16)
    )
    assert len(episodes) == 2
    for episode, task in zip(episodes, ["reach-v3", "drawer-open-v3"], strict=True):
        check_episode_records(_as_sink_records(episode))
        *steps, ended = episode
        assert ended["kind"] == "ENDED" and ended["num_steps"] == len(steps) and ended["seed"] == 7
        assert ended["episode_id"] == demo_episode_id(task, 7) and ended["policy_version"] == "expert"
        for step in steps:
            assert step["controller"] == "HUMAN" and step["policy_version"] == "expert" and step["task"] == task
            state = np.asarray(step["proprio"], dtype=np.float32)
            np.testing.assert_allclose(step["policy_action"], expert_action(task, state), atol=1e-5)
            assert decode_image(step["images"][0]["data"]).shape == (16, 16, 3)
        noise = np.array([s["action"] for s in steps]) - np.array([s["policy_action"] for s in steps])
        assert np.abs(noise).mean() > 0.05, "the executed action must carry the noise"
        assert np.all(np.abs(np.array([s["action"] for s in steps])) <= 1.0)


def test_demonstrations_are_reproducible_and_noise_free_at_sigma_zero() -> None:
    def one(sigma: float) -> list[dict]:
        return next(generate_demonstrations(["reach-v3"], episodes_per_task=1, noise_sigma=sigma, seed=3, render=False))

    a, b = one(0.3), one(0.3)
    assert [s["action"] for s in a[:-1]] == [s["action"] for s in b[:-1]]
    clean = one(0.0)
    assert all(s["action"] == s["policy_action"] for s in clean[:-1])
    assert clean[-1]["outcome"] == "SUCCESS"
    assert all(s["images"] == [] for s in clean[:-1])


def test_bad_arguments_fail_at_the_call_not_at_the_first_episode() -> None:
    with pytest.raises(ValueError, match="DEMO_SEEDS"):
        generate_demonstrations(["reach-v3"], episodes_per_task=2, seed=DEMO_SEEDS.stop - 1, render=False)
    with pytest.raises(ValueError, match="unknown"):
        generate_demonstrations(["reach-v3", "nope-v3"], episodes_per_task=1, render=False)
    with pytest.raises(ValueError, match="noise_sigma"):
        generate_demonstrations(["reach-v3"], episodes_per_task=1, noise_sigma=-1.0, render=False)
