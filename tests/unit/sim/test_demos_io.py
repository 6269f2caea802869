"""Demonstrations into Delta: RECAP columns as at close, written exactly once."""

from pathlib import Path

import numpy as np
import pytest

from lakehouse import Lakehouse, snapshot
from learner.config import RecapConfig
from learner.synthetic import synthetic_episode
from schemas.images import jpeg_pool
from sim.demos_io import DEMO_APP_PREFIX, demonstration_rows, write_demonstrations

FRAMES = jpeg_pool(2, 16)
STEP_KEYS = ("episode_id", "actor_id", "task", "instruction", "step_index", "event_time_us", "policy_version",
             "images", "proprio", "action", "policy_action", "controller", "success")


def generated(task: str, seed: int, *, length: int = 6, outcome: str = "SUCCESS") -> list[dict]:
    """An episode as sim.demos.generate_demonstrations yields it: Steps, then the ENDED event."""
    rows = synthetic_episode(task, length, np.random.default_rng(seed), episode_id=f"demo:{task}:{seed}", demo=True,
                             frames=FRAMES, image_size=16)
    steps = [{k: r[k] for k in STEP_KEYS} for r in rows]
    ended = {"episode_id": f"demo:{task}:{seed}", "kind": "ENDED", "actor_id": "demo-expert", "task": task,
             "instruction": rows[0]["instruction"], "policy_version": "expert", "event_time_us": 1, "seed": seed,
             "outcome": outcome, "num_steps": length}
    return [*steps, ended]


def test_rows_carry_the_recap_columns() -> None:
    rows = demonstration_rows(generated("box-close-v3", 3, length=4, outcome="TIMEOUT"),
                              recap=RecapConfig(max_episode_length=4))
    assert [r["reward"] for r in rows] == [-1.0, -1.0, -1.0, -4.0]
    assert [r["mc_return"] for r in rows] == pytest.approx([-7 / 8, -6 / 8, -5 / 8, -4 / 8])
    assert all(r["outcome"] == "TIMEOUT" and r["episode_length"] == 4 and r["advantage"] is None for r in rows)
    with pytest.raises(ValueError, match="ENDED"):
        demonstration_rows(generated("box-close-v3", 3)[:-1])


def test_writing_twice_adds_nothing(tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    episodes = [generated("drawer-open-v3", s) for s in (0, 1, 2)] + [generated("box-close-v3", 0)]
    first = write_demonstrations(lake, episodes)
    assert (first.episodes_written, first.episodes_skipped, first.rows_written) == (4, 0, 24)
    again = write_demonstrations(lake, episodes + [generated("drawer-open-v3", 3)])
    assert (again.episodes_written, again.episodes_skipped, again.rows_written) == (1, 4, 6)
    table, _ = snapshot(lake.table("demonstrations"), columns=["episode_id", "step_index"])
    assert table.num_rows == 30 and len(set(zip(*table.to_pydict().values(), strict=True))) == 30
    dt = lake.table("demonstrations")  # one exactly-once transaction per episode
    assert all(dt.transaction_version(f"{DEMO_APP_PREFIX}.drawer-open-v3.seed-{s}") == 1 for s in range(4))
    assert dt.transaction_version(f"{DEMO_APP_PREFIX}.box-close-v3.seed-0") == 1
    assert dt.transaction_version(f"{DEMO_APP_PREFIX}.box-close-v3.seed-1") is None


def test_a_table_written_by_the_old_per_task_marker_is_not_written_again(tmp_path: Path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    writer = lake.writer("demonstrations", app_id_prefix=DEMO_APP_PREFIX)
    old = [generated("reach-v3", s) for s in (0, 1)]
    writer.write([r for e in old for r in demonstration_rows(e)], app_transactions={f"{DEMO_APP_PREFIX}.reach-v3": 1})
    report = write_demonstrations(lake, [*old, generated("reach-v3", 2)])
    assert (report.episodes_written, report.episodes_skipped) == (1, 2)


def test_an_episode_without_a_seed_is_refused(tmp_path: Path) -> None:
    episode = generated("reach-v3", 0)
    del episode[-1]["seed"]
    with pytest.raises(ValueError, match="no seed"):
        write_demonstrations(Lakehouse(tmp_path / "lake"), [episode])
