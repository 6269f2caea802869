"""The scripted experts of the simulated tasks: the action MetaWorld's hand-written policy takes
in a state, the same as a :class:`~producers.interfaces.Policy` (optionally noisy) for
demonstrations and for exercising the pipeline before a learned policy exists, and the progress
measure the simulated operator watches.

MetaWorld's experts are stateless functions of the 39-d state, so one instance per task is
shared by every caller.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

import numpy as np

from producers.interfaces import Observation
from sim.tasks import task_spec

EXPERT_VERSION = "expert"

# MetaWorld's move() warns on every gain above 1 (all its experts use such gains); the result is clipped anyway.
warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)

# Layout of MetaWorld's 39-d state (goal observable): hand xyz, gripper opening, first object
# xyz + quaternion, second object, the previous frame's 18 values, goal xyz.
HAND = slice(0, 3)
OBJECT = slice(4, 7)
GOAL = slice(36, 39)
STATE_DIM = 39


@cache
def _expert(task: str) -> Any:
    return task_spec(task).expert_class()()


def expert_action(task: str, state: np.ndarray) -> np.ndarray:
    """The scripted expert's action for ``task`` in ``state`` (39-d), as float32 in [-1, 1]."""
    if state.shape != (STATE_DIM,):
        raise ValueError(f"expert_action needs the {STATE_DIM}-d MetaWorld state, got shape {state.shape}")
    action = _expert(task).get_action(np.asarray(state, dtype=np.float64))
    return np.clip(action, -1.0, 1.0).astype(np.float32)


def progress_distance(task: str, state: np.ndarray) -> float:
    """How far the task is from done, in metres (lower is better); the operator's stall detector
    watches it. 'object' tasks: hand→object + object→goal; 'hand' tasks: hand→goal."""
    hand, goal = state[HAND], state[GOAL]
    if task_spec(task).progress == "hand":
        return float(np.linalg.norm(hand - goal))
    obj = state[OBJECT]
    return float(np.linalg.norm(hand - obj) + np.linalg.norm(obj - goal))


class ExpertPolicy:
    """The scripted expert as a multi-task :class:`~producers.interfaces.Policy` (picks the expert
    from ``observation.task``), with optional Gaussian noise of std ``noise_sigma`` on every
    action dimension (then clipped to [-1, 1])."""

    def __init__(self, *, noise_sigma: float = 0.0, seed: int | None = None, version: str = EXPERT_VERSION) -> None:
        if noise_sigma < 0:
            raise ValueError(f"ExpertPolicy noise_sigma must be >= 0, got {noise_sigma}")
        self.noise_sigma = noise_sigma
        self.version = version
        self._rng = np.random.default_rng(seed)

    def act(self, observation: Observation) -> np.ndarray:
        action = expert_action(observation.task, observation.proprio)
        return self.perturb(action)

    def perturb(self, action: np.ndarray) -> np.ndarray:
        """``action`` plus this policy's noise, clipped to the action limits."""
        if self.noise_sigma == 0:
            return action
        noisy = action + self._rng.normal(0.0, self.noise_sigma, size=action.shape)
        return np.clip(noisy, -1.0, 1.0).astype(np.float32)
