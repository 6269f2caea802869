"""The lakehouse: SOP's Delta Lake tables and everything that reads or writes them.

Owns the table definitions (``steps``, ``episodes``, ``interventions``, ``demonstrations``: Arrow schemas,
partitioning), exactly-once appends from Kafka, incremental and time-travel reads, SQL for people, and
maintenance (compaction, vacuum, history). It imports nothing else from this repository; the stream
processor (``consumers``) and the learner call it. Tables live under one root: a local path, or an
object-store URI with ``storage_options``.

The loop::

    from lakehouse import Lakehouse, IncrementalReader, query

    lake = Lakehouse("/data/lake")                                   # or "s3://bucket/lake", storage_options=…

    # 1. stream processor: write exactly once (rows + Kafka watermarks in one Delta commit)
    writer = lake.writer("steps", app_id_prefix="sop-processor.sop.steps", topic="sop.steps")
    start = writer.resume_offset(partition)                          # after a crash: where to consume from
    rows = writer.filter_uncommitted(rows)                           # drop what a replay re-delivers
    writer.write(rows, offsets={partition: watermark})

    # 2. learner: read only what was added since the last poll (compactions deliver nothing again)
    reader = IncrementalReader(lake.table("steps"), start=None, tasks=["pick-place-v3"])
    new_rows = reader.poll()                                         # reader.version = Delta version read

    # 3. people: SQL over every table, also as of an earlier time
    query(lake, "SELECT task, avg(mc_return) FROM episodes GROUP BY task")

``policy_version`` is an int64 (the text the event carried in ``policy_version_text``); tables written when it
was text are read in the current shape by every reader here (``upgrade`` for code that reads a table's Arrow
dataset itself) and rewritten once by the first writer (``Lakehouse.migrate``, also ``sop lake migrate``).

Maintenance: ``compact``, ``vacuum``, ``history`` and the ``CompactionSchedule`` policy in
:mod:`lakehouse.maintenance`; example queries in :mod:`lakehouse.sql_examples`.
"""

from lakehouse.errors import (
    LakehouseError,
    QueryError,
    ReaderFellBehindError,
    SchemaMismatchError,
    StorageUnavailableError,
    TableNotFoundError,
    UnknownTableError,
    VersionNotFoundError,
    WriteConflictError,
)
from lakehouse.lake import Lakehouse
from lakehouse.maintenance import (
    Commit,
    CompactionResult,
    CompactionSchedule,
    compact,
    history,
    maybe_compact,
    small_files,
    vacuum,
)
from lakehouse.reader import IncrementalReader, rows_since, snapshot, snapshot_batches, version_at
from lakehouse.sql import connect, query, write_result
from lakehouse.sql_examples import EXAMPLES
from lakehouse.tables import (
    DEMONSTRATIONS,
    EPISODES,
    INTERVENTIONS,
    STEPS,
    TABLES,
    TableSpec,
    conform,
    source_columns,
    spec_of,
    upgrade,
    version_number,
)
from lakehouse.writer import (
    CommittedState,
    ExactlyOnceWriter,
    WriteResult,
    app_id,
    is_transient_storage_error,
    safe_watermark,
    storage_backoff,
)

__all__ = [
    "DEMONSTRATIONS", "EPISODES", "EXAMPLES", "INTERVENTIONS", "STEPS", "TABLES",
    "CommittedState", "Commit", "CompactionResult", "CompactionSchedule", "ExactlyOnceWriter",
    "IncrementalReader", "Lakehouse", "LakehouseError", "QueryError", "ReaderFellBehindError",
    "SchemaMismatchError", "StorageUnavailableError", "TableNotFoundError", "TableSpec", "UnknownTableError", "VersionNotFoundError",
    "WriteConflictError", "WriteResult",
    "app_id", "compact", "conform", "connect", "history", "is_transient_storage_error", "maybe_compact", "query",
    "rows_since", "safe_watermark", "small_files", "snapshot", "snapshot_batches", "source_columns", "spec_of",
    "storage_backoff", "upgrade", "vacuum", "version_at", "version_number", "write_result",
]
