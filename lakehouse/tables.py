"""The lakehouse's Delta tables: their Arrow schemas, partitioning, and the :class:`Lakehouse` that opens them.

Tables (all under one root, ``<root>/<name>``):

``steps``
    One row per step, written when its episode closes: every ``Step`` field flattened, plus the columns
    computed at close (``reward``, ``mc_return``, ``value``, ``advantage``, ``advantage_source``, ``outcome``,
    ``episode_length``) and the Kafka origin of the step message. Partitioned by (``task``, ``event_date``)
    so that the learner's per-task, most-recent-first reads and analysts' date ranges prune files.
``demonstrations``
    The offline dataset: the same columns as ``steps`` (Kafka origin null when written directly).
``episodes``
    One row per closed episode, partitioned by ``event_date`` (the UTC date of ``end_time``).
``interventions``
    One row per ``InterventionEvent`` (a takeover is a STARTED row and an ENDED row of the same episode).
    Kept per event rather than per takeover so every row has exactly one Kafka origin (exactly-once
    filtering stays per row), nothing waits for a pair to complete, and a takeover whose ENDED event never
    came is still recorded. ``sql_examples.EXAMPLES["takeovers"]`` pairs them into takeovers.

The schemas are written by hand from ``schemas/avsc/*.avsc`` (this package imports nothing else from the
repository); ``tests/unit/lakehouse/test_tables.py`` reads the ``.avsc`` files and fails when they drift.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake import Field as DeltaField
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFoundError

from lakehouse.errors import SchemaMismatchError, TableNotFoundError, UnknownTableError, VersionNotFoundError

if TYPE_CHECKING:
    from lakehouse.writer import ExactlyOnceWriter

TIMESTAMP = pa.timestamp("us", tz="UTC")
# Delta names list items "element"; using the same name here keeps schemas read back from a table equal to ours.
FLOATS = pa.list_(pa.field("element", pa.float32()))
STRINGS = pa.list_(pa.field("element", pa.string()))
CAMERA_IMAGE = pa.struct([
    pa.field("camera", pa.string()),
    pa.field("encoding", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("data", pa.binary()),
    pa.field("capture_time_us", pa.int64()),  # Step v2: when the frame was exposed; null from v1 producers
])
IMAGES = pa.list_(pa.field("element", CAMERA_IMAGE))

Rows = Sequence[Mapping[str, Any]]
Deriver = Callable[[pa.Table, datetime], pa.Array]


def _req(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


def _opt(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=True)


KAFKA_ORIGIN = [_opt("kafka_topic", pa.string()), _opt("kafka_partition", pa.int32()), _opt("kafka_offset", pa.int64())]

STEP_SCHEMA = pa.schema([
    # Step fields, in .avsc order
    _req("episode_id", pa.string()),
    _req("actor_id", pa.string()),
    _req("task", pa.string()),
    _req("instruction", pa.string()),
    _req("step_index", pa.int32()),
    _req("event_time_us", pa.int64()),
    _req("policy_version", pa.string()),
    _req("images", IMAGES),
    _req("proprio", FLOATS),
    _req("action", FLOATS),
    _opt("policy_action", FLOATS),
    _req("controller", pa.string()),
    _opt("env_reward", pa.float32()),
    _req("success", pa.bool_()),
    # computed when the episode closes (RECAP)
    _req("reward", pa.float32()),
    _req("mc_return", pa.float32()),
    _opt("value", pa.float32()),
    _opt("advantage", pa.float32()),
    _opt("advantage_source", pa.string()),
    _req("outcome", pa.string()),
    _req("episode_length", pa.int32()),
    # derived / bookkeeping
    _req("event_time", TIMESTAMP),
    _req("event_date", pa.date32()),
    *KAFKA_ORIGIN,
    _req("ingest_time", TIMESTAMP),
])

EPISODE_SCHEMA = pa.schema([
    _req("episode_id", pa.string()),
    _req("actor_id", pa.string()),
    _req("task", pa.string()),
    _req("instruction", pa.string()),
    _req("policy_version", pa.string()),
    _req("policy_versions", STRINGS),
    _req("outcome", pa.string()),
    _req("num_steps", pa.int32()),
    _req("num_interventions", pa.int32()),
    _req("human_steps", pa.int32()),
    _req("mc_return", pa.float32()),
    _req("start_time", TIMESTAMP),
    _req("end_time", TIMESTAMP),
    _opt("seed", pa.int64()),
    _req("closed_by", pa.string()),  # end_event / forced (steps missing) / aborted (no end came)
    _opt("advantage_source", pa.string()),
    _req("event_date", pa.date32()),
    # data quality: the end event's step count vs what was assembled; steps not stored with the episode
    # (beyond the announced end, or after it closed: dead-lettered as late-step); identical copies dropped
    _opt("announced_steps", pa.int32()),
    _opt("missing_steps", pa.int32()),
    _opt("late_steps", pa.int32()),
    _opt("duplicate_steps", pa.int32()),
    *KAFKA_ORIGIN,
    _req("ingest_time", TIMESTAMP),
])

INTERVENTION_SCHEMA = pa.schema([
    _req("episode_id", pa.string()),
    _req("kind", pa.string()),
    _req("actor_id", pa.string()),
    _req("task", pa.string()),
    _req("step_index", pa.int32()),
    _req("event_time_us", pa.int64()),
    _req("operator_id", pa.string()),
    _req("reason", pa.string()),
    _req("event_time", TIMESTAMP),
    _req("event_date", pa.date32()),
    *KAFKA_ORIGIN,
    _req("ingest_time", TIMESTAMP),
])


def _time_of_us(table: pa.Table, _now: datetime) -> pa.Array:
    return pc.cast(table.column("event_time_us"), TIMESTAMP)


def _date_of_us(table: pa.Table, _now: datetime) -> pa.Array:
    return pc.cast(pc.cast(table.column("event_time_us"), TIMESTAMP), pa.date32())


def _date_of_end(table: pa.Table, _now: datetime) -> pa.Array:
    return pc.cast(pc.cast(table.column("end_time"), TIMESTAMP), pa.date32())


def _ingest_now(table: pa.Table, now: datetime) -> pa.Array:
    return pa.array([now] * table.num_rows, TIMESTAMP)


@dataclass(frozen=True)
class TableSpec:
    """Definition of one table: schema, partitioning, and how derived columns are filled when absent."""

    name: str
    schema: pa.Schema
    partition_by: tuple[str, ...]
    description: str
    # Delta keeps min/max statistics only for these (file pruning); never for image bytes.
    stats_columns: tuple[str, ...]
    derived: Mapping[str, Deriver] = field(default_factory=dict)
    # Avro record the rows come from, and Avro fields that are not stored under the same name:
    # field -> columns holding it (empty = deliberately not stored).
    source_record: str | None = None
    avro_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def configuration(self) -> dict[str, str | None]:
        return {
            # Change data files for updates/deletes (e.g. a replay that rewrites rewards); appends need none.
            "delta.enableChangeDataFeed": "true",
            "delta.dataSkippingStatsColumns": ",".join(self.stats_columns),
        }


_STEP_STATS = ("episode_id", "step_index", "actor_id", "event_time_us", "policy_version", "controller", "success",
               "outcome", "event_time", "kafka_partition", "kafka_offset", "ingest_time")
_STEP_DERIVED: Mapping[str, Deriver] = {"event_time": _time_of_us, "event_date": _date_of_us, "ingest_time": _ingest_now}

STEPS = TableSpec(
    name="steps", schema=STEP_SCHEMA, partition_by=("task", "event_date"),
    description="One row per robot step, with reward/return/value/advantage filled when the episode closed.",
    stats_columns=_STEP_STATS, derived=_STEP_DERIVED, source_record="Step",
)
DEMONSTRATIONS = TableSpec(
    name="demonstrations", schema=STEP_SCHEMA, partition_by=("task", "event_date"),
    description="Offline demonstration steps (same columns as steps).",
    stats_columns=_STEP_STATS, derived=_STEP_DERIVED, source_record="Step",
)
EPISODES = TableSpec(
    name="episodes", schema=EPISODE_SCHEMA, partition_by=("event_date",),
    description="One row per closed episode.",
    stats_columns=("episode_id", "actor_id", "task", "policy_version", "outcome", "num_steps", "start_time",
                   "end_time", "kafka_partition", "kafka_offset", "ingest_time"),
    derived={"event_date": _date_of_end, "ingest_time": _ingest_now},
    source_record="EpisodeEvent",
    avro_columns={
        "kind": (),  # a row is the STARTED/ENDED pair
        "event_time_us": ("start_time", "end_time"),
        "outcome": ("outcome",),  # null on STARTED events only; a closed episode always has one
        "num_steps": ("num_steps",),
    },
)
INTERVENTIONS = TableSpec(
    name="interventions", schema=INTERVENTION_SCHEMA, partition_by=("event_date",),
    description="One row per human takeover event (STARTED / ENDED).",
    stats_columns=("episode_id", "actor_id", "task", "kind", "step_index", "event_time", "kafka_partition",
                   "kafka_offset", "ingest_time"),
    derived={"event_time": _time_of_us, "event_date": _date_of_us, "ingest_time": _ingest_now},
    source_record="InterventionEvent",
)

TABLES: Mapping[str, TableSpec] = {s.name: s for s in (STEPS, EPISODES, INTERVENTIONS, DEMONSTRATIONS)}


def spec_of(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise UnknownTableError(name, TABLES) from None


# -- rows -> Arrow ---------------------------------------------------------------------------------------------

def _relaxed(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def _from_rows(rows: Rows, target: pa.Schema) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    sub = _relaxed(pa.schema([target.field(n) for n in names if n in target.names]))
    try:
        return pa.Table.from_pylist([dict(r) for r in rows], schema=sub)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as exc:
        raise SchemaMismatchError(f"rows do not fit the table's column types: {exc}") from exc


def _check_columns(spec_name: str, names: Sequence[str], target: pa.Schema) -> None:
    unknown = [n for n in names if n not in target.names]
    if unknown:
        raise SchemaMismatchError(
            f"{spec_name}: unknown column(s) {unknown}; the table has {target.names}. "
            f"Rename them, or add them to lakehouse/tables.py (and to the .avsc if they come from Kafka)"
        )


def conform(
    spec: TableSpec | pa.Schema,
    data: pa.Table | pa.RecordBatch | Rows,
    *,
    now: datetime | None = None,
) -> pa.Table:
    """Turn rows (dicts) or an Arrow table into a table with exactly ``spec``'s schema.

    Derived columns that are absent (``event_time``, ``event_date``, ``ingest_time``) are computed, absent
    nullable columns become null, and absent or null required columns raise :class:`SchemaMismatchError`
    naming them.
    """
    name, target = (spec.name, spec.schema) if isinstance(spec, TableSpec) else ("table", spec)
    derived = spec.derived if isinstance(spec, TableSpec) else {}
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, pa.Table) and len(data) == 0:
        return target.empty_table()
    if isinstance(data, pa.Table):
        _check_columns(name, data.column_names, target)
        table = data
    else:
        _check_columns(name, list(dict.fromkeys(k for row in data for k in row)), target)
        table = _from_rows(data, target)
    now = now or datetime.now(UTC)
    for col, derive in derived.items():
        if col not in table.column_names:
            table = table.append_column(col, derive(table, now))
    missing = [f.name for f in target if f.name not in table.column_names and not f.nullable]
    if missing:
        raise SchemaMismatchError(f"{name}: required column(s) {missing} are missing")
    for f in target:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    nulls = [f"{f.name} ({table.column(f.name).null_count} nulls)" for f in target
             if not f.nullable and table.column(f.name).null_count]
    if nulls:
        raise SchemaMismatchError(f"{name}: required column(s) hold nulls: {', '.join(nulls)}")
    try:
        return table.select(target.names).cast(target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatchError(f"{name}: columns do not cast to the table's types: {exc}") from exc


# -- the lakehouse root ----------------------------------------------------------------------------------------

def join_uri(root: str, name: str) -> str:
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, name)


def arrow_schema(table: DeltaTable) -> pa.Schema:
    return pa.schema(table.schema().to_arrow())


def _as_utc(when: datetime | str) -> datetime:
    moment = datetime.fromisoformat(when) if isinstance(when, str) else when
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def time_travel(table: DeltaTable, as_of: int | str | datetime) -> None:
    """Load ``table`` (in place) as of a version, or a datetime / ISO-8601 string (naive = UTC)."""
    try:
        if isinstance(as_of, int):
            table.load_as_version(as_of)
            return
        moment = _as_utc(as_of)
        # delta-rs loads version 0 for any time before the table existed; that table did not exist then
        created = datetime.fromtimestamp(table.metadata().created_time / 1000, tz=UTC)
        if moment < created.replace(microsecond=created.microsecond // 1000 * 1000):
            raise VersionNotFoundError(
                f"{table.table_uri} was created at {created.isoformat()}, after {moment.isoformat()}"
            )
        table.load_as_version(moment)
    except (DeltaError, ValueError) as exc:
        raise VersionNotFoundError(
            f"{table.table_uri} has no version {as_of!r} ({exc}); list its versions with `history`"
        ) from exc


def _widens(old: pa.DataType, new: pa.DataType) -> bool:
    """``new`` is ``old`` with nullable fields added inside structs (at any depth, lists included)."""
    if old == new:
        return True
    if pa.types.is_list(old) and pa.types.is_list(new):
        return _widens(old.value_type, new.value_type)
    if pa.types.is_struct(old) and pa.types.is_struct(new):
        have = {f.name: f for f in old}
        for f in new:
            if f.name in have:
                if not _widens(have[f.name].type, f.type):
                    return False
            elif not f.nullable:
                return False
        return all(f.name in {g.name for g in new} for f in old)
    return False


def _schema_drift(spec: TableSpec, existing: pa.Schema) -> tuple[list[pa.Field], list[str], list[str]]:
    """Columns to add to an existing table, columns that gained nested nullable fields (a schema-merging write
    adds them), and columns whose type differs otherwise (not fixable automatically)."""
    to_add = [f for f in spec.schema if f.name not in existing.names]
    common = [f for f in spec.schema if f.name in existing.names and existing.field(f.name).type != f.type]
    widened = [f.name for f in common if _widens(existing.field(f.name).type, f.type)]
    differ = [f"{f.name}: table has {existing.field(f.name).type}, definition says {f.type}"
              for f in common if f.name not in widened]
    return to_add, widened, differ


def _merged(existing: pa.Schema, target: pa.Schema) -> pa.Schema:
    """The table's columns in its own order, with the definition's (widened) types, then any new ones."""
    fields = [target.field(f.name) if f.name in target.names else f for f in existing]
    return pa.schema(fields + [f for f in target if f.name not in existing.names])


class Lakehouse:
    """The root under which the tables live: a local path or an object-store URI (``s3://bucket/lake``).

    ``storage_options`` go to delta-rs unchanged (credentials, endpoint, ...). Several writers on one
    S3-compatible table need safe commits from the store: per the delta-rs docs, MinIO and R2 take
    ``{"aws_conditional_put": "etag"}``.
    """

    def __init__(self, root: str | Path, *, storage_options: Mapping[str, str] | None = None) -> None:
        self.root = str(root)
        self.storage_options: dict[str, str] | None = dict(storage_options) if storage_options else None
        self._checked: set[str] = set()

    def __repr__(self) -> str:
        return f"Lakehouse({self.root!r})"

    def uri(self, name: str) -> str:
        spec_of(name)
        return join_uri(self.root, name)

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.uri(name), self.storage_options)

    def existing(self) -> list[str]:
        """Names of the defined tables that exist under the root."""
        return [name for name in TABLES if self.exists(name)]

    def table(self, name: str, *, create: bool = True, as_of: int | str | datetime | None = None) -> DeltaTable:
        """Open table ``name``, creating it empty when absent and ``create`` (never when time travelling).

        ``as_of`` opens an older state: a version number, a datetime (naive = UTC) or an ISO-8601 string.
        An existing table missing columns of the current definition gets them added (nullable ones only);
        a column of a different type raises :class:`SchemaMismatchError`.
        """
        spec = spec_of(name)
        uri = self.uri(name)
        try:
            dt = DeltaTable(uri, storage_options=self.storage_options)
        except DeltaTableNotFoundError:
            if not create or as_of is not None:
                raise TableNotFoundError(name, self.root, self.existing()) from None
            dt = self._create(spec, uri)
        if name not in self._checked:
            self._reconcile(spec, dt)
            self._checked.add(name)
        if as_of is not None:
            time_travel(dt, as_of)
        return dt

    def create_all(self) -> dict[str, DeltaTable]:
        return {name: self.table(name) for name in TABLES}

    def writer(self, name: str, *, app_id_prefix: str, topic: str | None = None) -> ExactlyOnceWriter:
        """An :class:`~lakehouse.writer.ExactlyOnceWriter` on table ``name`` (created when absent)."""
        from lakehouse.writer import ExactlyOnceWriter

        return ExactlyOnceWriter(self.table(name), app_id_prefix, spec=spec_of(name), topic=topic)

    def _create(self, spec: TableSpec, uri: str) -> DeltaTable:
        with contextlib.suppress(CommitFailedError):  # another process created it at the same moment
            DeltaTable.create(uri, spec.schema, mode="ignore", partition_by=list(spec.partition_by),
                              name=spec.name, description=spec.description,
                              configuration=spec.configuration, storage_options=self.storage_options)
        return DeltaTable(uri, storage_options=self.storage_options)

    def _reconcile(self, spec: TableSpec, dt: DeltaTable) -> None:
        existing = arrow_schema(dt)
        if list(dt.metadata().partition_columns) != list(spec.partition_by):
            raise SchemaMismatchError(
                f"{spec.name} at {dt.table_uri} is partitioned by {dt.metadata().partition_columns}, the definition "
                f"says {list(spec.partition_by)}: rewrite the table or point SOP_LAKE_URI at a new root"
            )
        to_add, widened, differ = _schema_drift(spec, existing)
        if differ:
            raise SchemaMismatchError(
                f"{spec.name} at {dt.table_uri} has columns of other types than its definition ({'; '.join(differ)}): "
                f"rewrite the table or point SOP_LAKE_URI at a new root"
            )
        required = [f.name for f in to_add if not f.nullable]
        if required:
            raise SchemaMismatchError(
                f"{spec.name} at {dt.table_uri} lacks required column(s) {required}: new columns of an existing "
                f"table must be nullable; make them so in lakehouse/tables.py or rewrite the table"
            )
        if to_add:
            try:
                dt.alter.add_columns([DeltaField.from_arrow(f) for f in to_add])
            except DeltaError as exc:
                raise SchemaMismatchError(f"could not add columns {[f.name for f in to_add]} to {spec.name}: {exc}") from exc
        if widened:  # new nested fields (e.g. images[].capture_time_us): an empty append that merges the schema
            from deltalake import write_deltalake

            try:
                dt.update_incremental()
                write_deltalake(dt, _merged(arrow_schema(dt), spec.schema).empty_table(), mode="append",
                                schema_mode="merge")
                dt.update_incremental()
            except DeltaError as exc:
                raise SchemaMismatchError(f"could not add nested fields to {widened} of {spec.name}: {exc}") from exc
