"""RECAP's rewards, returns, advantages and advantage indicators, as pure numpy functions.

The stream processor (``consumers``) imports this module to fill the reward / return / value / advantage
columns of the ``steps`` table when an episode closes, and the learner uses the same functions, so both
sides agree by construction. Keep this module numpy-only: no torch, no learner model code, no I/O.

Conventions (all per episode of ``T`` steps, ``t = 0 .. T-1``):

- Rewards: -1 per step; the last step gets 0 if the episode succeeded and ``-c_fail`` if it failed.
  A timeout counts as a failure by default (``timeout_is_failure``): the simulated tasks have no other
  way to fail, and a robot that runs out of time did not do the job. An aborted episode (or a timeout
  that is not a failure) is *truncated*: its last step gets the ordinary -1 and advantages bootstrap
  from the value of its last observation instead of from a terminal value of 0.
- Returns: undiscounted reward-to-go ``G_t = sum_{k>=t} r_k``.
- Normalisation per task: divide by ``max_episode_length + c_fail``, the magnitude of the worst return the
  task can produce, so that every return lies in [-1, 0] without clipping. With the default
  ``c_fail = max_episode_length`` a successful episode's returns lie in (-0.5, 0] and a failed one's in
  [-1, -0.5]. Values and advantages are all in these normalised units.
- Advantage: ``A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t)``. Near the end of the episode the sum stops
  at the last step and the bootstrap is 0 for a terminal episode (nothing follows success or failure) or
  ``V(o_{T-1})`` for a truncated one (the sum then stops before the last step, which that value covers).
- Indicator: ``POSITIVE`` if ``A_t > epsilon_task`` else ``NEGATIVE``; human-controlled steps are always
  ``POSITIVE``; ``DROPPED`` means "unconditioned" (classifier-free dropout and HG-DAgger training).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

Outcome = Literal["SUCCESS", "FAILURE", "TIMEOUT", "ABORTED"]
OUTCOMES: tuple[str, ...] = ("SUCCESS", "FAILURE", "TIMEOUT", "ABORTED")

NEGATIVE = 0
POSITIVE = 1
DROPPED = 2
UNKNOWN = -1  # no indicator stored for a row (the learner derives it from the advantage)


def is_terminal(outcome: str, *, timeout_is_failure: bool = True) -> bool:
    """Whether nothing follows the episode's last step (so bootstrapping from it is wrong)."""
    _check_outcome(outcome)
    return outcome in ("SUCCESS", "FAILURE") or (outcome == "TIMEOUT" and timeout_is_failure)


def is_failure(outcome: str, *, timeout_is_failure: bool = True) -> bool:
    _check_outcome(outcome)
    return outcome == "FAILURE" or (outcome == "TIMEOUT" and timeout_is_failure)


def episode_rewards(num_steps: int, outcome: str, *, c_fail: float, timeout_is_failure: bool = True) -> np.ndarray:
    """Per-step rewards of an episode (float64, length ``num_steps``)."""
    if num_steps < 1:
        raise ValueError(f"an episode has at least one step; got num_steps={num_steps}")
    if c_fail < 0:
        raise ValueError(f"c_fail is a penalty and must be >= 0; got {c_fail}")
    rewards = np.full(num_steps, -1.0)
    if outcome == "SUCCESS":
        rewards[-1] = 0.0
    elif is_failure(outcome, timeout_is_failure=timeout_is_failure):
        rewards[-1] = -float(c_fail)
    return rewards


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted Monte-Carlo returns ``G_t = sum_{k>=t} r_k``."""
    r = np.asarray(rewards, dtype=np.float64)
    return np.cumsum(r[::-1])[::-1].copy()


def return_scale(max_episode_length: int, c_fail: float) -> float:
    """The per-task normaliser: magnitude of the worst return (a failure at the last allowed step)."""
    if max_episode_length < 1:
        raise ValueError(f"max_episode_length must be >= 1; got {max_episode_length}")
    return float(max_episode_length) + float(c_fail)


def normalise(x: np.ndarray, scale: float) -> np.ndarray:
    """Rewards, returns or values in normalised units."""
    return np.asarray(x, dtype=np.float64) / float(scale)


def normalised_returns(rewards: np.ndarray, scale: float) -> np.ndarray:
    """The value model's targets; clipped to [-1, 0] in case an episode outran the task's configured maximum."""
    return np.clip(normalise(returns_to_go(rewards), scale), -1.0, 0.0)


def n_step_advantages(rewards: np.ndarray, values: np.ndarray, *, n: int, terminal: bool) -> np.ndarray:
    """``A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t)`` over one episode, tail handled as described above.

    ``rewards`` and ``values`` (``V(o_t)`` per step) must be in the same (normalised) units; a constant
    ``values`` array is a constant baseline.
    """
    r = np.asarray(rewards, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if r.ndim != 1 or v.shape != r.shape:
        raise ValueError(f"rewards and values must be 1-d of equal length; got {r.shape} and {v.shape}")
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    steps = len(r)
    # With truncation the last step's value stands for its own reward and everything after it.
    horizon = steps if terminal else steps - 1
    csum = np.concatenate([[0.0], np.cumsum(r[:horizon])])
    t = np.arange(steps)
    end = np.minimum(t + n, horizon)
    end = np.maximum(end, t)  # the truncated episode's last step sums nothing and bootstraps from itself
    summed = csum[end] - csum[np.minimum(t, horizon)]
    if terminal:
        bootstrap = np.where(t + n < steps, v[np.minimum(t + n, steps - 1)], 0.0)
    else:
        bootstrap = v[np.minimum(t + n, steps - 1)]
    return summed + bootstrap - v


def epsilon_for_share(advantages: np.ndarray, target_share: float) -> float:
    """The threshold ``eps`` such that about ``target_share`` of ``advantages`` satisfy ``A > eps``."""
    a = np.asarray(advantages, dtype=np.float64)
    a = a[np.isfinite(a)]
    if not 0.0 < target_share < 1.0:
        raise ValueError(f"target_share must be in (0, 1); got {target_share}")
    if a.size == 0:
        return 0.0
    return float(np.quantile(a, 1.0 - target_share, method="lower"))


def epsilons_per_task(advantages: np.ndarray, tasks: Iterable[str], target_share: float,
                      *, human: np.ndarray | None = None) -> dict[str, float]:
    """``eps`` per task, over the autonomous steps only (human steps are positive whatever their advantage)."""
    a = np.asarray(advantages, dtype=np.float64)
    task_arr = np.asarray(list(tasks))
    keep = np.ones(len(a), dtype=bool) if human is None else ~np.asarray(human, dtype=bool)
    return {str(task): epsilon_for_share(a[(task_arr == task) & keep], target_share)
            for task in np.unique(task_arr)}


def advantage_indicators(advantages: np.ndarray, epsilon: float | np.ndarray, *,
                         human: np.ndarray | None = None, human_always_positive: bool = True) -> np.ndarray:
    """``POSITIVE`` where ``A > eps`` (or a human drove), else ``NEGATIVE``; int8."""
    a = np.asarray(advantages, dtype=np.float64)
    ind = np.where(a > np.asarray(epsilon, dtype=np.float64), POSITIVE, NEGATIVE).astype(np.int8)
    if human is not None and human_always_positive:
        ind[np.asarray(human, dtype=bool)] = POSITIVE
    return ind


def drop_indicators(indicators: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Replace each indicator by ``DROPPED`` with probability ``p`` (the classifier-free dropout)."""
    ind = np.array(indicators, dtype=np.int8, copy=True)
    ind[rng.random(ind.shape) < p] = DROPPED
    return ind


@dataclass(frozen=True, kw_only=True)
class EpisodeTargets:
    """What the stream processor writes into the steps of one closed episode."""

    rewards: np.ndarray  # raw: -1 per step, 0 / -c_fail at the end
    returns: np.ndarray  # raw reward-to-go
    normalised_returns: np.ndarray  # in [-1, 0]: the value model's target
    advantages: np.ndarray | None  # normalised; None when no values were given
    terminal: bool


def episode_targets(outcome: str, num_steps: int, *, max_episode_length: int, c_fail: float | None = None,
                    n_step: int = 50, values: np.ndarray | None = None,
                    timeout_is_failure: bool = True) -> EpisodeTargets:
    """Everything RECAP needs for one episode. ``values`` are ``V(o_t)`` in normalised units, or None.

    ``c_fail=None`` means ``c_fail = max_episode_length`` (the learner's default, see ``RecapConfig``).
    """
    penalty = float(max_episode_length if c_fail is None else c_fail)
    rewards = episode_rewards(num_steps, outcome, c_fail=penalty, timeout_is_failure=timeout_is_failure)
    scale = return_scale(max_episode_length, penalty)
    terminal = is_terminal(outcome, timeout_is_failure=timeout_is_failure)
    advantages = None
    if values is not None:
        advantages = n_step_advantages(normalise(rewards, scale), values, n=n_step, terminal=terminal)
    return EpisodeTargets(rewards=rewards, returns=returns_to_go(rewards),
                          normalised_returns=normalised_returns(rewards, scale),
                          advantages=advantages, terminal=terminal)


class EpsilonTracker:
    """Per-task ``eps`` over a sliding window of the most recent autonomous-step advantages."""

    def __init__(self, target_share: float, *, window: int = 20_000) -> None:
        if not 0.0 < target_share < 1.0:
            raise ValueError(f"target_share must be in (0, 1); got {target_share}")
        self.target_share = target_share
        self._window = window
        self._seen: dict[str, deque[float]] = {}

    def update(self, task: str, advantages: np.ndarray, *, human: np.ndarray | None = None) -> None:
        a = np.asarray(advantages, dtype=np.float64)
        if human is not None:
            a = a[~np.asarray(human, dtype=bool)]
        self._seen.setdefault(task, deque(maxlen=self._window)).extend(a[np.isfinite(a)].tolist())

    def epsilon(self, task: str) -> float:
        return epsilon_for_share(np.fromiter(self._seen.get(task, ()), dtype=np.float64), self.target_share)

    def epsilons(self) -> Mapping[str, float]:
        return {task: self.epsilon(task) for task in self._seen}


def _check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown episode outcome {outcome!r}; expected one of {OUTCOMES}")
