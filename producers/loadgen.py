"""A load generator: realistic step / episode / intervention streams from N simulated robots, no simulator.

Used by tests and benchmarks of the pipeline. Each robot runs episodes of random length with
JPEG camera frames (drawn from a pre-encoded pool, so generation is cheap), a 39-d state, a 4-d
action and human takeovers at a configurable rate; records are the real wire records.

    report = run_loadgen(LoadGenConfig(robots=20, hz=30, duration_s=60), publisher)
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from producers.interfaces import EventSink
from schemas.images import jpeg_pool

TASKS = ("pick-place-v3", "assembly-v3", "drawer-open-v3", "box-close-v3")
INSTRUCTIONS = {
    "pick-place-v3": "pick up the puck and place it at the goal",
    "assembly-v3": "put the ring on the peg",
    "drawer-open-v3": "open the drawer",
    "box-close-v3": "put the lid on the box",
}


# The simulated fleet's camera names (MetaWorld's), so load-generated steps pass the processor's default task
# contracts: ``--cameras 3`` sends corner, corner2, corner3 (set SOP_ACTOR_CAMERAS for the processor to match).
SIM_CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")


def camera_name(c: int) -> str:
    return SIM_CAMERAS[c] if c < len(SIM_CAMERAS) else f"camera{c}"


@dataclass(frozen=True, kw_only=True)
class LoadGenConfig:
    robots: int = 4
    hz: float = 30.0  # control rate per robot; 0 = as fast as possible
    duration_s: float | None = 10.0  # stop starting episodes after this long
    episodes: int | None = None  # or after this many episodes
    image_size: int = 64
    cameras: int = 1
    min_steps: int = 20
    max_steps: int = 150
    success_rate: float = 0.6
    intervention_rate: float = 0.3  # share of episodes with a human takeover
    proprio_dim: int = 39
    action_dim: int = 4
    seed: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    image_pool: int = 32
    # per-camera capture timestamps (Step v2's CameraImage.capture_time_us); off = records a v1 producer writes
    capture_times: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.robots < 1:
            problems.append(f"robots must be >= 1, got {self.robots}")
        if self.hz < 0:
            problems.append(f"hz must be >= 0 (0 = free-running), got {self.hz}")
        if self.duration_s is None and self.episodes is None:
            problems.append("give a duration or a number of episodes, or it never ends")
        if not 8 <= self.image_size <= 1024:
            problems.append(f"image_size must be in 8..1024, got {self.image_size}")
        if not 1 <= self.cameras <= 16:
            problems.append(f"cameras must be in 1..16, got {self.cameras}")
        if not 1 <= self.min_steps <= self.max_steps:
            problems.append(f"need 1 <= min_steps <= max_steps, got {self.min_steps}..{self.max_steps}")
        if not (0 <= self.success_rate <= 1 and 0 <= self.intervention_rate <= 1):
            problems.append("success_rate and intervention_rate must be in [0, 1]")
        if problems:
            raise ValueError("LoadGenConfig: " + "; ".join(problems))


@dataclass
class LoadGenReport:
    episodes: int = 0
    steps: int = 0
    interventions: int = 0
    outcomes: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    episode_ids: list[str] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Episode:
    episode_id: str
    task: str
    length: int
    success: bool
    takeover: tuple[int, int] | None  # [start, end) step range under human control
    next_step: int = 0


class _RobotStream:
    """One robot's records, one control tick at a time."""

    def __init__(self, cfg: LoadGenConfig, index: int, pool: list[bytes], rng: np.random.Generator) -> None:
        self.cfg, self.pool, self.rng = cfg, pool, rng
        self.actor_id = f"loadgen-{cfg.run_id}-{index}"
        self.counter = 0
        self.episode: _Episode | None = None

    def start_episode(self) -> _Episode:
        cfg, rng = self.cfg, self.rng
        self.counter += 1
        length = int(rng.integers(cfg.min_steps, cfg.max_steps + 1))
        takeover = None
        if rng.random() < cfg.intervention_rate and length >= 4:
            start = int(rng.integers(1, length - 2))
            takeover = (start, min(length, start + int(rng.integers(2, 15))))
        self.episode = _Episode(episode_id=f"{self.actor_id}-{self.counter}", task=TASKS[int(rng.integers(len(TASKS)))],
                                length=length, success=bool(rng.random() < cfg.success_rate), takeover=takeover)
        return self.episode

    def tick(self) -> list[tuple[str, dict]]:
        """The records of the next step of the current episode (STARTED before the first, ENDED after the last)."""
        ep, cfg = self.episode, self.cfg
        assert ep is not None
        now = time.time_ns() // 1000
        out: list[tuple[str, dict]] = []
        base = {"episode_id": ep.episode_id, "actor_id": self.actor_id, "task": ep.task}
        i = ep.next_step
        if i == 0:
            out.append(("EpisodeEvent", {**base, "kind": "STARTED", "instruction": INSTRUCTIONS[ep.task],
                                         "policy_version": "0", "event_time_us": now, "seed": self.counter,
                                         "outcome": None, "num_steps": None}))
        human = ep.takeover is not None and ep.takeover[0] <= i < ep.takeover[1]
        if ep.takeover is not None and i == ep.takeover[0]:
            out.append(("InterventionEvent", {**base, "kind": "STARTED", "step_index": i, "event_time_us": now,
                                              "operator_id": "loadgen-operator", "reason": "divergence"}))
        if ep.takeover is not None and i == ep.takeover[1]:
            out.append(("InterventionEvent", {**base, "kind": "ENDED", "step_index": i, "event_time_us": now,
                                              "operator_id": "loadgen-operator", "reason": "on-track"}))
        proposed = self.rng.uniform(-1, 1, cfg.action_dim).astype(np.float32).tolist()
        images = [{"camera": camera_name(c), "encoding": "jpeg", "width": cfg.image_size, "height": cfg.image_size,
                   "data": self.pool[int(self.rng.integers(len(self.pool)))]} for c in range(cfg.cameras)]
        if cfg.capture_times:  # exposed 15-35 ms before the action, cameras a little apart
            for img in images:
                img["capture_time_us"] = now - int(self.rng.integers(15_000, 35_000))
        last = i == ep.length - 1
        out.append(("Step", {**base, "instruction": INSTRUCTIONS[ep.task], "step_index": i, "event_time_us": now,
                             "policy_version": "0", "images": images,
                             "proprio": self.rng.normal(0, 1, cfg.proprio_dim).astype(np.float32).tolist(),
                             "action": self.rng.uniform(-1, 1, cfg.action_dim).astype(np.float32).tolist() if human else proposed,
                             "policy_action": proposed, "controller": "HUMAN" if human else "POLICY",
                             "env_reward": None, "success": bool(last and ep.success)}))
        ep.next_step += 1
        if last:
            if ep.takeover is not None and ep.takeover[1] >= ep.length:
                out.append(("InterventionEvent", {**base, "kind": "ENDED", "step_index": ep.length, "event_time_us": now,
                                                  "operator_id": "loadgen-operator", "reason": "episode-end"}))
            out.append(("EpisodeEvent", {**base, "kind": "ENDED", "instruction": INSTRUCTIONS[ep.task],
                                         "policy_version": "0", "event_time_us": now, "seed": self.counter,
                                         "outcome": "SUCCESS" if ep.success else "TIMEOUT", "num_steps": ep.length}))
            self.episode = None
        return out


def iter_fleet(cfg: LoadGenConfig, *, stop: threading.Event | None = None) -> Iterator[tuple[str, dict]]:
    """Records of the whole fleet, robots interleaved one tick each; ends per the config's limits (no pacing)."""
    rng = np.random.default_rng(cfg.seed)
    pool = jpeg_pool(cfg.image_pool, cfg.image_size, cfg.seed)
    robots = [_RobotStream(cfg, i, pool, np.random.default_rng([cfg.seed, i])) for i in range(cfg.robots)]
    started = 0
    t0 = time.monotonic()
    del rng
    while True:
        expired = (stop is not None and stop.is_set()) or (
            cfg.duration_s is not None and time.monotonic() - t0 >= cfg.duration_s)
        active = 0
        for robot in robots:
            if robot.episode is None:
                if expired or (cfg.episodes is not None and started >= cfg.episodes):
                    continue
                robot.start_episode()
                started += 1
            active += 1
            yield from robot.tick()
        if active == 0:
            return


def run_loadgen(cfg: LoadGenConfig, sink: EventSink, *, stop: threading.Event | None = None,
                progress: callable | None = None) -> LoadGenReport:  # type: ignore[valid-type]
    """Publish the fleet's records to ``sink`` at ``cfg.hz`` per robot (or free-running) and count them."""
    report = LoadGenReport()
    t0 = time.monotonic()
    tick_period = 1.0 / cfg.hz if cfg.hz > 0 else 0.0
    steps_in_tick = 0
    next_tick = t0
    for name, record in iter_fleet(cfg, stop=stop):
        sink.publish(name, record, key=record["episode_id"])
        if name == "Step":
            report.steps += 1
            steps_in_tick += 1
            # one "tick" = one step of every robot; pace ticks to the control rate
            if tick_period and steps_in_tick >= cfg.robots:
                steps_in_tick = 0
                next_tick += tick_period
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_tick = time.monotonic()
            if progress is not None and report.steps % 500 == 0:
                progress(report)
        elif name == "EpisodeEvent" and record["kind"] == "ENDED":
            report.episodes += 1
            report.outcomes[record["outcome"]] += 1
            report.episode_ids.append(record["episode_id"])
        elif name == "InterventionEvent" and record["kind"] == "STARTED":
            report.interventions += 1
    report.elapsed_s = time.monotonic() - t0
    return report
