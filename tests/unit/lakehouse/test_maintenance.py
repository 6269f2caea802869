"""Compaction, vacuum, history and the compaction schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lakehouse import (
    CompactionSchedule,
    Lakehouse,
    LakehouseError,
    compact,
    history,
    maybe_compact,
    small_files,
    vacuum,
)


def parquet_files(root: str) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*.parquet") if "_delta_log" not in p.parts}


def test_compaction_merges_small_files_and_keeps_rows(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix="g")
    for k in range(6):
        task = "reach-v3" if k % 2 else "drawer-open-v3"
        writer.write(steps_of(f"e{k}", n=2, task=task, offsets=[2 * k, 2 * k + 1]), offsets={0: 2 * k + 1})
    dt = lake.table("steps")
    assert len(dt.file_uris()) == 6 and small_files(dt) == 6
    result = compact(dt)
    assert (result.files_removed, result.files_added, result.partitions_optimized) == (6, 2, 2)
    assert len(dt.file_uris()) == 2
    assert dt.to_pyarrow_table().num_rows == 12
    assert writer.committed_offset(0) == 11  # compaction keeps the app transactions
    assert compact(dt).files_added == 0  # idempotent


def test_vacuum_removes_only_unreferenced_files(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix="g")
    for k in range(4):
        writer.write(steps_of(f"e{k}", n=1, offsets=[k]), offsets={0: k})
    dt = lake.table("steps")
    before = parquet_files(dt.table_uri.removeprefix("file://"))
    compact(dt)
    with pytest.raises(LakehouseError, match="enforce_retention=False"):
        vacuum(dt, retention_hours=0, dry_run=True)
    listed = vacuum(dt, retention_hours=0, dry_run=True, enforce_retention=False)
    assert set(listed) == before
    assert parquet_files(dt.table_uri.removeprefix("file://")) >= before  # dry run deletes nothing
    vacuum(dt, retention_hours=0, dry_run=False, enforce_retention=False)
    remaining = parquet_files(dt.table_uri.removeprefix("file://"))
    assert remaining == {Path(uri).relative_to(dt.table_uri.removeprefix("file://")).as_posix() for uri in dt.file_uris()}
    assert dt.to_pyarrow_table().num_rows == 4
    assert vacuum(dt) == []  # default retention: a week


def test_history_lists_commits_newest_first(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix="sop-processor.sop.steps")
    writer.write(steps_of("e0", n=2), offsets={0: 1})
    writer.write(steps_of("e1", n=2, offsets=[2, 3]), offsets={0: 3})
    compact(lake.table("steps"))
    commits = history(lake.table("steps"))
    assert [c.operation for c in commits] == ["OPTIMIZE", "WRITE", "WRITE", "CREATE TABLE"]
    assert [c.version for c in commits] == [3, 2, 1, 0]
    assert commits[1].writer == "sop-processor.sop.steps"
    assert commits[1].parameters["partitionBy"] == ["task", "event_date"]
    assert commits[0].timestamp >= commits[3].timestamp
    assert len(history(lake.table("steps"), limit=1)) == 1


def test_schedule_compacts_after_enough_small_files_or_time() -> None:
    schedule = CompactionSchedule(last_compaction_at=100.0, min_small_files=3, max_interval_s=60.0)
    assert not schedule.due(now=1_000.0)  # nothing written: nothing to compact, however long ago
    schedule.record_write(files_added=2)
    assert not schedule.due(now=120.0)
    schedule.record_write(files_added=1)
    assert schedule.due(now=120.0)
    schedule.record_compaction(now=120.0)
    assert not schedule.due(now=121.0)
    schedule.record_write(files_added=1)
    assert not schedule.due(now=179.0)
    assert schedule.due(now=180.0)


def test_maybe_compact_follows_the_schedule(lake: Lakehouse, steps_of: Any) -> None:
    writer = lake.writer("steps", app_id_prefix="g")
    schedule = CompactionSchedule(last_compaction_at=0.0, min_small_files=3, max_interval_s=1e9)
    results = []
    for k in range(6):
        written = writer.write(steps_of(f"e{k}", n=1, offsets=[k]), offsets={0: k})
        schedule.record_write(files_added=written.files_added)
        results.append(maybe_compact(lake.table("steps"), schedule, now=float(k)))
    assert [r is not None for r in results] == [False, False, True, False, False, True]
    assert len(lake.table("steps").file_uris()) == 1


def test_the_time_trigger_fires_on_the_processor_clock() -> None:
    # one clock for creating, asking and recording: the schedule made "now" is due max_interval_s later
    import time

    from lakehouse.maintenance import CompactionSchedule as Schedule

    schedule = Schedule(min_small_files=10_000, max_interval_s=0.05)
    schedule.record_write(files_added=1)
    assert not schedule.due(now=time.monotonic())
    time.sleep(0.06)
    assert schedule.due(now=time.monotonic())


def test_vacuum_runs_on_its_schedule(lake: Lakehouse, steps_of: Any) -> None:
    from lakehouse.maintenance import VacuumSchedule, maybe_vacuum

    table = lake.table("steps")
    schedule = VacuumSchedule(interval_s=100.0, retention_hours=None, last_vacuum_at=0.0)
    assert maybe_vacuum(table, schedule, now=50.0) is None
    assert maybe_vacuum(table, schedule, now=150.0) == []  # due: ran (nothing old enough to delete)
    assert schedule.last_vacuum_at == 150.0
    assert maybe_vacuum(table, schedule, now=200.0) is None
