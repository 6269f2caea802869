"""`sop demos`: noisy scripted-expert episodes into the Delta ``demonstrations`` table, once per (task, seed).

    sop demos --episodes-per-task 10 --noise 0.2
    sop demos --episodes-per-task 25 --tasks drawer-open-v3,box-close-v3 --seed-start 100

Every episode is one Delta commit carrying the application transaction ``sop-demos.<task>.seed-<seed>``:
a rerun (or a run after a crash) skips the (task, seed) pairs the table already holds, and even two runs
at once cannot write an episode twice. The reward and return columns come from the same RECAP functions
the stream processor uses; value and advantage stay empty (demonstrations count as positive).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sim.tasks import DEMO_SEEDS
from sop.actor_settings import load_actor_settings, parse_tasks
from sop.settings import load_settings

APP_ID_PREFIX = "sop-demos"
STEP_COLUMNS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
                "images", "proprio", "action", "policy_action", "controller", "env_reward", "success")


def demo_app_id(task: str, seed: int) -> str:
    """The Delta application transaction that marks episode (task, seed) as written."""
    return f"{APP_ID_PREFIX}.{task}.seed-{seed}"


def demo_rows(records: Sequence[dict], *, max_episode_length: int, c_fail: float | None,
              timeout_is_failure: bool = True) -> list[dict]:
    """``demonstrations`` rows of one episode (its Step records, then its EpisodeEvent ENDED)."""
    from rewards import recap

    *steps, ended = records
    if ended.get("kind") != "ENDED" or not steps:
        raise ValueError("a demonstration episode is its Step records followed by its EpisodeEvent ENDED")
    targets = recap.episode_targets(ended["outcome"], len(steps), max_episode_length=max_episode_length,
                                    c_fail=c_fail, timeout_is_failure=timeout_is_failure)
    rows = []
    for i, step in enumerate(sorted(steps, key=lambda s: s["step_index"])):
        row = {k: step[k] for k in STEP_COLUMNS}
        row.update(reward=float(targets.rewards[i]), mc_return=float(targets.normalised_returns[i]), value=None,
                   advantage=None, advantage_source=None, outcome=ended["outcome"], episode_length=len(steps),
                   kafka_topic=None, kafka_partition=None, kafka_offset=None)
        rows.append(row)
    return rows


@dataclass
class DemoReport:
    written: int = 0
    skipped: int = 0
    rows: int = 0
    successes: int = 0
    table_version: int | None = None


@click.command("demos")
@click.option("--episodes-per-task", default=10, show_default=True, help="Episodes per task (seeds seed-start …).")
@click.option("--noise", "noise_sigma", default=0.2, show_default=True,
              help="Std of the Gaussian noise on the executed action (the label stays the clean expert action).")
@click.option("--tasks", default=None, help="Comma-separated tasks [default: SOP_ACTOR_TASKS].")
@click.option("--seed-start", default=DEMO_SEEDS.start, show_default=True, help="Placement seed of episode 0.")
@click.option("--image-size", type=int, default=None, help="Camera image side [default: SOP_ACTOR_IMAGE_SIZE].")
def command(episodes_per_task: int, noise_sigma: float, tasks: str | None, seed_start: int,
            image_size: int | None) -> None:
    """Write noisy scripted-expert demonstrations into the Delta `demonstrations` table (idempotent)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = load_settings()
    actor_settings = load_actor_settings()
    try:
        task_list = parse_tasks(tasks) if tasks is not None else actor_settings.tasks
        if episodes_per_task < 1:
            raise ValueError(f"--episodes-per-task must be >= 1, got {episodes_per_task}")
        if noise_sigma < 0:
            raise ValueError(f"--noise must be >= 0, got {noise_sigma}")
        last = seed_start + episodes_per_task - 1
        if seed_start not in DEMO_SEEDS or last not in DEMO_SEEDS:
            raise ValueError(f"seeds {seed_start}..{last} must lie in the demonstration seeds "
                             f"{DEMO_SEEDS.start}..{DEMO_SEEDS.stop - 1}")
        size = image_size or actor_settings.actor_image_size
        if not 8 <= size <= 1024:
            raise ValueError(f"--image-size must be in 8..1024, got {size}")
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    console = Console()
    report = write_demos(task_list, range(seed_start, seed_start + episodes_per_task), noise_sigma=noise_sigma,
                         image_size=size, cameras=actor_settings.cameras, jpeg_quality=actor_settings.actor_jpeg_quality,
                         lake_root=settings.lake_root, storage_options=settings.lake_storage_options,
                         max_episode_length=settings.max_episode_steps, c_fail=settings.recap_c_fail, console=console)
    done = report.written
    console.print(f"demonstrations: wrote {done} episode(s) ({report.rows:,} rows; noisy expert success "
                  f"{report.successes / done if done else float('nan'):.2f}), skipped {report.skipped} already in "
                  f"the table; table version {report.table_version} at {settings.lake_root}")


def write_demos(tasks: Sequence[str], seeds: range, *, noise_sigma: float, image_size: int,
                cameras: tuple[str, ...], jpeg_quality: int, lake_root: str, storage_options: dict[str, str] | None,
                max_episode_length: int, c_fail: float | None, console: Console) -> DemoReport:
    from lakehouse import Lakehouse
    from sim.demos import demo_episode, noise_seed
    from sim.expert import ExpertPolicy
    from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

    writer = Lakehouse(lake_root, storage_options=storage_options).writer("demonstrations", app_id_prefix=APP_ID_PREFIX)
    writer.table.update_incremental()
    report = DemoReport()
    todo = {task: [s for s in seeds if writer.table.transaction_version(demo_app_id(task, s)) is None]
            for task in tasks}
    report.skipped = sum(len(seeds) - len(left) for left in todo.values())
    metadata = {"sop.demos.noise_sigma": str(noise_sigma), "sop.demos.image_size": str(image_size)}
    with Progress(TextColumn("[bold]demos[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        bar = progress.add_task("", total=len(tasks) * len(seeds), completed=report.skipped,
                                note=f"{report.skipped} already written" if report.skipped else "")
        for task, left in todo.items():
            if not left:
                continue
            progress.update(bar, description=task)
            config = MetaWorldRobotConfig(task=task, cameras=cameras, image_size=image_size,
                                          max_steps=max_episode_length)
            with MetaWorldRobot(config) as robot:
                for seed in left:
                    noise = ExpertPolicy(noise_sigma=noise_sigma, seed=noise_seed(seed, task))
                    records = demo_episode(robot, noise, seed=seed, jpeg_quality=jpeg_quality)
                    rows = demo_rows(records, max_episode_length=max_episode_length, c_fail=c_fail)
                    result = writer.write(rows, app_transactions={demo_app_id(task, seed): 1},
                                          metadata={**metadata, "sop.demos.episode": records[-1]["episode_id"]})
                    if result.rows_written:
                        report.written += 1
                        report.rows += result.rows_written
                        report.successes += records[-1]["outcome"] == "SUCCESS"
                    else:  # another run wrote it meanwhile
                        report.skipped += 1
                    progress.update(bar, advance=1, note=f"{report.written} written · {report.skipped} skipped")
    report.table_version = writer.table.version()
    return report
