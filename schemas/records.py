"""Python shapes of the wire records (plain dicts, as fastavro reads and writes them)."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

RECORD_NAMES = ("Step", "EpisodeEvent", "InterventionEvent")

# Default topic base names per record; the topic prefix ("sop.") is a setting.
TOPIC_OF_RECORD = {"Step": "steps", "EpisodeEvent": "episodes", "InterventionEvent": "interventions"}

Controller = Literal["POLICY", "HUMAN"]
Outcome = Literal["SUCCESS", "FAILURE", "TIMEOUT", "ABORTED"]


class CameraImage(TypedDict):
    camera: str
    encoding: str
    width: int
    height: int
    data: bytes


class Step(TypedDict):
    episode_id: str
    actor_id: str
    task: str
    instruction: str
    step_index: int
    event_time_us: int
    policy_version: str
    images: list[CameraImage]
    proprio: list[float]
    action: list[float]
    policy_action: list[float] | None
    controller: Controller
    env_reward: NotRequired[float | None]
    success: NotRequired[bool]


class EpisodeEvent(TypedDict):
    episode_id: str
    kind: Literal["STARTED", "ENDED"]
    actor_id: str
    task: str
    instruction: str
    policy_version: str
    event_time_us: int
    seed: NotRequired[int | None]
    outcome: NotRequired[Outcome | None]
    num_steps: NotRequired[int | None]


class InterventionEvent(TypedDict):
    episode_id: str
    kind: Literal["STARTED", "ENDED"]
    actor_id: str
    task: str
    step_index: int
    event_time_us: int
    operator_id: str
    reason: str
