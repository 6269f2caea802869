"""Reading the tables: incrementally (only what commits after a version added), as snapshots, and back in time.

Incremental reads use Delta's change data feed (``DeltaTable.load_cdf``): for an append it returns the
rows of the files that commit added, for an update/delete the change files; it skips commits whose actions
have ``dataChange=false``, so a compaction (OPTIMIZE), which rewrites existing rows into new files, delivers
nothing again. A diff of two snapshots' file lists would not be correct: compaction folds rows that were
already read together with new ones into new files.

Every read returns rows in the current shape, also from a table (or an old version of one) written before
``policy_version`` became a number (``tables.upgrade``); the rewrite a migration commits (its rows are the old
rows again) delivers nothing, and the commits before it are read at their own version and upgraded.

A reader must keep up with vacuum: once the files a pending version added are compacted and vacuumed, its
rows can no longer be read from that version and :class:`ReaderFellBehindError` says to restart from a
snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import date, datetime
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from lakehouse.errors import LakehouseError, ReaderFellBehindError
from lakehouse.tables import (
    arrow_schema,
    migration_versions,
    source_columns,
    time_travel,
    upgrade,
    upgraded_schema,
)

AsOf = int | str | datetime
_ADDED = ("insert", "update_postimage")
_CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")
COMMIT_VERSION = "_commit_version"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sql_predicate(*, tasks: Sequence[str] | None = None, since_date: date | None = None) -> str | None:
    """The SQL predicate (DataFusion syntax) selecting ``tasks`` and event dates from ``since_date`` on."""
    parts = []
    if tasks is not None:
        parts.append(f"task IN ({', '.join(_quote(t) for t in tasks)})" if tasks else "FALSE")
    if since_date is not None:
        parts.append(f"event_date >= '{since_date.isoformat()}'")
    return " AND ".join(parts) or None


def _row_filter(*, tasks: Sequence[str] | None, since_date: date | None) -> ds.Expression | None:
    expr: ds.Expression | None = None
    if tasks is not None:
        expr = pc.field("task").isin(list(tasks))
    if since_date is not None:
        by_date = pc.field("event_date") >= pa.scalar(since_date, pa.date32())
        expr = by_date if expr is None else expr & by_date
    return expr


def _projected(schema: pa.Schema, columns: Sequence[str] | None) -> pa.Schema:
    if columns is None:
        return schema
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise LakehouseError(f"unknown column(s) {unknown}; the table has {schema.names}")
    return pa.schema([schema.field(c) for c in columns])


def _open_as_of(table: DeltaTable, as_of: AsOf, storage_options: Mapping[str, str] | None) -> DeltaTable:
    """A fresh handle at ``as_of``, so time travel does not move the caller's table. deltalake keeps the options a
    table was opened with private, so an object-store table needs them again (:meth:`Lakehouse.table` with
    ``as_of`` opens one directly)."""
    other = DeltaTable(table.table_uri, storage_options=dict(storage_options) if storage_options else None)
    time_travel(other, as_of)
    return other


def snapshot(
    table: DeltaTable,
    *,
    as_of: AsOf | None = None,
    columns: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    since_date: date | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[pa.Table, int]:
    """All rows of the table (at ``as_of``: a version, a datetime or an ISO-8601 string) and that version.

    ``tasks`` / ``since_date`` prune files by partition (and statistics) and filter rows exactly.
    ``storage_options``: those of the table (an object store's endpoint and keys), needed with ``as_of``.
    """
    source = _open_as_of(table, as_of, storage_options) if as_of is not None else table
    stored = arrow_schema(source)
    schema = _projected(upgraded_schema(stored), columns)
    predicate = sql_predicate(tasks=tasks, since_date=since_date)
    dataset = source.to_pyarrow_dataset(file_pruning_predicate=predicate)
    rows = dataset.to_table(columns=source_columns(stored, schema.names),
                            filter=_row_filter(tasks=tasks, since_date=since_date))
    return upgrade(rows).select(schema.names).cast(schema), source.version()


def snapshot_batches(
    table: DeltaTable,
    *,
    as_of: AsOf | None = None,
    columns: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    since_date: date | None = None,
    batch_size: int = 4096,
    storage_options: Mapping[str, str] | None = None,
) -> tuple[Iterator[pa.RecordBatch], int]:
    """Like :func:`snapshot`, as a stream of record batches (bounded memory), and the version it reads."""
    source = _open_as_of(table, as_of, storage_options) if as_of is not None else table
    stored = arrow_schema(source)
    schema = _projected(upgraded_schema(stored), columns)
    dataset = source.to_pyarrow_dataset(file_pruning_predicate=sql_predicate(tasks=tasks, since_date=since_date))
    batches = dataset.to_batches(columns=source_columns(stored, schema.names),
                                 filter=_row_filter(tasks=tasks, since_date=since_date), batch_size=batch_size)
    return (b for batch in batches for b in upgrade(batch).select(schema.names).cast(schema).to_batches()), \
        source.version()


def version_at(table: DeltaTable, timestamp: datetime | str, *,
               storage_options: Mapping[str, str] | None = None) -> int:
    """The table version that was current at ``timestamp`` (the last commit at or before it)."""
    return _open_as_of(table, timestamp, storage_options).version()


def _is_missing_file(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "not found" in text or "no such file" in text


def rows_since(
    table: DeltaTable,
    version: int | None,
    *,
    columns: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    since_date: date | None = None,
    max_versions: int | None = None,
    with_commit_version: bool = False,
) -> tuple[pa.Table, int]:
    """Rows added by the commits after ``version``, and the version now read up to.

    ``version=None`` reads a snapshot of the latest version (the first call of a new reader; for a large
    table prefer ``since_date`` or :func:`snapshot_batches`, then continue from its version). Pass the
    returned version to the next call. ``max_versions`` bounds how many commits one call reads (bounded
    memory). ``with_commit_version`` adds ``_commit_version`` (uint64; absent on snapshots).
    """
    table.update_incremental()
    latest = table.version()
    if version is None:
        return snapshot(table, columns=columns, tasks=tasks, since_date=since_date)
    if version > latest:
        raise LakehouseError(
            f"{table.table_uri} is at version {latest}, behind the requested {version}: the table was "
            f"re-created; restart the reader with version=None"
        )
    schema = _projected(upgraded_schema(arrow_schema(table)), columns)
    end = latest if max_versions is None else min(latest, version + max(1, max_versions))
    out_schema = schema.append(pa.field(COMMIT_VERSION, pa.uint64())) if with_commit_version else schema
    if end == version:
        return out_schema.empty_table(), version
    ranges, start = [], version + 1
    for rewrite in (v for v in migration_versions(table) if version < v <= end):
        ranges.append((start, rewrite - 1))  # read at its own last version: the schema those commits wrote
        start = rewrite + 1
    ranges.append((start, end))
    parts = []
    try:
        for first, last in ranges:
            if first > last:
                continue
            if last < latest:
                table.load_as_version(last)
            parts.append(_changes(table, first, last, out_schema, tasks=tasks, since_date=since_date))
    finally:
        if table.version() != latest:
            table.update_incremental()
    return (pa.concat_tables(parts) if parts else out_schema.empty_table()), end


def _changes(table: DeltaTable, first: int, last: int, out_schema: pa.Schema, *, tasks: Sequence[str] | None,
             since_date: date | None) -> pa.Table:
    """The rows commits ``first`` … ``last`` of ``table`` (loaded at ``last`` or later, same schema) added."""
    stored = arrow_schema(table)
    wanted = [n for n in out_schema.names if n != COMMIT_VERSION]
    read = source_columns(stored, wanted)
    try:
        changes = pa.table(table.load_cdf(
            starting_version=first, ending_version=last, columns=[*read, "_change_type", COMMIT_VERSION],
            predicate=sql_predicate(tasks=tasks, since_date=since_date),
        ))
    except (pa.ArrowInvalid, OSError, DeltaError) as exc:
        if _is_missing_file(exc):
            raise ReaderFellBehindError(table.table_uri, first - 1, exc) from exc
        raise LakehouseError(f"reading the changes of {table.table_uri} after version {first - 1} failed: {exc}") from exc
    # CDF hands out string_view columns, which pyarrow's filter kernels do not take: cast before filtering.
    read_schema = pa.schema([stored.field(n) for n in read])
    changes = changes.select([*read, "_change_type", COMMIT_VERSION]).cast(
        read_schema.append(pa.field("_change_type", pa.string())).append(pa.field(COMMIT_VERSION, pa.uint64())))
    added = changes.filter(pc.is_in(changes.column("_change_type"), pa.array(_ADDED)))
    return upgrade(added).select(out_schema.names).cast(out_schema)


class IncrementalReader:
    """Follows one table: each :meth:`poll` returns the rows committed since the previous one.

    ``start``: ``None`` = a snapshot of everything on the first poll, ``"latest"`` = only commits after the
    current version, an int = commits after that version (e.g. the version a restarted learner had read).
    """

    def __init__(
        self,
        table: DeltaTable,
        *,
        start: int | Literal["latest"] | None = None,
        columns: Sequence[str] | None = None,
        tasks: Sequence[str] | None = None,
        since_date: date | None = None,
        max_versions: int | None = None,
    ) -> None:
        self.table = table
        self.columns = list(columns) if columns is not None else None
        self.tasks = list(tasks) if tasks is not None else None
        self.since_date = since_date
        self.max_versions = max_versions
        if start == "latest":
            table.update_incremental()
            self.version: int | None = table.version()
        else:
            self.version = start
        self.rows_read = 0

    def poll(self) -> pa.Table:
        rows, self.version = rows_since(
            self.table, self.version, columns=self.columns, tasks=self.tasks,
            since_date=self.since_date, max_versions=self.max_versions,
        )
        self.rows_read += rows.num_rows
        return rows

    @property
    def caught_up(self) -> bool:
        """True when the last poll reached the table's latest version (as of that poll)."""
        return self.version is not None and self.version >= self.table.version()
