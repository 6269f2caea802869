"""Exactly-once appends from Kafka into one Delta table.

Each commit carries, in the same Delta commit as its rows, one *application transaction* per Kafka
partition: ``app_id = f"{app_id_prefix}-{partition}"``, ``version`` = the partition's **watermark**, the
highest offset such that every message at or below it is handled for this table (written, or deliberately
not written: dead letters, events that make no row). Delta makes rows and watermarks visible together or not
at all, so after a crash the table itself says where to resume. Every row also carries its origin
(``kafka_topic``, ``kafka_partition``, ``kafka_offset``), unique within a table.

Watermark vs. the rows written
    When rows are written in offset order (interventions: one row per event) the watermark is simply the
    last offset of the batch. When the caller buffers (steps are written when their episode closes, and
    episodes of one partition interleave) rows above the watermark may already be in the table while older
    messages of a still-open episode are not: the watermark is then ``safe_watermark(next_offset=…,
    open_offsets=…)``, the offset before the oldest message still held in memory. Never commit the batch's
    highest offset there: the open episode's older steps would count as handled and be lost on restart.
    On restart the caller resumes at ``resume_offset(p)`` (watermark + 1) and drops every message for which
    ``is_committed(p, offset)`` is true (``filter_uncommitted`` does it for rows): at or below the
    watermark, or one of the offsets above it already in the table (read once per partition from the
    ``kafka_offset`` column, pruned by file statistics, then kept up to date by the writer's own commits).
    ``write`` applies the same filter itself, so a replayed batch never duplicates rows.

Several tables
    A commit cannot span tables. Each table records its own watermarks under its own app ids, so each table
    is resumed on its own: after a crash between the ``steps`` commit and the ``episodes`` commit, ``steps``
    already holds the episode and ``episodes`` does not. The consumer resumes a topic partition at the
    *lowest* ``resume_offset`` over the tables it feeds, and each table's writer drops what that table
    already has; nothing is lost and nothing is written twice. Use one ``app_id_prefix`` per
    (consumer group, source topic), e.g. ``"sop-processor.sop.steps"``. When a table's rows also depend
    on another topic (an ``episodes`` row summarises the episode's steps), record that topic's watermark
    in the same commit with ``app_transactions={app_id("sop-processor.sop.steps", p): w}`` and include
    it when choosing where to resume that topic.

Concurrency
    Appends from several writers to one table do not conflict (delta-rs retries them). Every commit that
    writes rows of a partition states that partition's app id (even when its watermark does not move), so
    two commits for the same partition (a zombie owner after a rebalance) conflict; the loser reloads the
    table and that partition's written offsets, drops what the winner wrote, and retries. For this the
    writer keeps its cached per-partition state in step with its table handle's snapshot: it commits from
    that snapshot, and forgets cached partitions whenever the snapshot moves past commits it did not check.
    A retry after an ambiguous failure is safe for the same reason. Rows without a Kafka origin are
    idempotent only through ``app_transactions`` (see :meth:`ExactlyOnceWriter.write`).

Storage outages
    delta-rs (object_store) retries a failed request itself for a few seconds (measured on SeaweedFS: 10 retries
    in 1.5-5 s), then raises a plain ``DeltaError`` ("Generic S3 error: ... after 10 retries") or an ``OSError``;
    a restarted S3 server takes longer than that to take writes again. The writer then retries the whole write
    with a capped exponential backoff for up to ``storage_retry_s``, re-reading the table before each attempt:
    if the failed commit did land (the request reached the server, the answer did not come back), its rows and
    watermarks are in the table and the retry drops them, so nothing is written twice. Only batches that are
    idempotent that way are retried (every row has a Kafka origin, or ``app_transactions`` are given); past
    ``storage_retry_s`` the error is raised as ``StorageUnavailableError`` and the caller keeps its batch (the
    stream processor puts it back and writes it at its next flush).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError

from lakehouse.errors import LakehouseError, SchemaMismatchError, StorageUnavailableError, WriteConflictError
from lakehouse.tables import Rows, TableSpec, arrow_schema, conform, spec_of

RowsT = TypeVar("RowsT", pa.Table, list[dict[str, Any]])


def app_id(prefix: str, partition: int) -> str:
    """The Delta application-transaction id under which a Kafka partition's watermark is stored."""
    return f"{prefix}-{partition}"


def safe_watermark(*, next_offset: int, open_offsets: Iterable[int] = ()) -> int:
    """The watermark to commit: one below the oldest message not yet written.

    ``next_offset`` is the offset after the last message consumed from the partition; ``open_offsets`` are the
    offsets of messages still held in memory (steps of episodes that have not closed).
    """
    return min([next_offset, *open_offsets]) - 1


@dataclass
class CommittedState:
    """What one table holds of one Kafka partition."""

    partition: int
    watermark: int | None  # every offset <= watermark is handled; None = nothing committed yet
    written_above: set[int] = field(default_factory=set)  # offsets > watermark already in the table

    @property
    def resume_offset(self) -> int:
        """The first offset to consume again after a restart."""
        return 0 if self.watermark is None else self.watermark + 1

    def is_committed(self, offset: int) -> bool:
        return (self.watermark is not None and offset <= self.watermark) or offset in self.written_above

    def advance(self, watermark: int | None, written: Iterable[int]) -> None:
        if watermark is not None and (self.watermark is None or watermark > self.watermark):
            self.watermark = watermark
        self.written_above.update(written)
        if self.watermark is not None:
            self.written_above = {o for o in self.written_above if o > self.watermark}


@dataclass(frozen=True)
class WriteResult:
    """Outcome of one :meth:`ExactlyOnceWriter.write`."""

    version: int | None  # table version committed; None when there was nothing new to commit
    rows_written: int
    rows_skipped: int  # rows already committed (replay, retry)
    files_added: int  # one file per partition value touched (batches are far below the target file size)
    watermarks: dict[int, int]  # partition -> watermark now committed by this write
    retries: int
    storage_retries: int = 0  # attempts that failed on the storage (connection refused, 5xx) and were retried


def is_transient_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the object store failing (worth retrying) rather than a refusal of the write itself.

    delta-rs raises storage failures as a plain ``DeltaError`` (its subclasses are conflicts, protocol, schema and
    missing-table errors: permanent) and pyarrow's dataset reads as ``OSError``."""
    return type(exc) is DeltaError or (isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError))


def storage_backoff(attempt: int, *, first_s: float = 0.25, cap_s: float = 4.0) -> float:
    """Seconds to wait before storage retry ``attempt`` (0-based): doubling from ``first_s`` up to ``cap_s``."""
    return min(cap_s, first_s * 2 ** min(attempt, 16))


def _origin_columns(table: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray] | None:
    if "kafka_partition" not in table.column_names or "kafka_offset" not in table.column_names:
        return None
    return table.column("kafka_partition"), table.column("kafka_offset")


def _without_origin(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    origin = _origin_columns(table)
    if origin is None:
        return pa.array([True] * table.num_rows)
    return pc.or_(pc.is_null(origin[0]), pc.is_null(origin[1]))


def _partitions_in(table: pa.Table) -> set[int]:
    origin = _origin_columns(table)
    if origin is None:
        return set()
    return {p for p in pc.unique(origin[0]).to_pylist() if p is not None}


def _uncommitted_mask(table: pa.Table, states: Mapping[int, CommittedState]) -> pa.ChunkedArray | pa.Array:
    """True for rows to keep: no Kafka origin, or an offset the table does not hold yet."""
    origin = _origin_columns(table)
    if origin is None:
        return pa.array([True] * table.num_rows)
    parts, offsets = origin
    keep = _without_origin(table)
    for p, state in states.items():
        in_p = pc.fill_null(pc.equal(parts, p), False)
        fresh = pc.greater(offsets, state.watermark) if state.watermark is not None else pc.is_valid(offsets)
        if state.written_above:
            fresh = pc.and_(fresh, pc.invert(pc.is_in(offsets, pa.array(sorted(state.written_above), pa.int64()))))
        keep = pc.or_(keep, pc.and_(in_p, pc.fill_null(fresh, False)))
    unseen = [p for p in _partitions_in(table) if p not in states]
    if unseen:
        keep = pc.or_(keep, pc.fill_null(pc.is_in(parts, pa.array(unseen, pa.int32())), False))
    return keep


def _first_of_each_origin(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """True for rows to keep: no Kafka origin, or the first row of the batch with its (partition, offset)."""
    origin = _origin_columns(table)
    if origin is None or table.num_rows < 2:
        return pa.array([True] * table.num_rows, pa.bool_())
    index = pa.array(range(table.num_rows), pa.int64())
    pairs = pa.table({"p": origin[0], "o": origin[1], "i": index})
    firsts = pairs.group_by(["p", "o"]).aggregate([("i", "min")]).column("i_min")
    return pc.or_(_without_origin(table), pc.is_in(index, firsts))


def _count_partition_values(table: pa.Table, partition_by: Sequence[str]) -> int:
    if table.num_rows == 0:
        return 0
    if not partition_by:
        return 1
    return table.group_by(list(partition_by)).aggregate([]).num_rows


class ExactlyOnceWriter:
    """Appends rows from one Kafka topic to one Delta table, recording per-partition watermarks atomically.

    Use one writer per (table, source topic, consumer group) and per thread (it caches per-partition
    state and is not thread-safe). See the module docstring for the protocol.
    """

    def __init__(
        self,
        table: DeltaTable,
        app_id_prefix: str,
        *,
        spec: TableSpec | None = None,
        topic: str | None = None,
        max_retries: int = 20,
        backoff_s: float = 0.02,
        storage_retry_s: float = 60.0,
    ) -> None:
        if not app_id_prefix:
            raise LakehouseError("app_id_prefix must be non-empty, e.g. '<consumer group>.<topic>'")
        self.table = table
        self.app_id_prefix = app_id_prefix
        self.topic = topic
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        if storage_retry_s < 0:
            raise LakehouseError(f"storage_retry_s must be >= 0 (0 = do not retry storage errors), got {storage_retry_s}")
        self.storage_retry_s = storage_retry_s
        self.spec: TableSpec | pa.Schema = spec or self._spec_from_table(table)
        self.partition_by = tuple(table.metadata().partition_columns)
        self._states: dict[int, CommittedState] = {}

    @staticmethod
    def _spec_from_table(table: DeltaTable) -> TableSpec | pa.Schema:
        try:
            return spec_of(table.metadata().name or "")
        except LakehouseError:
            return arrow_schema(table)

    def app_id(self, partition: int) -> str:
        return app_id(self.app_id_prefix, partition)

    # -- what is committed ---------------------------------------------------------------------------------

    def committed_offset(self, partition: int, *, refresh: bool = True) -> int | None:
        """The watermark committed for ``partition`` (None when nothing was), read from the table's log."""
        if refresh:
            self._refresh()
        return self.table.transaction_version(self.app_id(partition))

    def committed_state(self, partition: int, *, refresh: bool = False) -> CommittedState:
        """Watermark plus the offsets above it already in the table; loaded once, then kept by own writes.

        Cached states always describe the table handle's snapshot (see :meth:`_refresh`): a commit made
        from that snapshot then conflicts with any later commit that touched the partition.
        """
        if refresh or not self._states:
            self._refresh()
        if partition not in self._states:
            watermark = self.table.transaction_version(self.app_id(partition))
            self._states[partition] = CommittedState(partition, watermark, self._offsets_above(partition, watermark))
        return self._states[partition]

    def resume_offset(self, partition: int) -> int:
        """Where to start consuming ``partition`` again for this table (0 = from the beginning)."""
        return self.committed_state(partition).resume_offset

    def is_committed(self, partition: int, offset: int) -> bool:
        return self.committed_state(partition).is_committed(offset)

    def reload(self) -> None:
        """Reload the table and forget cached states, e.g. when partitions are assigned after a rebalance
        (not needed for correctness: a commit from an outdated snapshot conflicts and is retried)."""
        self._refresh()
        self._states.clear()

    def _refresh(self) -> None:
        """Move the handle to the latest version; cached states may not describe it any more: drop them."""
        before = self.table.version()
        self.table.update_incremental()
        if self.table.version() != before:
            self._states.clear()

    def filter_uncommitted(self, rows: RowsT, partition: int | None = None) -> RowsT:
        """Drop rows the table already holds. Rows carry ``kafka_partition`` (or pass ``partition``) and
        ``kafka_offset``; rows without an origin are kept."""
        if isinstance(rows, pa.Table):
            table = rows
            if partition is not None:
                table = _with_partition(table, partition)
            states = {p: self.committed_state(p) for p in _partitions_in(table)}
            return rows.filter(_uncommitted_mask(table, states))
        kept = []
        for row in rows:
            p = partition if partition is not None else row.get("kafka_partition")
            offset = row.get("kafka_offset")
            if p is None or offset is None or not self.is_committed(p, offset):
                kept.append(row)
        return kept

    def _offsets_above(self, partition: int, watermark: int | None) -> set[int]:
        predicate = f"kafka_partition = {int(partition)}"
        expr = pc.field("kafka_partition") == partition
        if watermark is not None:
            predicate += f" AND kafka_offset > {int(watermark)}"
            expr = expr & (pc.field("kafka_offset") > watermark)
        if self.topic is not None:
            expr = expr & (pc.field("kafka_topic") == self.topic)
        dataset = self.table.to_pyarrow_dataset(file_pruning_predicate=predicate)
        found = dataset.to_table(columns=["kafka_offset"], filter=expr).column("kafka_offset")
        return {o for o in found.to_pylist() if o is not None}

    # -- writing ---------------------------------------------------------------------------------------------

    def write(
        self,
        batch: pa.Table | Rows,
        *,
        offsets: Mapping[int, int] | None = None,
        app_transactions: Mapping[str, int] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> WriteResult:
        """Append ``batch`` and advance the watermarks in ``offsets`` (partition -> watermark) in one commit.

        Rows the table already holds are dropped first (their offset is at or below the partition's watermark,
        or among the offsets above it already written), and so are repeats of a (partition, offset) within the
        batch, so writing the same rows twice, in one batch or in two, adds nothing; the
        first write touching a partition loads that partition's state (see :meth:`committed_state`).
        Watermarks never move back. Every commit that writes rows of a partition carries that partition's app
        id, so two writers committing the same partition at once conflict, and the loser re-reads the table
        and retries without the rows the winner wrote.

        ``app_transactions`` (app id -> version) records further ids in the same commit; they make rows
        without a Kafka origin idempotent too: when none of them advances (all already committed at that
        version or higher), those rows are dropped. E.g. ``sop demos`` writes episode k of a seed with
        ``app_transactions={"sop-demos.seed-7": k}`` and can be rerun after a crash.
        """
        data = conform(self.spec, batch)
        self._check_topic(data)
        offsets = {int(p): int(o) for p, o in (offsets or {}).items()}
        extra = {aid: int(v) for aid, v in (app_transactions or {}).items()}
        # a retry after an ambiguous failure must be able to tell what landed: by origin, or by app transaction
        retry = self.storage_retry_s > 0 and (bool(extra) or not pc.any(_without_origin(data)).as_py())
        deadline = time.monotonic() + self.storage_retry_s
        failures = 0
        while True:
            try:
                result = self._write_once(data, offsets, extra, metadata)
            except (DeltaError, OSError, LakehouseError) as exc:
                cause = exc.__cause__ if isinstance(exc, LakehouseError) else exc
                if cause is None or not is_transient_storage_error(cause):
                    raise
                wait = storage_backoff(failures)
                if not retry or time.monotonic() + wait > deadline:
                    raise StorageUnavailableError(
                        f"writing to {self.table.table_uri} failed on the storage"
                        + (f" {failures + 1} times in {self.storage_retry_s:.0f} s" if retry else
                           " (not retried: rows without a Kafka origin and no app_transactions)")
                        + f": {cause}") from cause
                failures += 1
                self._states.clear()  # re-read the table first: the failed commit may have landed
                time.sleep(wait * random.uniform(0.8, 1.2))
                continue
            return replace(result, storage_retries=failures) if failures else result

    def _write_once(self, data: pa.Table, offsets: Mapping[int, int], extra: Mapping[str, int],
                    metadata: Mapping[str, str] | None) -> WriteResult:
        """One write with its conflict retries; storage errors propagate (:meth:`write` retries them)."""
        partitions = _partitions_in(data) | set(offsets)
        total = data.num_rows
        for attempt in range(self.max_retries + 1):
            states = {p: self.committed_state(p) for p in partitions}
            rows, txns, watermarks = self._plan(data, states, offsets, extra)
            if rows.num_rows == 0 and not watermarks and not any(t.app_id in extra for t in txns):
                return WriteResult(None, 0, total, 0, {}, attempt)
            read_version = self.table.version()
            try:
                self._commit(rows, txns, metadata)
            except CommitFailedError as exc:
                if attempt == self.max_retries:
                    raise WriteConflictError(
                        f"commit to {self.table.table_uri} still conflicted after {attempt} retries ({exc}); "
                        f"another writer may own the same partitions ({self.app_id_prefix}-*): check that one "
                        f"consumer per partition writes to this table"
                    ) from exc
                self._refresh()  # and re-read what the winning commit wrote
                self._states.clear()
                time.sleep(self.backoff_s * (attempt + 1) * random.uniform(0.5, 1.5))
                continue
            self._remember(rows, states, watermarks)
            if self.table.version() != read_version + 1:
                # Other writers' commits slipped in before ours. They cannot have touched the partitions our
                # commit stated (that would have conflicted), but may have touched other cached ones.
                stated = {t.app_id for t in txns}
                self._states = {p: st for p, st in self._states.items() if self.app_id(p) in stated}
            return WriteResult(self.table.version(), rows.num_rows, total - rows.num_rows,
                               _count_partition_values(rows, self.partition_by), watermarks, attempt)
        raise AssertionError("unreachable")

    def _check_topic(self, data: pa.Table) -> None:
        if self.topic is None or "kafka_topic" not in data.column_names:
            return
        topics = {t for t in pc.unique(data.column("kafka_topic")).to_pylist() if t is not None}
        if topics - {self.topic}:
            raise SchemaMismatchError(
                f"writer for topic {self.topic!r} got rows from {sorted(topics - {self.topic})}: "
                f"use one ExactlyOnceWriter (and app_id_prefix) per source topic"
            )

    def _plan(
        self,
        data: pa.Table,
        states: Mapping[int, CommittedState],
        offsets: Mapping[int, int],
        extra: Mapping[str, int],
    ) -> tuple[pa.Table, list[Transaction], dict[int, int]]:
        """Rows still to write, the transactions of the commit, and the watermarks it advances."""
        extra_txns = [Transaction(app_id=aid, version=v) for aid, v in extra.items()
                      if (current := self.table.transaction_version(aid)) is None or v > current]
        keep = pc.and_(_uncommitted_mask(data, states), _first_of_each_origin(data))
        if extra and not extra_txns:
            keep = pc.and_(keep, pc.invert(_without_origin(data)))  # this batch's own ids are committed
        rows = data.filter(keep)
        written = _partitions_in(rows)
        txns: list[Transaction] = []
        watermarks: dict[int, int] = {}
        for p, state in states.items():
            new = offsets.get(p)
            if new is not None and (state.watermark is None or new > state.watermark):
                watermarks[p] = new
            version = watermarks.get(p, state.watermark)
            # Re-stating an unchanged watermark still makes concurrent writers of the partition conflict.
            if version is not None and (p in watermarks or p in written):
                txns.append(Transaction(app_id=self.app_id(p), version=version))
        return rows, txns + extra_txns, watermarks

    def _commit(self, rows: pa.Table, txns: list[Transaction], metadata: Mapping[str, str] | None) -> None:
        props = CommitProperties(
            app_transactions=txns or None,
            custom_metadata={"sop.writer": self.app_id_prefix, **(metadata or {})},
        )
        try:
            write_deltalake(self.table, rows, mode="append", commit_properties=props)
        except CommitFailedError:
            raise
        except DeltaError as exc:
            raise LakehouseError(f"append to {self.table.table_uri} failed: {exc}") from exc

    def _remember(self, rows: pa.Table, states: Mapping[int, CommittedState], watermarks: Mapping[int, int]) -> None:
        origin = _origin_columns(rows)
        for p, state in states.items():
            written: list[int] = []
            if origin is not None:
                mask = pc.fill_null(pc.equal(origin[0], p), False)
                written = [o for o in origin[1].filter(mask).to_pylist() if o is not None]
            state.advance(watermarks.get(p), written)


def _with_partition(table: pa.Table, partition: int) -> pa.Table:
    column = pa.array([partition] * table.num_rows, pa.int32())
    if "kafka_partition" in table.column_names:
        return table.set_column(table.column_names.index("kafka_partition"), "kafka_partition", column)
    return table.append_column("kafka_partition", column)
