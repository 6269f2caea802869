"""A robot, a teleoperation device and a policy written outside SOP, as a lab would write them for its own arm.

The test copies this file into a temporary directory on PYTHONPATH (it is not part of any SOP package) and
runs ``sop actor --robot toy_arm:ToyArm --operator toy_arm:Teleop --architecture toy-mirror=toy_arm:MirroredPolicy``.
The "arm" is a point moved in the unit square towards a goal; the overhead camera is drawn with numpy. The
policy's registered version is a config declaring the architecture ``toy-mirror`` (and its gain); this file's
``MirroredPolicy`` is the robot's own code that builds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from producers.interfaces import Observation, OperatorDecision, StepResult

TASK = "toy-reach"


class ToyArm:
    """``Robot``: state [x, y, goal_x, goal_y]; an action is a velocity command in [-1, 1]², clipped."""

    action_dim = 2

    def __init__(self, *, task: str = TASK, image_size: int = 24, max_steps: int = 40, speed: float = 0.08,
                 closed_marker: str | None = None) -> None:
        self.task = task
        self.image_size = image_size
        self.max_steps = max_steps
        self.speed = speed
        self.closed_marker = closed_marker
        self.pos = np.zeros(2)
        self.goal = np.ones(2)
        self.steps = 0

    def reset(self, *, seed: int | None = None, instruction: str | None = None) -> Observation:
        rng = np.random.default_rng(seed)
        self.pos = rng.uniform(0.1, 0.3, 2)
        self.goal = rng.uniform(0.7, 0.9, 2)
        self.steps = 0
        self.instruction = instruction or "move the tool to the green dot"
        return self.observe()

    def observe(self) -> Observation:
        n = self.image_size
        img = np.full((n, n, 3), 40, np.uint8)
        for point, colour in ((self.goal, (40, 220, 40)), (self.pos, (230, 60, 60))):
            r, c = (np.clip(point, 0, 0.999) * n).astype(int)
            img[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2] = colour
        return Observation(images={"overhead": img}, proprio=np.concatenate([self.pos, self.goal]).astype(np.float32),
                           instruction=self.instruction, task=self.task)

    def act(self, action: np.ndarray) -> StepResult:
        self.pos = np.clip(self.pos + self.speed * np.clip(np.asarray(action, np.float64), -1, 1), 0, 1)
        self.steps += 1
        success = bool(np.linalg.norm(self.goal - self.pos) < 0.06)
        return StepResult(observation=self.observe(), success=success,
                          timeout=not success and self.steps >= self.max_steps,
                          env_reward=float(-np.linalg.norm(self.goal - self.pos)))

    def close(self) -> None:
        if self.closed_marker:
            Path(self.closed_marker).write_text("closed")


def toward_goal(observation: Observation) -> np.ndarray:
    d = observation.proprio[2:] - observation.proprio[:2]
    return (d / max(float(np.linalg.norm(d)), 1e-6)).astype(np.float32)


class Teleop:
    """``Operator``: a person with a joystick takes over when the proposal points away from the goal and hands
    back after ``drive_steps``."""

    def __init__(self, *, operator_id: str = "joystick-1", drive_steps: int = 4) -> None:
        self.operator_id = operator_id
        self.drive_steps = drive_steps
        self.driving = 0

    def reset(self, robot: object) -> None:
        self.driving = 0

    def decide(self, observation: Observation, proposed_action: np.ndarray) -> OperatorDecision:
        want = toward_goal(observation)
        if self.driving:
            self.driving -= 1
            if self.driving == 0:
                return OperatorDecision(in_control=False, action=None, changed=True, reason="on-track")
            return OperatorDecision(in_control=True, action=want)
        if float(np.dot(want, proposed_action)) < 0.3:
            self.driving = self.drive_steps
            return OperatorDecision(in_control=True, action=want, changed=True, reason="divergence")
        return OperatorDecision(in_control=False, action=None)


class MirroredPolicy:
    """A poor policy (registered in MLflow like any other, as a config): heads to the goal mirrored on the y axis.
    Built from a verified version: ``MirroredPolicy(local)`` reads its declared gain."""

    def __init__(self, local) -> None:  # noqa: ANN001 - infra.model_versions.LocalVersion
        self.version = local.version
        self.gain = float(local.config["gain"])

    def act(self, observation: Observation) -> np.ndarray:
        return self.gain * toward_goal(observation) * np.array([1.0, -1.0], np.float32)
