"""Incremental reads (only new rows, never again after compaction), projection, filters, time travel."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lakehouse import (
    STEPS,
    IncrementalReader,
    Lakehouse,
    ReaderFellBehindError,
    VersionNotFoundError,
    compact,
    conform,
    history,
    rows_since,
    snapshot,
    snapshot_batches,
    vacuum,
    version_at,
)


def append(lake: Lakehouse, rows: list[dict[str, Any]]) -> int:
    dt = lake.table("steps")
    write_deltalake(dt, conform(STEPS, rows), mode="append")
    return dt.version()


def keys(table: Any) -> list[tuple[str, int]]:
    return sorted(zip(table.column("episode_id").to_pylist(), table.column("step_index").to_pylist(), strict=True))


def test_rows_since_returns_only_rows_of_later_commits(lake: Lakehouse, steps_of: Any) -> None:
    append(lake, steps_of("e0", n=3))
    dt = lake.table("steps")
    first, v = rows_since(dt, None)  # a new reader starts from a snapshot
    assert keys(first) == [("e0", i) for i in range(3)]
    assert first.schema == STEPS.schema
    append(lake, steps_of("e1", n=2))
    append(lake, steps_of("e2", n=1))
    new, v2 = rows_since(dt, v)
    assert keys(new) == [("e1", 0), ("e1", 1), ("e2", 0)]
    assert new.schema == STEPS.schema
    assert v2 == v + 2
    nothing, v3 = rows_since(dt, v2)
    assert nothing.num_rows == 0 and v3 == v2


def test_compaction_does_not_redeliver_rows(lake: Lakehouse, steps_of: Any) -> None:
    for k in range(4):
        v = append(lake, steps_of(f"e{k}", n=2))
    dt = lake.table("steps")
    middle = v - 2  # e0, e1 read; e2, e3 not yet
    result = compact(dt)
    assert result.files_removed == 4 and result.files_added == 1
    v_new = append(lake, steps_of("e4", n=2))
    after, end = rows_since(dt, v)
    assert keys(after) == [("e4", 0), ("e4", 1)]
    assert end == v_new
    pending, _ = rows_since(dt, middle)  # a reader that lagged behind the compaction
    assert keys(pending) == [(e, i) for e in ("e2", "e3", "e4") for i in (0, 1)]


def test_projection_and_task_filter(lake: Lakehouse, steps_of: Any) -> None:
    v0 = append(lake, steps_of("a0", n=2, task="reach-v3"))
    append(lake, steps_of("b0", n=3, task="drawer-open-v3"))
    append(lake, steps_of("a1", n=1, task="reach-v3"))
    dt = lake.table("steps")
    cols = ["episode_id", "step_index", "task"]
    new, _ = rows_since(dt, v0, columns=cols, tasks=["reach-v3"])
    assert new.column_names == cols
    assert keys(new) == [("a1", 0)]
    snap, _ = snapshot(dt, columns=cols, tasks=["drawer-open-v3"])
    assert keys(snap) == [("b0", i) for i in range(3)]
    none, _ = rows_since(dt, v0, tasks=[])
    assert none.num_rows == 0


def test_snapshot_batches_stream_the_same_rows(lake: Lakehouse, steps_of: Any) -> None:
    append(lake, steps_of("e0", n=5, task="reach-v3"))
    v = append(lake, steps_of("e1", n=4, task="drawer-open-v3"))
    batches, version = snapshot_batches(lake.table("steps"), tasks=["reach-v3"], batch_size=2)
    rows = pa.Table.from_batches(list(batches))
    assert version == v and rows.schema == STEPS.schema
    assert keys(rows) == [("e0", i) for i in range(5)]


def test_date_filter_reads_recent_partitions(lake: Lakehouse, steps_of: Any) -> None:
    day = 86_400 * 1_000_000
    append(lake, steps_of("old", n=1, t0_us=1_795_000_000_000_000 - 3 * day))
    append(lake, steps_of("new", n=1))
    recent, _ = snapshot(lake.table("steps"), since_date=date(2026, 11, 17), columns=["episode_id", "step_index"])
    assert keys(recent) == [("new", 0)]


def test_max_versions_bounds_one_read(lake: Lakehouse, steps_of: Any) -> None:
    v0 = append(lake, steps_of("e0", n=1))
    for k in range(1, 4):
        append(lake, steps_of(f"e{k}", n=1))
    dt = lake.table("steps")
    part, v = rows_since(dt, v0, max_versions=2, with_commit_version=True)
    assert keys(part) == [("e1", 0), ("e2", 0)] and v == v0 + 2
    assert sorted(part.column("_commit_version").to_pylist()) == [v0 + 1, v0 + 2]
    rest, _ = rows_since(dt, v, max_versions=2)
    assert keys(rest) == [("e3", 0)]


def test_incremental_reader_polls(lake: Lakehouse, steps_of: Any) -> None:
    append(lake, steps_of("e0", n=2))
    dt = lake.table("steps")
    from_start = IncrementalReader(dt)
    only_new = IncrementalReader(lake.table("steps"), start="latest")
    assert keys(from_start.poll()) == [("e0", 0), ("e0", 1)]
    assert only_new.poll().num_rows == 0
    append(lake, steps_of("e1", n=1))
    assert keys(from_start.poll()) == [("e1", 0)]
    assert keys(only_new.poll()) == [("e1", 0)]
    assert from_start.poll().num_rows == 0 and from_start.caught_up
    assert from_start.rows_read == 3
    resumed = IncrementalReader(lake.table("steps"), start=from_start.version)
    assert resumed.poll().num_rows == 0


def test_time_travel_by_version_and_timestamp(lake: Lakehouse, steps_of: Any) -> None:
    versions = []
    for k in range(3):
        versions.append(append(lake, steps_of(f"e{k}", n=1)))
        time.sleep(0.01)  # distinct commit timestamps (milliseconds), not a timing assertion
    dt = lake.table("steps")
    at_v1, v = snapshot(dt, as_of=versions[1])
    assert keys(at_v1) == [("e0", 0), ("e1", 0)] and v == versions[1]
    assert dt.version() == versions[2]  # the caller's handle did not move

    stamp = {c.version: c.timestamp for c in history(dt)}[versions[1]]
    assert version_at(dt, stamp) == versions[1]
    at_time, _ = snapshot(dt, as_of=stamp + timedelta(microseconds=500))
    assert keys(at_time) == [("e0", 0), ("e1", 0)]
    assert keys(snapshot(dt, as_of=stamp.isoformat())[0]) == [("e0", 0), ("e1", 0)]
    assert lake.table("steps", as_of=versions[0]).version() == versions[0]

    with pytest.raises(VersionNotFoundError):
        snapshot(dt, as_of=datetime(2000, 1, 1, tzinfo=UTC))
    with pytest.raises(VersionNotFoundError):
        snapshot(dt, as_of=versions[2] + 5)


def test_a_reader_behind_vacuum_is_told_to_restart(lake: Lakehouse, steps_of: Any) -> None:
    v0 = append(lake, steps_of("e0", n=1))
    append(lake, steps_of("e1", n=1))
    dt = lake.table("steps")
    compact(dt)
    assert vacuum(dt, retention_hours=0, dry_run=False, enforce_retention=False)
    with pytest.raises(ReaderFellBehindError, match="Restart the reader from a snapshot"):
        rows_since(dt, v0 - 1)
    assert keys(rows_since(dt, None)[0]) == [("e0", 0), ("e1", 0)]
