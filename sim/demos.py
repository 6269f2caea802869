"""Offline demonstrations: scripted-expert episodes with noise, as wire records.

Each episode is yielded as a list of records: its ``Step`` records in step order, then its
``EpisodeEvent`` ENDED record (the last element; tell them apart by ``record["kind"]`` or by
position). In every Step:

- ``action`` is the *executed* action: the expert's action plus Gaussian noise of std
  ``noise_sigma`` (clipped to [-1, 1]), so the data covers states slightly off the expert's path;
- ``policy_action`` is the *clean* expert action in the observed state: the label to learn;
- ``controller`` is ``"HUMAN"`` (an expert drove) and ``policy_version`` is ``"expert"``.

Episode ids are deterministic (``demo:{task}:{seed}``) so regenerating a data set yields the same
ids and a writer can upsert instead of duplicating. Seeds come from ``tasks.DEMO_SEEDS`` only.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from producers.actor import episode_event, now_us, step_record
from producers.images import DEFAULT_JPEG_QUALITY
from schemas.records import Outcome
from sim.expert import EXPERT_VERSION, ExpertPolicy, expert_action
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
from sim.tasks import DEFAULT_SUITE, DEMO_SEEDS

DEMO_ACTOR_ID = "demo-expert"


def demo_episode_id(task: str, seed: int) -> str:
    return f"demo:{task}:{seed}"


def demo_task(episode_id: str) -> str:
    """The task of a :func:`demo_episode_id` (e.g. to count episodes per task)."""
    return episode_id.split(":")[1]


def generate_demonstrations(
    tasks: Sequence[str] = DEFAULT_SUITE,
    episodes_per_task: int = 10,
    noise_sigma: float = 0.2,
    seed: int = DEMO_SEEDS.start,
    image_size: int | tuple[int, int] = 64,
    *,
    cameras: tuple[str, ...] = ("corner",),
    render: bool = True,
    max_steps: int = 150,
    image_encoding: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    actor_id: str = DEMO_ACTOR_ID,
) -> Iterator[list[dict]]:
    """Yield ``episodes_per_task`` demonstration episodes per task (task after task). Arguments
    are checked at the call, before the first episode is simulated.

    Episode ``i`` of every task uses placement seed ``seed + i``; the noise of that episode is
    seeded from (``seed + i``, task name), so the whole data set is reproducible.
    """
    if episodes_per_task < 0:
        raise ValueError(f"episodes_per_task must be >= 0, got {episodes_per_task}")
    last = seed + episodes_per_task - 1
    if episodes_per_task and (seed not in DEMO_SEEDS or last not in DEMO_SEEDS):
        raise ValueError(
            f"demonstration seeds {seed}..{last} must lie in DEMO_SEEDS "
            f"({DEMO_SEEDS.start}..{DEMO_SEEDS.stop - 1}) to stay apart from online and eval seeds"
        )
    configs = [
        MetaWorldRobotConfig(task=task, cameras=cameras, image_size=image_size, render=render, max_steps=max_steps)
        for task in tasks
    ]
    noise = ExpertPolicy(noise_sigma=noise_sigma)  # validates sigma now, not at the first episode
    return _episodes(configs, range(seed, seed + episodes_per_task), noise.noise_sigma, actor_id, image_encoding, jpeg_quality)


def _episodes(
    configs: list[MetaWorldRobotConfig],
    seeds: range,
    noise_sigma: float,
    actor_id: str,
    image_encoding: str,
    jpeg_quality: int,
) -> Iterator[list[dict]]:
    for config in configs:
        with MetaWorldRobot(config) as robot:
            for seed in seeds:
                noise = ExpertPolicy(noise_sigma=noise_sigma, seed=noise_seed(seed, config.task))
                yield demo_episode(
                    robot, noise, seed=seed, actor_id=actor_id, image_encoding=image_encoding, jpeg_quality=jpeg_quality
                )


def noise_seed(seed: int, task: str) -> int:
    """The noise seed of a task's episode at placement ``seed`` (independent of the task list)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode())]).generate_state(1)[0])


def demo_episode(
    robot: MetaWorldRobot,
    noise: ExpertPolicy,
    *,
    seed: int,
    actor_id: str = DEMO_ACTOR_ID,
    image_encoding: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
) -> list[dict]:
    """One demonstration episode of ``robot`` at placement ``seed``: Steps, then EpisodeEvent ENDED."""
    episode_id = demo_episode_id(robot.task, seed)
    obs = robot.reset(seed=seed)
    records: list[dict] = []
    outcome: Outcome = "TIMEOUT"
    while True:
        clean = expert_action(obs.task, obs.proprio)
        executed = noise.perturb(clean)
        executed_at = now_us()
        result = robot.act(executed)
        step = step_record(
            episode_id=episode_id,
            actor_id=actor_id,
            step_index=len(records),
            observation=obs,
            action=executed,
            policy_action=clean,
            human=True,
            policy_version=EXPERT_VERSION,
            result=result,
            event_time_us=executed_at,
            image_encoding=image_encoding,
            jpeg_quality=jpeg_quality,
        )
        records.append(dict(step))
        if result.success or result.timeout:
            outcome = "SUCCESS" if result.success else "TIMEOUT"
            break
        obs = result.observation
    ended = episode_event(
        "ENDED",
        episode_id=episode_id,
        actor_id=actor_id,
        task=robot.task,
        instruction=obs.instruction,
        policy_version=EXPERT_VERSION,
        seed=seed,
        outcome=outcome,
        num_steps=len(records),
    )
    records.append(dict(ended))
    return records
