"""RECAP's pure functions against small episodes computed by hand."""

import subprocess
import sys

import numpy as np
import pytest

from rewards import recap
from rewards.recap import DROPPED, NEGATIVE, POSITIVE


def test_rewards_success_failure_timeout_aborted() -> None:
    np.testing.assert_array_equal(recap.episode_rewards(4, "SUCCESS", c_fail=10), [-1, -1, -1, 0])
    np.testing.assert_array_equal(recap.episode_rewards(3, "FAILURE", c_fail=10), [-1, -1, -10])
    np.testing.assert_array_equal(recap.episode_rewards(3, "TIMEOUT", c_fail=10), [-1, -1, -10])
    np.testing.assert_array_equal(recap.episode_rewards(3, "TIMEOUT", c_fail=10, timeout_is_failure=False),
                                  [-1, -1, -1])
    np.testing.assert_array_equal(recap.episode_rewards(3, "ABORTED", c_fail=10), [-1, -1, -1])
    np.testing.assert_array_equal(recap.episode_rewards(1, "SUCCESS", c_fail=10), [0])


def test_terminal_and_bad_input() -> None:
    assert recap.is_terminal("SUCCESS") and recap.is_terminal("FAILURE") and recap.is_terminal("TIMEOUT")
    assert not recap.is_terminal("TIMEOUT", timeout_is_failure=False)
    assert not recap.is_terminal("ABORTED")
    with pytest.raises(ValueError, match="unknown episode outcome"):
        recap.episode_rewards(3, "EXPLODED", c_fail=1)
    with pytest.raises(ValueError, match="at least one step"):
        recap.episode_rewards(0, "SUCCESS", c_fail=1)


def test_returns_and_normalisation() -> None:
    np.testing.assert_array_equal(recap.returns_to_go(np.array([-1, -1, -1, 0])), [-3, -2, -1, 0])
    np.testing.assert_array_equal(recap.returns_to_go(np.array([-1, -1, -10])), [-12, -11, -10])
    scale = recap.return_scale(10, 10)
    assert scale == 20
    np.testing.assert_allclose(recap.normalised_returns(np.array([-1, -1, -1, 0]), scale), [-0.15, -0.1, -0.05, 0])
    np.testing.assert_allclose(recap.normalised_returns(np.array([-1, -1, -10]), scale), [-0.6, -0.55, -0.5])


def test_episode_targets_default_penalty_splits_success_from_failure() -> None:
    success = recap.episode_targets("SUCCESS", 150, max_episode_length=150)
    failure = recap.episode_targets("TIMEOUT", 150, max_episode_length=150)
    assert success.normalised_returns.min() > -0.5 and success.normalised_returns.max() == 0.0
    assert failure.normalised_returns.min() >= -1.0 and failure.normalised_returns.max() == -0.5
    assert success.advantages is None and success.terminal


def test_advantages_with_exact_values_are_zero() -> None:
    rewards = np.array([-1.0, -1, -1, 0])
    values = recap.returns_to_go(rewards)
    np.testing.assert_allclose(recap.n_step_advantages(rewards, values, n=2, terminal=True), 0.0)
    np.testing.assert_allclose(recap.n_step_advantages(rewards, values, n=50, terminal=True), 0.0)


def test_advantages_with_a_value_function_terminal() -> None:
    rewards = np.array([-1.0, -1, -1, 0])
    values = np.array([-1.0, -5, -2, -4])
    # t0: -1-1+V2-V0 = -3; t1: -1-1+V3-V1 = -1; t2: -1+0+0-V2 = 1; t3: 0+0-V3 = 4
    np.testing.assert_allclose(recap.n_step_advantages(rewards, values, n=2, terminal=True), [-3, -1, 1, 4])


def test_advantages_truncated_bootstrap_from_last_value() -> None:
    rewards = np.array([-1.0, -1, -1, -1])
    values = np.array([-1.0, -5, -2, -4])
    # t0: r0+r1+V2-V0 = -3; t1: r1+r2+V3-V1 = -1; t2: r2+V3-V2 = -3; t3: V3-V3 = 0
    np.testing.assert_allclose(recap.n_step_advantages(rewards, values, n=2, terminal=False), [-3, -1, -3, 0])


def test_advantages_with_a_constant_baseline() -> None:
    rewards = np.array([-1.0, -1, -1, 0])
    values = np.full(4, -0.5)
    # t0, t1: two rewards, baselines cancel; t2: -1 + 0 + 0 + 0.5; t3: 0 + 0 + 0.5
    np.testing.assert_allclose(recap.n_step_advantages(rewards, values, n=2, terminal=True), [-2, -2, -0.5, 0.5])


def test_episode_targets_advantages_in_normalised_units() -> None:
    values = np.linspace(-0.2, 0.0, 5)
    got = recap.episode_targets("SUCCESS", 5, max_episode_length=10, c_fail=10, n_step=3, values=values)
    expected = recap.n_step_advantages(got.rewards / 20.0, values, n=3, terminal=True)
    np.testing.assert_allclose(got.advantages, expected)


def test_epsilon_per_task_gives_the_target_positive_share(rng: np.random.Generator) -> None:
    tasks = np.array(["a"] * 1000 + ["b"] * 3000)
    advantages = np.concatenate([rng.normal(0.0, 1.0, 1000), rng.normal(-5.0, 0.1, 3000)])
    for share in (0.3, 0.4):
        eps = recap.epsilons_per_task(advantages, tasks, share)
        assert eps["b"] < -4.0 < eps["a"]  # per task, not one global threshold
        for task in ("a", "b"):
            a = advantages[tasks == task]
            positive = recap.advantage_indicators(a, eps[task]) == POSITIVE
            assert positive.mean() == pytest.approx(share, abs=0.005)


def test_epsilon_ignores_human_steps_and_humans_are_positive(rng: np.random.Generator) -> None:
    advantages = rng.normal(0, 1, 1000)
    human = np.zeros(1000, dtype=bool)
    human[:200] = True
    advantages[:200] = -100.0  # human steps with terrible advantages
    eps = recap.epsilons_per_task(advantages, ["t"] * 1000, 0.3, human=human)["t"]
    ind = recap.advantage_indicators(advantages, eps, human=human)
    assert (ind[:200] == POSITIVE).all()
    assert (ind[200:] == POSITIVE).mean() == pytest.approx(0.3, abs=0.01)
    no_override = recap.advantage_indicators(advantages, eps, human=human, human_always_positive=False)
    assert (no_override[:200] == NEGATIVE).all()


def test_indicator_dropout(rng: np.random.Generator) -> None:
    ind = np.full(20_000, POSITIVE, dtype=np.int8)
    dropped = recap.drop_indicators(ind, 0.3, rng)
    assert (dropped == DROPPED).mean() == pytest.approx(0.3, abs=0.01)
    assert set(np.unique(dropped)) <= {POSITIVE, DROPPED}
    assert (ind == POSITIVE).all()  # input untouched


def test_epsilon_tracker_window(rng: np.random.Generator) -> None:
    tracker = recap.EpsilonTracker(0.3, window=1000)
    tracker.update("t", rng.normal(-10, 1, 1000))
    tracker.update("t", rng.normal(0, 1, 1000))  # pushes the old advantages out of the window
    assert -1.0 < tracker.epsilon("t") < 1.0
    assert tracker.epsilon("unseen") == 0.0


def test_recap_module_imports_no_torch() -> None:
    code = "import sys, rewards.recap, learner.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
