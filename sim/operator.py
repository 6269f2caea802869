"""The simulated human operator of HG-DAgger: the task's scripted expert behind a gating rule.

:class:`InterventionGate` is the rule, a small pure state machine over two numbers per step
(how far the policy's proposal is from the expert's action, how far the task is from done) and
the hand position;
unit tests drive it with constructed sequences. :class:`GatedExpertOperator` wires it to the
expert and implements :class:`~producers.interfaces.Operator`.

The rule, per step while the policy drives:
- *divergence*: the proposal is farther than ``divergence_threshold`` from the expert's action
  on ``takeover_after`` consecutive steps, or
- *stalled*: over the last ``stall_steps`` steps the task's progress distance improved by less
  than ``stall_min_progress`` *and* the hand moved (net) less than ``stall_min_motion``. Both,
  because the experts themselves first move away from the goal for up to ~35 steps (to approach
  from above or from the side), which a distance-only rule flags as a stall;
then the operator decides to take over and does so ``reaction_delay`` steps later (the policy
keeps acting meanwhile). While the operator drives, it hands back once the policy's proposals
have been on track (within ``on_track_threshold``) for ``handback_after`` consecutive steps, or
after ``max_drive_steps`` steps of driving.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from producers.interfaces import Observation, OperatorDecision, Robot

DIVERGENCE = "divergence"
STALLED = "stalled"
ON_TRACK = "on-track"
MAX_DRIVE = "max-drive"

ARM_DIMS = 3  # MetaWorld actions: xyz hand displacement, then the gripper command


@dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    divergence_threshold: float = 0.5  # on the arm distance (0.5 beat 1.0 in the prototype, env-notes)
    # The expert's gripper command is bang-bang (±1): a full gripper disagreement (difference 2)
    # adds gripper_weight to the distance. Kept below the threshold so the gripper alone never
    # triggers a takeover.
    gripper_weight: float = 0.25
    takeover_after: int = 3  # k consecutive divergent steps
    reaction_delay: int = 2  # steps between deciding and taking control
    stall_steps: int | None = 20  # s steps without progress; None disables stall detection
    stall_min_progress: float = 0.01  # metres the progress distance must shrink within the window
    stall_min_motion: float = 0.02  # metres the hand must move (net) within the window
    on_track_threshold: float | None = None  # None: the divergence threshold
    handback_after: int = 5  # m consecutive on-track proposals
    max_drive_steps: int = 25  # hand back after driving this many steps at most

    def __post_init__(self) -> None:
        if not self.divergence_threshold > 0:
            raise ValueError(f"OperatorConfig.divergence_threshold must be > 0, got {self.divergence_threshold}")
        if not 0 <= self.gripper_weight < self.divergence_threshold:
            raise ValueError(
                f"OperatorConfig.gripper_weight must be in [0, divergence_threshold={self.divergence_threshold}) "
                f"so a gripper disagreement alone cannot trigger a takeover, got {self.gripper_weight}"
            )
        for name in ("takeover_after", "handback_after", "max_drive_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"OperatorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.reaction_delay < 0:
            raise ValueError(f"OperatorConfig.reaction_delay must be >= 0, got {self.reaction_delay}")
        if self.stall_steps is not None and self.stall_steps < 1:
            raise ValueError(f"OperatorConfig.stall_steps must be >= 1 or None to disable, got {self.stall_steps}")
        if self.stall_min_progress < 0 or self.stall_min_motion < 0:
            raise ValueError(
                "OperatorConfig.stall_min_progress and stall_min_motion must be >= 0, "
                f"got {self.stall_min_progress} and {self.stall_min_motion}"
            )
        if self.on_track_threshold is not None and not self.on_track_threshold > 0:
            raise ValueError(f"OperatorConfig.on_track_threshold must be > 0 or None, got {self.on_track_threshold}")

    @property
    def on_track(self) -> float:
        return self.divergence_threshold if self.on_track_threshold is None else self.on_track_threshold


def action_divergence(proposed: np.ndarray, expert: np.ndarray, gripper_weight: float) -> float:
    """Distance between two actions: Euclidean on the arm dims plus the gripper disagreement
    scaled to at most ``gripper_weight`` (the gripper range [-1, 1] has width 2)."""
    arm = float(np.linalg.norm(np.asarray(proposed[:ARM_DIMS]) - np.asarray(expert[:ARM_DIMS])))
    if len(proposed) <= ARM_DIMS:
        return arm
    gripper = float(np.max(np.abs(np.asarray(proposed[ARM_DIMS:]) - np.asarray(expert[ARM_DIMS:]))))
    return arm + gripper_weight * min(gripper, 2.0) / 2.0


class GateState(Enum):
    POLICY = "policy"
    PENDING = "pending"  # the operator decided to take over and is reacting; the policy still acts
    HUMAN = "human"


@dataclass(frozen=True)
class GateStep:
    in_control: bool  # the human drives this step
    changed: bool = False  # control changed hands at this step
    reason: str = ""


class InterventionGate:
    """The takeover / hand-back rule as a pure state machine (see the module docstring)."""

    def __init__(self, config: OperatorConfig | None = None) -> None:
        self.config = config or OperatorConfig()
        self.reset()

    def reset(self) -> None:
        self.state = GateState.POLICY
        self._divergent = 0
        self._delay_left = 0
        self._reason = ""
        self._on_track = 0
        self._driven = 0
        self._reset_stall()

    def update(
        self, divergence: float, progress: float | None = None, position: np.ndarray | None = None
    ) -> GateStep:
        """Advance one step: ``divergence`` of the policy's proposal from the expert's action, the
        task's ``progress`` distance and the hand ``position`` before the step (None: that stall
        criterion is not checked; both None: no stall detection)."""
        if self.state is GateState.HUMAN:
            return self._while_human(divergence)
        if self.state is GateState.POLICY:
            reason = self._watch(divergence, progress, position)
            if not reason:
                return GateStep(in_control=False)
            self.state, self._reason, self._delay_left = GateState.PENDING, reason, self.config.reaction_delay
        if self._delay_left > 0:
            self._delay_left -= 1
            return GateStep(in_control=False)
        return self._take_over()

    def _watch(self, divergence: float, progress: float | None, position: np.ndarray | None) -> str:
        self._divergent = self._divergent + 1 if divergence > self.config.divergence_threshold else 0
        if self._divergent >= self.config.takeover_after:
            return DIVERGENCE
        if self.config.stall_steps is None or (progress is None and position is None):
            return ""
        self._window.append((progress, None if position is None else np.array(position, dtype=np.float64)))
        return STALLED if self._stalled() else ""

    def _stalled(self) -> bool:
        if len(self._window) <= self.config.stall_steps:
            return False
        (first_progress, first_position), *rest = self._window
        progresses = [p for p, _ in rest if p is not None]
        progressed = (
            first_progress is not None
            and bool(progresses)
            and first_progress - min(progresses) >= self.config.stall_min_progress
        )
        last_position = rest[-1][1]
        moved = (
            first_position is not None
            and last_position is not None
            and float(np.linalg.norm(last_position - first_position)) >= self.config.stall_min_motion
        )
        return not (progressed or moved)

    def _take_over(self) -> GateStep:
        self.state, self._on_track, self._driven = GateState.HUMAN, 0, 1
        return GateStep(in_control=True, changed=True, reason=self._reason)

    def _while_human(self, divergence: float) -> GateStep:
        self._on_track = self._on_track + 1 if divergence <= self.config.on_track else 0
        if self._on_track >= self.config.handback_after:
            return self._hand_back(ON_TRACK)
        if self._driven >= self.config.max_drive_steps:
            return self._hand_back(MAX_DRIVE)
        self._driven += 1
        return GateStep(in_control=True)

    def _hand_back(self, reason: str) -> GateStep:
        self.state, self._divergent = GateState.POLICY, 0
        self._reset_stall()
        return GateStep(in_control=False, changed=True, reason=reason)

    def _reset_stall(self) -> None:
        size = None if self.config.stall_steps is None else self.config.stall_steps + 1
        self._window: deque[tuple[float | None, np.ndarray | None]] = deque(maxlen=size)


ExpertFn = Callable[[str, np.ndarray], np.ndarray]
ProgressFn = Callable[[str, np.ndarray], float]


class GatedExpertOperator:
    """The simulated human: the task's scripted expert behind an :class:`InterventionGate`.
    Implements :class:`~producers.interfaces.Operator`.

    ``expert(task, state)`` gives the human's action and ``progress(task, state)`` the task's
    distance to done; both default to the MetaWorld experts of :mod:`sim.expert`.
    """

    def __init__(
        self,
        config: OperatorConfig | None = None,
        *,
        operator_id: str = "sim-expert",
        expert: ExpertFn | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        if expert is None or progress is None:
            from sim.expert import expert_action, progress_distance  # imports MetaWorld

            expert = expert or expert_action
            progress = progress or progress_distance
        self.config = config or OperatorConfig()
        self.operator_id = operator_id
        self._expert = expert
        self._progress = progress
        self.gate = InterventionGate(self.config)

    def reset(self, robot: Robot) -> None:
        self.gate.reset()

    def decide(self, observation: Observation, proposed_action: np.ndarray) -> OperatorDecision:
        expert = self._expert(observation.task, observation.proprio)
        divergence = action_divergence(proposed_action, expert, self.config.gripper_weight)
        progress = position = None
        if self.config.stall_steps is not None:
            progress = self._progress(observation.task, observation.proprio)
            position = observation.proprio[:ARM_DIMS]  # the hand's xyz leads the MetaWorld state
        step = self.gate.update(divergence, progress, position)
        return OperatorDecision(
            in_control=step.in_control,
            action=expert if step.in_control else None,
            changed=step.changed,
            reason=step.reason,
        )
