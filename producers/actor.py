"""The actor loop: runs episodes of a robot with a policy and an operator and emits every record
of them (``EpisodeEvent``, ``Step``, ``InterventionEvent``) to an ``EventSink``.

Owns the record shapes an actor produces, the episode life cycle (STARTED, one Step per step,
interventions paired STARTED/ENDED, ENDED with an outcome even when stopped or failing), the
switch of policy versions between episodes, and real-time pacing.

``hold`` (optional, e.g. ``EventPublisher.wait_for_room``) is called before every step with the stop
event: it blocks while the sink cannot take more (the publisher's spool is full and Kafka is away), so
the robot pauses between steps, or raises to end the episode ABORTED and stop the actor.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from producers.images import DEFAULT_JPEG_QUALITY, camera_images
from producers.interfaces import (
    EpisodeStats,
    EventSink,
    Observation,
    Operator,
    Policy,
    PolicySource,
    Robot,
    StepResult,
)
from schemas.records import EpisodeEvent, InterventionEvent, Outcome, Step

EPISODE_END = "episode-end"


def now_us() -> int:
    return time.time_ns() // 1000


class RatePacer:
    """Paces a loop to ``hz`` ticks per second. A late tick does not cause a burst of catch-up
    ticks: the schedule restarts from now, as a physical robot would drop the missed cycles."""

    def __init__(self, hz: float, *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        if not hz > 0:
            raise ValueError(f"control rate must be > 0 Hz, got {hz}")
        self.period = 1.0 / hz
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def restart(self) -> None:
        self._next = None

    def wait(self) -> None:
        now = self._clock()
        if self._next is None or now > self._next + self.period:
            self._next = now + self.period
            return
        if self._next > now:
            self._sleep(self._next - now)
        self._next += self.period


class ListSink:
    """An ``EventSink`` that keeps ``(record name, record, key)`` in a list (tests, demos, replay)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict, str]] = []

    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        self.records.append((record_name, record, key))

    def flush(self, timeout_s: float = 30.0) -> int:
        return 0

    def of(self, record_name: str) -> list[dict]:
        return [record for name, record, _ in self.records if name == record_name]


class StaticPolicySource:
    """A ``PolicySource`` that always answers the same policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def current(self) -> Policy:
        return self.policy


def as_floats(values: np.ndarray) -> list[float]:
    return np.asarray(values, dtype=np.float32).ravel().tolist()


def step_record(
    *,
    episode_id: str,
    actor_id: str,
    step_index: int,
    observation: Observation,
    action: np.ndarray,
    policy_action: np.ndarray | None,
    human: bool,
    policy_version: str,
    result: StepResult,
    event_time_us: int,
    image_encoding: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> Step:
    """The ``Step`` record of one executed action; images and proprio are the observation *before* it."""
    return Step(
        episode_id=episode_id,
        actor_id=actor_id,
        task=observation.task,
        instruction=observation.instruction,
        step_index=step_index,
        event_time_us=event_time_us,
        policy_version=policy_version,
        images=camera_images(observation.images, encoding=image_encoding, quality=jpeg_quality),
        proprio=as_floats(observation.proprio),
        action=as_floats(action),
        policy_action=None if policy_action is None else as_floats(policy_action),
        controller="HUMAN" if human else "POLICY",
        env_reward=result.env_reward,
        success=result.success,
    )


def episode_event(
    kind: str,
    *,
    episode_id: str,
    actor_id: str,
    task: str,
    instruction: str,
    policy_version: str,
    seed: int | None,
    outcome: Outcome | None = None,
    num_steps: int | None = None,
) -> EpisodeEvent:
    return EpisodeEvent(
        episode_id=episode_id,
        kind=kind,  # type: ignore[typeddict-item]
        actor_id=actor_id,
        task=task,
        instruction=instruction,
        policy_version=policy_version,
        event_time_us=now_us(),
        seed=seed,
        outcome=outcome,
        num_steps=num_steps,
    )


def intervention_event(
    kind: str, *, episode_id: str, actor_id: str, task: str, step_index: int, operator_id: str, reason: str
) -> InterventionEvent:
    return InterventionEvent(
        episode_id=episode_id,
        kind=kind,  # type: ignore[typeddict-item]
        actor_id=actor_id,
        task=task,
        step_index=step_index,
        event_time_us=now_us(),
        operator_id=operator_id,
        reason=reason or "unspecified",
    )


def run_episode(
    robot: Robot,
    policy: Policy,
    operator: Operator | None,
    sink: EventSink,
    *,
    actor_id: str,
    episode_id: str,
    seed: int | None,
    image_encoding: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    instruction: str | None = None,
    stop: threading.Event | None = None,
    pacer: RatePacer | None = None,
    hold: Callable[[threading.Event | None], None] | None = None,
) -> EpisodeStats:
    """Run one episode and publish all its records (see :mod:`producers.interfaces` for the loop).

    ``operator=None`` runs the policy alone. Setting ``stop`` ends the episode before its next
    step with outcome ABORTED. If the robot, policy or operator raises, the episode is still
    closed (open intervention ended, EpisodeEvent ENDED ABORTED) before the error propagates.
    """
    started = time.perf_counter()
    version = policy.version
    obs = robot.reset(seed=seed, instruction=instruction)
    if operator is not None:
        operator.reset(robot)
    ids = {"episode_id": episode_id, "actor_id": actor_id}
    about = {**ids, "task": obs.task, "instruction": obs.instruction, "policy_version": version, "seed": seed}
    sink.publish("EpisodeEvent", episode_event("STARTED", **about), key=episode_id)

    def intervention(kind: str, step_index: int, reason: str) -> None:
        assert operator is not None
        record = intervention_event(
            kind, **ids, task=obs.task, step_index=step_index, operator_id=operator.operator_id, reason=reason
        )
        sink.publish("InterventionEvent", record, key=episode_id)

    human = False
    interventions = human_steps = step_index = 0
    outcome: Outcome = "ABORTED"
    if pacer is not None:
        pacer.restart()
    try:
        while stop is None or not stop.is_set():
            if hold is not None:
                hold(stop)  # a full spool pauses the robot here, between steps
                if stop is not None and stop.is_set():
                    break
            proposed = np.asarray(policy.act(obs), dtype=np.float32)
            action = proposed
            if operator is not None:
                decision = operator.decide(obs, proposed)
                if decision.in_control != human:  # trust the hand-over itself, not only decision.changed
                    human = decision.in_control
                    intervention("STARTED" if human else "ENDED", step_index, decision.reason)
                    interventions += 1 if human else 0
                if human:
                    if decision.action is None:
                        raise ValueError(f"operator {operator.operator_id!r} took control without an action")
                    action = np.asarray(decision.action, dtype=np.float32)
            if pacer is not None:
                pacer.wait()
            executed_at = now_us()
            result = robot.act(action)
            record = step_record(
                **ids,
                step_index=step_index,
                observation=obs,
                action=action,
                policy_action=proposed,
                human=human,
                policy_version=version,
                result=result,
                event_time_us=executed_at,
                image_encoding=image_encoding,
                jpeg_quality=jpeg_quality,
            )
            sink.publish("Step", record, key=episode_id)
            step_index += 1
            human_steps += 1 if human else 0
            if result.success or result.timeout:
                outcome = "SUCCESS" if result.success else "TIMEOUT"
                break
            obs = result.observation
    finally:
        if human:
            intervention("ENDED", step_index, EPISODE_END)
        ended = episode_event("ENDED", **about, outcome=outcome, num_steps=step_index)
        sink.publish("EpisodeEvent", ended, key=episode_id)
    duration = time.perf_counter() - started
    return EpisodeStats(
        episode_id=episode_id,
        task=obs.task,
        policy_version=version,
        outcome=outcome,
        num_steps=step_index,
        interventions=interventions,
        human_steps=human_steps,
        extra={"seed": seed, "duration_s": duration, "actor_id": actor_id},
    )


@dataclass(frozen=True, kw_only=True)
class ActorConfig:
    actor_id: str
    control_hz: float | None = None  # None: as fast as the machine allows
    # Episode n runs seed seed_start + n * seed_stride; the caller owns the seed ranges (the simulated
    # fleet starts at sim.tasks.ONLINE_SEEDS.start, so its episodes never reuse a demonstration seed).
    seed_start: int = 0
    seed_stride: int = 1  # N actors sharing a seed range: stride N, start offset by actor index
    max_episodes: int | None = None  # None: until stopped
    image_encoding: str = "jpeg"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if not self.actor_id:
            raise ValueError("ActorConfig.actor_id must be a non-empty name for this robot")
        if self.control_hz is not None and not self.control_hz > 0:
            raise ValueError(f"ActorConfig.control_hz must be > 0, or None to run free, got {self.control_hz}")
        if self.seed_stride < 1:
            raise ValueError(f"ActorConfig.seed_stride must be >= 1, got {self.seed_stride}")
        if self.max_episodes is not None and self.max_episodes < 0:
            raise ValueError(f"ActorConfig.max_episodes must be >= 0 or None, got {self.max_episodes}")


class Actor:
    """Loops episodes over ``robots`` (one per task, taken in turn) with the policy that
    ``policy_source`` answers at the start of each episode, until ``stop()`` or ``max_episodes``.

    The policy never changes inside an episode: a new version is picked up at the next one.
    """

    def __init__(
        self,
        robots: Sequence[Robot],
        policy_source: PolicySource,
        operator: Operator | None,
        sink: EventSink,
        config: ActorConfig,
        *,
        stop_event: threading.Event | None = None,
        on_episode: Callable[[EpisodeStats], None] | None = None,
        hold: Callable[[threading.Event | None], None] | None = None,
    ) -> None:
        if not robots:
            raise ValueError("Actor needs at least one robot")
        self.robots = list(robots)
        self.policy_source = policy_source
        self.operator = operator
        self.sink = sink
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.on_episode = on_episode
        self.hold = hold
        self.history: list[EpisodeStats] = []
        self._run_id = uuid.uuid4().hex[:8]
        self._pacer = RatePacer(config.control_hz) if config.control_hz else None

    def stop(self) -> None:
        self.stop_event.set()

    def episode_id(self, n: int) -> str:
        return f"{self.config.actor_id}-{self._run_id}-{n:06d}"

    def seed(self, n: int) -> int:
        return self.config.seed_start + n * self.config.seed_stride

    def run(self) -> list[EpisodeStats]:
        """Run episodes until stopped; returns the stats of the episodes run by this call."""
        done: list[EpisodeStats] = []
        n = len(self.history)
        try:
            while not self.stop_event.is_set():
                if self.config.max_episodes is not None and n >= self.config.max_episodes:
                    break
                stats = run_episode(
                    self.robots[n % len(self.robots)],
                    self.policy_source.current(),
                    self.operator,
                    self.sink,
                    actor_id=self.config.actor_id,
                    episode_id=self.episode_id(n),
                    seed=self.seed(n),
                    image_encoding=self.config.image_encoding,
                    jpeg_quality=self.config.jpeg_quality,
                    stop=self.stop_event,
                    pacer=self._pacer,
                    hold=self.hold,
                )
                self.history.append(stats)
                done.append(stats)
                n += 1
                if self.on_episode is not None:
                    self.on_episode(stats)
        finally:
            self.sink.flush()
        return done

    def start(self) -> threading.Thread:
        """Run in a daemon thread (a robot renders from the thread that runs it)."""
        thread = threading.Thread(target=self.run, name=f"actor-{self.config.actor_id}", daemon=True)
        thread.start()
        return thread
