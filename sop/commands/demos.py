"""`sop demos`: noisy scripted-expert episodes into the Delta ``demonstrations`` table, once per (task, seed).

    sop demos --episodes-per-task 10 --noise 0.2
    sop demos --episodes-per-task 25 --tasks drawer-open-v3,box-close-v3 --seed-start 100

The verb parses and checks its options and calls the one demonstrations writer, ``sim.demos_io``: every
episode is one Delta commit carrying the application transaction ``sop-demos.<task>.seed-<seed>``, so a
rerun (or a run after a crash) skips the (task, seed) pairs the table already holds, and even two runs
at once cannot write an episode twice. The reward and return columns come from the same RECAP functions
the stream processor uses; value and advantage stay empty (demonstrations count as positive).
"""

from __future__ import annotations

import os

import click
from rich.console import Console

from sim.tasks import DEMO_SEEDS
from sop.actor_settings import load_actor_settings, parse_tasks
from sop.progress import PerKeyBars, ProgressFile, progress_bars
from sop.settings import load_settings


@click.command("demos")
@click.option("--episodes-per-task", default=10, show_default=True, help="Episodes per task (seeds seed-start …).")
@click.option("--noise", "noise_sigma", default=0.2, show_default=True,
              help="Std of the Gaussian noise on the executed action (the label stays the clean expert action).")
@click.option("--tasks", default=None, help="Comma-separated tasks [default: SOP_ACTOR_TASKS].")
@click.option("--seed-start", default=DEMO_SEEDS.start, show_default=True, help="Placement seed of episode 0.")
@click.option("--image-size", type=int, default=None, help="Camera image side [default: SOP_ACTOR_IMAGE_SIZE].")
@click.option("--progress-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the progress per task to this JSON file, for a parent process to show (sop run).")
def command(episodes_per_task: int, noise_sigma: float, tasks: str | None, seed_start: int,
            image_size: int | None, progress_file: str | None) -> None:
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
    from lakehouse import Lakehouse
    from rewards.config import RecapConfig
    from sim.demos import demo_task
    from sim.demos_io import make_demonstrations

    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options)
    recap = RecapConfig(max_episode_length=settings.max_episode_steps, c_fail=settings.recap_c_fail)
    with progress_bars(console) as progress:
        per_task = PerKeyBars(dict.fromkeys(task_list, episodes_per_task), bars=progress,
                              out=ProgressFile(progress_file), label="demos ")

        def advance(episode_id: str, written: bool) -> None:
            per_task.advance(demo_task(episode_id), written=written)

        report = make_demonstrations(lake, episodes_per_task=episodes_per_task, tasks=task_list,
                                     noise_sigma=noise_sigma, image_size=size, cameras=actor_settings.cameras,
                                     jpeg_quality=actor_settings.actor_jpeg_quality, seed_start=seed_start,
                                     max_steps=settings.max_episode_steps, recap=recap, on_episode=advance)
        per_task.finish()
    done = report.episodes_written
    console.print(f"demonstrations: wrote {done} episode(s) ({report.rows_written:,} rows; noisy expert success "
                  f"{report.successes / done if done else float('nan'):.2f}), skipped {report.episodes_skipped} "
                  f"already in the table; table version {lake.table('demonstrations').version()} at {settings.lake_root}")
