"""Table maintenance: compaction of the small files that streaming appends leave, vacuum, and history.

Compaction commits carry ``dataChange=false``: incremental readers (:mod:`lakehouse.reader`) do not see
the rewritten rows again. Vacuum deletes files no version within the retention references any more; an
incremental reader or a time-travel query older than the retention then fails, so keep the retention above
the longest a reader may lag (default: the table's ``delta.deletedFileRetentionDuration``, one week).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError, DeltaError

from lakehouse.errors import LakehouseError, WriteConflictError

DEFAULT_TARGET_SIZE = 128 * 1024 * 1024
DEFAULT_SMALL_FILE_BYTES = 16 * 1024 * 1024

PartitionFilter = tuple[str, str, Any]


@dataclass(frozen=True)
class CompactionResult:
    version: int  # table version after compaction (unchanged when there was nothing to compact)
    files_added: int
    files_removed: int
    partitions_optimized: int


def compact(
    table: DeltaTable,
    *,
    target_size: int = DEFAULT_TARGET_SIZE,
    partition_filters: Sequence[PartitionFilter] | None = None,
    max_concurrent_tasks: int | None = None,
    max_retries: int = 5,
) -> CompactionResult:
    """Rewrite small files into files of about ``target_size`` bytes, per partition (order kept)."""
    for attempt in range(max_retries + 1):
        try:
            metrics = table.optimize.compact(
                partition_filters=list(partition_filters) if partition_filters else None,
                target_size=target_size, max_concurrent_tasks=max_concurrent_tasks,
            )
            break
        except CommitFailedError as exc:
            if attempt == max_retries:
                raise WriteConflictError(
                    f"compaction of {table.table_uri} conflicted {attempt + 1} times ({exc}); another compaction "
                    f"or a delete/update is running: run it again later"
                ) from exc
            table.update_incremental()
        except DeltaError as exc:
            raise LakehouseError(f"compaction of {table.table_uri} failed: {exc}") from exc
    return CompactionResult(
        version=table.version(),
        files_added=int(metrics.get("numFilesAdded", 0)),
        files_removed=int(metrics.get("numFilesRemoved", 0)),
        partitions_optimized=int(metrics.get("partitionsOptimized", 0)),
    )


def vacuum(
    table: DeltaTable,
    *,
    retention_hours: float | None = None,
    dry_run: bool = True,
    enforce_retention: bool = True,
) -> list[str]:
    """Delete (or with ``dry_run`` only list) files no version within ``retention_hours`` references.

    ``retention_hours=None`` uses the table's ``delta.deletedFileRetentionDuration`` (one week by default);
    a shorter one needs ``enforce_retention=False`` and breaks readers and time travel older than it.
    """
    if retention_hours is not None and retention_hours < 0:
        raise LakehouseError(f"retention_hours must be >= 0, got {retention_hours}")
    try:
        return table.vacuum(
            retention_hours=None if retention_hours is None else math.ceil(retention_hours),
            dry_run=dry_run, enforce_retention_duration=enforce_retention,
        )
    except DeltaError as exc:
        hint = ""
        if "retention" in str(exc).lower():
            hint = (" — the retention is shorter than the table's delta.deletedFileRetentionDuration: pass "
                    "enforce_retention=False if no reader or time-travel query needs older versions")
        raise LakehouseError(f"vacuum of {table.table_uri} failed: {exc}{hint}") from exc


@dataclass(frozen=True)
class Commit:
    """One entry of a table's history."""

    version: int
    timestamp: datetime
    operation: str
    parameters: dict[str, Any]
    metrics: dict[str, Any]
    writer: str | None  # the ExactlyOnceWriter's app_id_prefix, when it made the commit


def _commit_of(info: dict[str, Any]) -> Commit:
    params = {k: _maybe_json(v) for k, v in (info.get("operationParameters") or {}).items()}
    return Commit(
        version=int(info["version"]),
        timestamp=datetime.fromtimestamp(info.get("timestamp", 0) / 1000, tz=UTC),
        operation=str(info.get("operation", "")),
        parameters=params,
        metrics=dict(info.get("operationMetrics") or {}),
        writer=info.get("sop.writer"),
    )


def _maybe_json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def history(table: DeltaTable, *, limit: int | None = None) -> list[Commit]:
    """The table's commits, newest first."""
    return [_commit_of(info) for info in table.history(limit)]


def small_files(table: DeltaTable, *, max_bytes: int = DEFAULT_SMALL_FILE_BYTES) -> int:
    """How many of the table's current files are smaller than ``max_bytes``."""
    sizes = pa.table(table.get_add_actions()).column("size_bytes")
    return int(pc.sum(pc.less(sizes, max_bytes)).as_py() or 0)


@dataclass
class CompactionSchedule:
    """When to compact: after ``min_small_files`` new small files, or ``max_interval_s`` after the last
    compaction if any file was added since. Pure policy on ONE clock, ``time.monotonic()`` seconds: pass
    ``now`` from it everywhere (creating, asking, recording), or let :func:`maybe_compact` read it.
    """

    last_compaction_at: float = field(default_factory=time.monotonic)  # at start, or at the last compaction
    min_small_files: int = 64
    max_interval_s: float = 900.0
    small_files_since: int = 0

    def record_write(self, *, files_added: int) -> None:
        self.small_files_since += max(0, files_added)

    def due(self, *, now: float) -> bool:
        if self.small_files_since == 0:
            return False
        return self.small_files_since >= self.min_small_files or now - self.last_compaction_at >= self.max_interval_s

    def record_compaction(self, *, now: float) -> None:
        self.small_files_since = 0
        self.last_compaction_at = now


@dataclass
class VacuumSchedule:
    """When to vacuum: every ``interval_s`` (monotonic clock, like :class:`CompactionSchedule`), deleting files
    that no version within ``retention_hours`` references (None: the table's own retention, one week)."""

    interval_s: float = 6 * 3600.0
    retention_hours: float | None = None
    last_vacuum_at: float = field(default_factory=time.monotonic)

    def due(self, *, now: float) -> bool:
        return now - self.last_vacuum_at >= self.interval_s

    def record_vacuum(self, *, now: float) -> None:
        self.last_vacuum_at = now


def maybe_vacuum(table: DeltaTable, schedule: VacuumSchedule, *, now: float | None = None) -> list[str] | None:
    """Vacuum ``table`` for real if ``schedule`` says it is due; the paths deleted, or None when not due."""
    now = time.monotonic() if now is None else now
    if not schedule.due(now=now):
        return None
    schedule.record_vacuum(now=now)  # a failing vacuum is retried at the next interval, not at every flush
    return vacuum(table, retention_hours=schedule.retention_hours, dry_run=False,
                  enforce_retention=schedule.retention_hours is None)


def maybe_compact(
    table: DeltaTable,
    schedule: CompactionSchedule,
    *,
    now: float | None = None,
    target_size: int = DEFAULT_TARGET_SIZE,
) -> CompactionResult | None:
    """Compact ``table`` if ``schedule`` says it is due (``now`` defaults to ``time.monotonic()``)."""
    now = time.monotonic() if now is None else now
    if not schedule.due(now=now):
        return None
    result = compact(table, target_size=target_size)
    schedule.record_compaction(now=now)
    return result
