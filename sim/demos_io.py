"""Offline demonstrations into the Delta ``demonstrations`` table, exactly once.

The one demonstrations writer (``sop demos`` and ``sop run`` both use it).
``write_demonstrations(lake, episodes)`` takes episodes as ``sim.demos.generate_demonstrations`` yields
them (the ``Step`` records, then the ``EpisodeEvent`` ENDED record) and appends them with the columns the
stream processor fills for online steps at close (RECAP ``reward``, normalised ``mc_return``, ``outcome``,
``episode_length``), so the value model trains on both tables alike. Rerunning it writes nothing twice:
episodes whose id is already in the table are skipped (demonstration ids are ``demo:{task}:{seed}``), and
each commit records the highest seed it wrote per task as a Delta application transaction
(``{app_id_prefix}.{task}``), so the table's log says how far a crashed run got.

``make_demonstrations`` generates and writes in one go, with a per-task episode count: the base policy is
meant to be imperfect, and how imperfect depends on the task (``BASE_DEMOS_PER_TASK``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lakehouse import DEMONSTRATIONS, Lakehouse
from rewards.config import RecapConfig
from rewards.recap import episode_targets

DEMO_APP_PREFIX = "sop-demos"
STEP_FIELDS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
               "images", "proprio", "action", "policy_action", "controller", "env_reward", "success")

# Demonstrations per task of the default suite for a deliberately imperfect base policy after ``sop pretrain``'s
# defaults (600 steps, EMA 0.99, seed 0). Measured here: success per task swings by +-0.2-0.4 from one
# pretraining run to another (another seed, or one demonstration more of any task), more than the count of a
# task's own demonstrations moves it, so these counts were chosen by runs of the real pipeline, which is
# deterministic for given data and settings. Drawer-open is so easy that two demonstrations give 1.0.
BASE_DEMOS_PER_TASK: Mapping[str, int] = {
    "pick-place-v3": 12,
    "assembly-v3": 6,
    "drawer-open-v3": 1,
    "box-close-v3": 18,
}
BASE_DEMO_NOISE = 0.2


@dataclass
class DemoWriteReport:
    """What one ``write_demonstrations`` call did."""

    episodes_written: int = 0
    episodes_skipped: int = 0  # already in the table
    rows_written: int = 0
    successes: int = 0  # written episodes whose outcome is SUCCESS
    versions: list[int] = field(default_factory=list)  # Delta versions committed

    @property
    def table_version(self) -> int | None:
        return self.versions[-1] if self.versions else None


def split_episode(records: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], Mapping[str, Any]]:
    """The ``Step`` records and the ENDED ``EpisodeEvent`` of one generated episode."""
    if not records:
        raise ValueError("an episode needs at least its ENDED event")
    *steps, ended = records
    if ended.get("kind") != "ENDED":
        raise ValueError(f"the last record of an episode must be its EpisodeEvent ENDED; got {ended.get('kind')!r}")
    if any("step_index" not in s for s in steps):
        raise ValueError("every record before the ENDED event must be a Step")
    return steps, ended


def demonstration_rows(records: Sequence[Mapping[str, Any]], *, recap: RecapConfig | None = None) -> list[dict[str, Any]]:
    """The ``demonstrations`` rows of one episode, with the RECAP columns computed as at close."""
    steps, ended = split_episode(records)
    if not steps:
        return []
    cfg = recap or RecapConfig()
    task = str(ended["task"])
    outcome = str(ended.get("outcome") or "TIMEOUT")
    ordered = sorted(steps, key=lambda s: s["step_index"])
    targets = episode_targets(outcome, len(ordered), max_episode_length=cfg.max_steps(task),
                              c_fail=cfg.failure_penalty(task), n_step=cfg.n_step,
                              timeout_is_failure=cfg.timeout_is_failure)
    rows = []
    for i, step in enumerate(ordered):
        row = {k: step.get(k) for k in STEP_FIELDS}
        row["success"] = bool(step.get("success", False))
        row.update(reward=float(targets.rewards[i]), mc_return=float(targets.normalised_returns[i]), value=None,
                   advantage=None, advantage_source=None, outcome=outcome, episode_length=len(ordered))
        rows.append(row)
    return rows


def demo_app_id(task: str, seed: int, *, prefix: str = DEMO_APP_PREFIX) -> str:
    """The Delta application transaction that marks demonstration (task, seed) as written."""
    return f"{prefix}.{task}.seed-{seed}"


def is_written(table: Any, task: str, seed: int, *, prefix: str = DEMO_APP_PREFIX) -> bool:
    """Whether the ``demonstrations`` table (a ``DeltaTable``) holds episode (task, seed) already."""
    if table.transaction_version(demo_app_id(task, seed, prefix=prefix)) is not None:
        return True
    # Tables written before one transaction per episode carry the highest seed written per task; those
    # writers filled seeds upward from the first, so every seed up to that marker is in the table.
    legacy = table.transaction_version(f"{prefix}.{task}")
    return legacy is not None and seed <= legacy


def write_demonstrations(lake: Lakehouse, episodes: Iterable[Sequence[Mapping[str, Any]]], *,
                         recap: RecapConfig | None = None, app_id_prefix: str = DEMO_APP_PREFIX,
                         metadata: Mapping[str, str] | None = None,
                         on_episode: Callable[[str, bool], None] | None = None) -> DemoWriteReport:
    """Append generated demonstration episodes to ``demonstrations``, each exactly once.

    Every episode is one Delta commit carrying the application transaction ``{prefix}.{task}.seed-{seed}``
    (the seed comes from its ENDED event): an episode already recorded is skipped, and two writers at once
    cannot both write it (the loser's commit is dropped by the exactly-once writer and counted as skipped).
    ``on_episode(id, written)`` is called for each, e.g. to advance a progress bar.
    """
    writer = lake.writer(DEMONSTRATIONS.name, app_id_prefix=app_id_prefix)
    writer.table.update_incremental()
    report = DemoWriteReport()
    for records in episodes:
        steps, ended = split_episode(records)
        episode_id, task = str(ended["episode_id"]), str(ended["task"])
        if ended.get("seed") is None:
            raise ValueError(f"demonstration {episode_id!r} has no seed in its ENDED event: it names its "
                             "exactly-once transaction")
        seed = int(ended["seed"])
        written = False
        if steps and not is_written(writer.table, task, seed, prefix=app_id_prefix):
            result = writer.write(demonstration_rows(records, recap=recap),
                                  app_transactions={demo_app_id(task, seed, prefix=app_id_prefix): 1},
                                  metadata={**(metadata or {}), "sop.demos.episode": episode_id})
            written = result.rows_written > 0  # 0: another writer recorded it meanwhile
            if written:
                report.rows_written += result.rows_written
                report.successes += ended.get("outcome") == "SUCCESS"
                if result.version is not None:
                    report.versions.append(result.version)
        report.episodes_written += written
        report.episodes_skipped += not written
        if on_episode is not None:
            on_episode(episode_id, written)
    return report


def make_demonstrations(lake: Lakehouse, *, episodes_per_task: int | Mapping[str, int] = BASE_DEMOS_PER_TASK,
                        tasks: Sequence[str] | None = None, noise_sigma: float = BASE_DEMO_NOISE,
                        image_size: int = 64, cameras: tuple[str, ...] = ("corner",), max_steps: int = 150,
                        recap: RecapConfig | None = None, progress: bool = False, seed_start: int | None = None,
                        jpeg_quality: int | None = None,
                        on_episode: Callable[[str, bool], None] | None = None) -> DemoWriteReport:
    """Generate scripted-expert demonstrations (``sim.demos``) and write them exactly once (``sop demos``,
    ``sop run``).

    ``episodes_per_task`` is one count for every task or a count per task; ``tasks`` defaults to the tasks
    of that mapping, or to ``sim.tasks.DEFAULT_SUITE``. Episode ``i`` of a task uses seed ``seed_start + i``
    (default ``DEMO_SEEDS.start``). Episodes already in the table are not simulated again.
    """
    from producers.images import DEFAULT_JPEG_QUALITY
    from sim.demos import generate_demonstrations
    from sim.tasks import DEFAULT_SUITE, DEMO_SEEDS

    if tasks is None:
        tasks = tuple(episodes_per_task) if isinstance(episodes_per_task, Mapping) else DEFAULT_SUITE
    counts = {t: int(episodes_per_task[t] if isinstance(episodes_per_task, Mapping) else episodes_per_task)
              for t in tasks}
    bad = {t: n for t, n in counts.items() if n < 0}
    if bad:
        raise ValueError(f"episodes_per_task must be >= 0 per task; got {bad}")
    start = DEMO_SEEDS.start if seed_start is None else seed_start
    table = lake.table(DEMONSTRATIONS.name)
    todo = {t: [s for s in range(start, start + n) if not is_written(table, t, s)] for t, n in counts.items()}
    skipped = sum(counts[t] - len(left) for t, left in todo.items())
    metadata = {"sop.demos.noise_sigma": str(noise_sigma), "sop.demos.image_size": str(image_size)}

    def generated() -> Iterable[list[dict]]:
        for task, seeds in todo.items():
            # Contiguous runs of missing seeds, each generated in one call (one simulator per call).
            for first, count in _runs(seeds):
                yield from generate_demonstrations([task], episodes_per_task=count, noise_sigma=noise_sigma,
                                                   seed=first, image_size=image_size, cameras=cameras,
                                                   max_steps=max_steps,
                                                   jpeg_quality=jpeg_quality or DEFAULT_JPEG_QUALITY)

    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            job = bar.add_task("demonstrations", total=sum(counts.values()), completed=skipped)

            def advance(episode_id: str, written: bool) -> None:
                bar.update(job, advance=1)
                if on_episode is not None:
                    on_episode(episode_id, written)

            report = write_demonstrations(lake, generated(), recap=recap, metadata=metadata, on_episode=advance)
    else:
        report = write_demonstrations(lake, generated(), recap=recap, metadata=metadata, on_episode=on_episode)
    report.episodes_skipped += skipped
    return report


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, length)]`` of the consecutive runs in sorted ``values``."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs
