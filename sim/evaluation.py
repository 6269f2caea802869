"""Evaluating a policy in simulation: seeded held-out episodes per task, no operator, no Kafka.

Episode ``i`` of every task uses placement seed ``seeds[i]`` (by default ``EVAL_SEEDS``, disjoint from the
demonstration and online seeds), so two policies evaluated with the same arguments face the same
placements. Each episode runs through ``producers.actor.run_episode`` as on a robot, with the records going
to a list that is dropped afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from producers.interfaces import EpisodeStats, Policy


def load_triton_before_rendering() -> None:
    """Import triton (if installed) before MuJoCo opens a GL context in this process.

    Mesa's software EGL and triton each load their own LLVM; importing triton *after* a frame was rendered
    segfaults (measured here), and transformers imports it when MiniLM loads, e.g. for a paraphrase the
    policy's embedding table lacks. Loaded first, both coexist.
    """
    with contextlib.suppress(ImportError):
        import triton  # noqa: F401


load_triton_before_rendering()


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    task: str
    episodes: int
    successes: int
    mean_steps: float

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


def _encoder_of(policy: Any) -> Any:
    runtime = getattr(policy, "runtime", None) or policy  # a wrapper holding a PolicyRuntime, or one itself
    model = getattr(runtime, "model", None)
    return getattr(getattr(model, "config", None), "encoder", None)


def evaluate_policy_detailed(policy: Policy, tasks: Sequence[str], episodes_per_task: int,
                             seeds: Sequence[int] | range | None = None, paraphrase: int | None = None, *,
                             max_steps: int = 150, image_size: int | None = None,
                             cameras: tuple[str, ...] | None = None, progress: bool = False,
                             on_episode: Callable[[EpisodeStats], None] | None = None) -> dict[str, TaskResult]:
    """Per-task results of ``episodes_per_task`` episodes each (see :func:`evaluate_policy`)."""
    from producers.actor import ListSink, run_episode
    from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
    from sim.tasks import EVAL_SEEDS, instruction_for

    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1; got {episodes_per_task}")
    seed_list = list(EVAL_SEEDS if seeds is None else seeds)[:episodes_per_task]
    if len(seed_list) < episodes_per_task:
        raise ValueError(f"{episodes_per_task} episodes per task need as many seeds; got {len(seed_list)}")
    encoder = _encoder_of(policy)
    size = image_size or (encoder.image_size if encoder is not None else 64)
    cams = cameras or (tuple(encoder.cameras) if encoder is not None else ("corner",))
    results: dict[str, TaskResult] = {}
    bar_ctx: Any = None
    if progress:
        from rich.progress import Progress

        bar_ctx = Progress(transient=True)
        bar_ctx.start()
        job = bar_ctx.add_task("evaluating", total=len(tasks) * episodes_per_task)
    try:
        for task in tasks:
            instruction = None if paraphrase is None else instruction_for(task, paraphrase)
            config = MetaWorldRobotConfig(task=task, cameras=cams, image_size=size, render=True, max_steps=max_steps)
            successes = steps = 0
            with MetaWorldRobot(config) as robot:
                for i, seed in enumerate(seed_list):
                    stats = run_episode(robot, policy, None, ListSink(), actor_id="eval",
                                        episode_id=f"eval:{task}:{seed}", seed=seed, instruction=instruction)
                    successes += stats.outcome == "SUCCESS"
                    steps += stats.num_steps
                    if on_episode is not None:
                        on_episode(stats)
                    if bar_ctx is not None:
                        bar_ctx.update(job, advance=1, description=f"{task} {successes}/{i + 1}")
            results[task] = TaskResult(task=task, episodes=len(seed_list), successes=successes,
                                       mean_steps=steps / len(seed_list))
    finally:
        if bar_ctx is not None:
            bar_ctx.stop()
    return results


def evaluate_policy(policy: Policy, tasks: Sequence[str], episodes_per_task: int,
                    seeds: Sequence[int] | range | None = None, paraphrase: int | None = None, *,
                    max_steps: int = 150, image_size: int | None = None, cameras: tuple[str, ...] | None = None,
                    progress: bool = False, on_episode: Callable[[EpisodeStats], None] | None = None
                    ) -> dict[str, float]:
    """Success rate per task over ``episodes_per_task`` seeded episodes (``seeds`` default: ``EVAL_SEEDS``).

    ``paraphrase`` gives the policy the task's ``paraphrase``-th held-out phrasing instead of the canonical
    instruction (language generalisation). Cameras and image size default to the policy's own encoder.
    The operator is off and rendering on; nothing is published.
    """
    detailed = evaluate_policy_detailed(policy, tasks, episodes_per_task, seeds, paraphrase, max_steps=max_steps,
                                        image_size=image_size, cameras=cameras, progress=progress,
                                        on_episode=on_episode)
    return {task: r.success_rate for task, r in detailed.items()}
