"""Test doubles of the robot-side unit tests: a pure-Python robot, a constant policy, a scripted
operator, and the record checks every episode must pass. Imported by this folder's test modules."""

from __future__ import annotations

import numpy as np

from producers.interfaces import Observation, OperatorDecision, Robot, StepResult
from schemas import codec


class LineRobot:
    """A point that moves by the action's first 3 values toward a target; solved within 0.03.

    Its images are small random frames so records carry real JPEGs without a simulator.
    """

    action_dim = 4

    def __init__(self, task: str = "reach-v3", *, max_steps: int = 20, image_size: int = 8, render: bool = True) -> None:
        self.task = task
        self.max_steps = max_steps
        self.image_size = image_size
        self.render = render
        self.target = np.array([1.0, 0.0, 0.0])
        self.resets: list[int | None] = []

    def reset(self, *, seed: int | None = None, instruction: str | None = None) -> Observation:
        self.resets.append(seed)
        self.rng = np.random.default_rng(seed)
        self.pos = np.zeros(3)
        self.steps = 0
        self.instruction = instruction or f"do {self.task}"
        return self.observe()

    def observe(self) -> Observation:
        size = self.image_size
        images = {"corner": self.rng.integers(0, 255, (size, size, 3), dtype=np.uint8)} if self.render else {}
        proprio = np.concatenate([self.pos, self.target]).astype(np.float32)
        return Observation(images=images, proprio=proprio, instruction=self.instruction, task=self.task)

    def act(self, action: np.ndarray) -> StepResult:
        self.pos = self.pos + 0.1 * np.clip(np.asarray(action[:3], dtype=np.float64), -1, 1)
        self.steps += 1
        success = bool(np.linalg.norm(self.pos - self.target) < 0.03)
        return StepResult(
            observation=self.observe(),
            success=success,
            timeout=not success and self.steps >= self.max_steps,
            env_reward=-float(np.linalg.norm(self.pos - self.target)),
        )


class ConstantPolicy:
    def __init__(self, action: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0), version: str = "v1") -> None:
        self.action = np.asarray(action, dtype=np.float32)
        self.version = version
        self.calls = 0

    def act(self, observation: Observation) -> np.ndarray:
        self.calls += 1
        return self.action


class ScriptedOperator:
    """Drives during the step index ranges given, with a fixed action toward the target."""

    operator_id = "scripted-human"

    def __init__(self, drives: list[range], action: tuple[float, ...] = (0.5, 0.0, 0.0, 1.0)) -> None:
        self.drives = drives
        self.action = np.asarray(action, dtype=np.float32)
        self.decisions: list[OperatorDecision] = []

    def reset(self, robot: Robot) -> None:
        self.step = 0
        self.decisions = []

    def decide(self, observation: Observation, proposed_action: np.ndarray) -> OperatorDecision:
        driving = any(self.step in r for r in self.drives)
        before = any(self.step - 1 in r for r in self.drives) if self.step else False
        decision = OperatorDecision(
            in_control=driving,
            action=self.action.copy() if driving else None,
            changed=driving != before,
            reason=("scripted-takeover" if driving else "scripted-handback") if driving != before else "",
        )
        self.step += 1
        self.decisions.append(decision)
        return decision


def check_episode_records(records: list[tuple[str, dict, str]]) -> None:
    """Every record encodes and validates; one episode's life cycle is well formed."""
    for name, record, key in records:
        name_back, decoded = codec.decode(codec.encode(name, record))
        assert name_back == name
        codec.validate(name, decoded)
        assert key == record["episode_id"]
    episodes = [r for n, r, _ in records if n == "EpisodeEvent"]
    assert [e["kind"] for e in episodes] == ["STARTED", "ENDED"]
    steps = [r for n, r, _ in records if n == "Step"]
    assert [s["step_index"] for s in steps] == list(range(len(steps)))
    assert episodes[1]["num_steps"] == len(steps)
    assert records[0][0] == "EpisodeEvent" and records[-1][0] == "EpisodeEvent"
    kinds = [r["kind"] for n, r, _ in records if n == "InterventionEvent"]
    assert kinds == ["STARTED", "ENDED"] * (len(kinds) // 2)
