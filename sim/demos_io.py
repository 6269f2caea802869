"""Offline demonstrations into the Delta ``demonstrations`` table, exactly once.

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

import pyarrow.compute as pc

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


def existing_episode_ids(lake: Lakehouse, *, tasks: Iterable[str] | None = None) -> set[str]:
    """Episode ids already in the ``demonstrations`` table (reads one light column)."""
    if not lake.exists(DEMONSTRATIONS.name):
        return set()
    table = lake.table(DEMONSTRATIONS.name)
    task_list = None if tasks is None else sorted(set(tasks))
    expr = None if task_list is None else pc.field("task").isin(task_list)
    predicate = None if task_list is None else "task IN (" + ", ".join(f"'{t}'" for t in task_list) + ")"
    ids = table.to_pyarrow_dataset(file_pruning_predicate=predicate).to_table(columns=["episode_id"], filter=expr)
    return set(pc.unique(ids.column("episode_id")).to_pylist())


def write_demonstrations(lake: Lakehouse, episodes: Iterable[Sequence[Mapping[str, Any]]], *,
                         recap: RecapConfig | None = None, app_id_prefix: str = DEMO_APP_PREFIX,
                         episodes_per_commit: int = 8,
                         on_episode: Callable[[str, bool], None] | None = None) -> DemoWriteReport:
    """Append generated demonstration episodes to ``demonstrations``, skipping those already there.

    Episodes are committed ``episodes_per_commit`` at a time (one task per commit); ``on_episode(id, written)``
    is called for each, e.g. to advance a progress bar.
    """
    if episodes_per_commit < 1:
        raise ValueError(f"episodes_per_commit must be >= 1; got {episodes_per_commit}")
    writer = lake.writer(DEMONSTRATIONS.name, app_id_prefix=app_id_prefix)
    present = existing_episode_ids(lake)
    report = DemoWriteReport()
    pending: list[tuple[str, int | None, list[dict[str, Any]]]] = []  # (task, seed, rows)

    def flush() -> None:
        if not pending:
            return
        rows = [r for _, _, episode_rows in pending for r in episode_rows]
        task = pending[0][0]
        seeds = [s for _, s, _ in pending if s is not None]
        app = f"{app_id_prefix}.{task}"
        committed = writer.table.transaction_version(app)
        # Only a seed beyond the recorded one advances the marker; otherwise the id check alone keeps it
        # idempotent (a marker that does not advance would make the writer drop these rows).
        txns = {app: max(seeds)} if seeds and (committed is None or max(seeds) > committed) else None
        result = writer.write(rows, app_transactions=txns)
        if result.version is not None:
            report.versions.append(result.version)
        report.rows_written += result.rows_written
        pending.clear()

    for records in episodes:
        steps, ended = split_episode(records)
        episode_id = str(ended["episode_id"])
        task = str(ended["task"])
        if episode_id in present or not steps:
            report.episodes_skipped += 1
            if on_episode is not None:
                on_episode(episode_id, False)
            continue
        if pending and pending[0][0] != task:
            flush()
        seed = ended.get("seed")
        pending.append((task, None if seed is None else int(seed), demonstration_rows(records, recap=recap)))
        present.add(episode_id)
        report.episodes_written += 1
        if len(pending) >= episodes_per_commit:
            flush()
        if on_episode is not None:
            on_episode(episode_id, True)
    flush()
    return report


def make_demonstrations(lake: Lakehouse, *, episodes_per_task: int | Mapping[str, int] = BASE_DEMOS_PER_TASK,
                        tasks: Sequence[str] | None = None, noise_sigma: float = BASE_DEMO_NOISE,
                        image_size: int = 64, cameras: tuple[str, ...] = ("corner",), max_steps: int = 150,
                        recap: RecapConfig | None = None, progress: bool = False) -> DemoWriteReport:
    """Generate scripted-expert demonstrations (``sim.demos``) and write them exactly once.

    ``episodes_per_task`` is one count for every task or a count per task; ``tasks`` defaults to the tasks
    of that mapping, or to ``sim.tasks.DEFAULT_SUITE``. Episodes already in the table are not
    simulated again.
    """
    from sim.demos import demo_episode_id, generate_demonstrations
    from sim.tasks import DEFAULT_SUITE, DEMO_SEEDS

    if tasks is None:
        tasks = tuple(episodes_per_task) if isinstance(episodes_per_task, Mapping) else DEFAULT_SUITE
    counts = {t: int(episodes_per_task[t] if isinstance(episodes_per_task, Mapping) else episodes_per_task)
              for t in tasks}
    bad = {t: n for t, n in counts.items() if n < 0}
    if bad:
        raise ValueError(f"episodes_per_task must be >= 0 per task; got {bad}")
    present = existing_episode_ids(lake, tasks=tasks)
    total = sum(counts.values())
    report = DemoWriteReport()

    def generated() -> Iterable[list[dict]]:
        for task, n in counts.items():
            seeds = [s for s in range(DEMO_SEEDS.start, DEMO_SEEDS.start + n) if demo_episode_id(task, s) not in present]
            report.episodes_skipped += n - len(seeds)
            # Contiguous runs of missing seeds, each generated in one call (one simulator per call).
            for start, count in _runs(seeds):
                yield from generate_demonstrations([task], episodes_per_task=count, noise_sigma=noise_sigma, seed=start,
                                                   image_size=image_size, cameras=cameras, max_steps=max_steps)

    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            job = bar.add_task("demonstrations", total=total, completed=0)
            bar.update(job, advance=total - sum(1 for t in counts for s in range(counts[t])
                                                if demo_episode_id(t, DEMO_SEEDS.start + s) not in present))
            written = write_demonstrations(lake, generated(), recap=recap,
                                           on_episode=lambda _id, _w: bar.update(job, advance=1))
    else:
        written = write_demonstrations(lake, generated(), recap=recap)
    written.episodes_skipped += report.episodes_skipped
    return written


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, length)]`` of the consecutive runs in sorted ``values``."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs
