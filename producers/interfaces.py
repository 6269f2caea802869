"""The seams of the robot side. A real robot and a real teleoperation device plug in here.

The actor loop, in full (``producers.actor`` runs it and publishes every record)::

    policy = policy_source.current()                 # the version the fleet follows
    obs = robot.reset(seed=seed)                     # Observation: images, proprio, instruction
    operator.reset(robot)
    while True:
        proposed = policy.act(obs)                   # the policy always proposes
        decision = operator.decide(obs, proposed)    # the human may take over (or hand back)
        action = decision.action if decision.in_control else proposed
        result = robot.act(action)                   # executes, returns success / timeout
        sink.publish("Step", ...)                    # one Step record per step
        if result.success or result.timeout: break
        obs = result.observation
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, kw_only=True)
class Observation:
    """What a robot senses before an action."""

    images: dict[str, np.ndarray]  # camera name -> HxWx3 uint8 RGB, rows top to bottom
    proprio: np.ndarray  # float32 state vector
    instruction: str
    task: str


@dataclass(frozen=True, kw_only=True)
class StepResult:
    observation: Observation  # the observation after the action
    success: bool  # the task is solved
    timeout: bool  # the episode ran out of steps
    env_reward: float | None = None


@runtime_checkable
class Robot(Protocol):
    """A robot (simulated or real) running one task at a time."""

    task: str
    action_dim: int

    def reset(self, *, seed: int | None = None, instruction: str | None = None) -> Observation:
        """Start a new episode (new object/goal placement from ``seed``) and return the first observation."""
        ...

    def observe(self) -> Observation:
        """The current observation, without acting."""
        ...

    def act(self, action: np.ndarray) -> StepResult:
        """Execute one action (clipped to the robot's limits) at the robot's control rate."""
        ...


@dataclass(frozen=True, kw_only=True)
class OperatorDecision:
    in_control: bool  # the human drives this step
    action: np.ndarray | None  # the human's action when in_control (else may be None)
    changed: bool = False  # control changed hands at this step
    reason: str = ""  # why control changed ('divergence', 'stalled', 'on-track', ...)


@runtime_checkable
class Operator(Protocol):
    """A human (or a simulated one) who watches a robot and may take over."""

    operator_id: str

    def reset(self, robot: Robot) -> None:
        """Prepare for a new episode of ``robot``."""
        ...

    def decide(self, observation: Observation, proposed_action: np.ndarray) -> OperatorDecision:
        """Look at the robot and the policy's proposal; take over, keep driving, or hand back."""
        ...


@runtime_checkable
class Policy(Protocol):
    """The policy runtime an actor runs: a registered version, loaded and ready to act."""

    version: str

    def act(self, observation: Observation) -> np.ndarray:
        """The action for ``observation`` (conditioned on its instruction)."""
        ...


@runtime_checkable
class PolicySource(Protocol):
    """Where an actor gets the policy to run (the registry alias the fleet follows)."""

    def current(self) -> Policy:
        """The newest loaded policy; never blocks on a download."""
        ...


@runtime_checkable
class EventSink(Protocol):
    """Where an actor's records go (Kafka in production; a list in unit tests of the loop)."""

    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        """Queue one record (``Step``, ``EpisodeEvent``, ``InterventionEvent``) keyed by episode id."""
        ...

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for queued records to be delivered; return how many are still undelivered."""
        ...


@dataclass
class EpisodeStats:
    episode_id: str
    task: str
    policy_version: str
    outcome: str
    num_steps: int
    interventions: int = 0
    human_steps: int = 0
    extra: dict = field(default_factory=dict)
