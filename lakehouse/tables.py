"""The lakehouse's Delta tables: their Arrow schemas, partitioning, conforming rows, time travel
(``lakehouse.lake.Lakehouse`` opens them).

Tables (all under one root, ``<root>/<name>``):

``steps``
    One row per step, written when its episode closes: every ``Step`` field flattened (``policy_version`` as an
    int64, the event's text beside it in ``policy_version_text``; see "policy versions" below), plus the columns
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

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from lakehouse.errors import SchemaMismatchError, UnknownTableError, VersionNotFoundError

TIMESTAMP = pa.timestamp("us", tz="UTC")
# Delta names list items "element"; using the same name here keeps schemas read back from a table equal to ours.
FLOATS = pa.list_(pa.field("element", pa.float32()))
STRINGS = pa.list_(pa.field("element", pa.string()))
VERSIONS = pa.list_(pa.field("element", pa.int64()))
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
    # Step.policy_version (Avro string): the registry version as a number (null when the event's version is not
    # one: "expert" for scripted demonstrations) and the text the event carried
    _opt("policy_version", pa.int64()),
    _req("policy_version_text", pa.string()),
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
    _opt("policy_version", pa.int64()),
    _req("policy_version_text", pa.string()),
    _req("policy_versions", VERSIONS),  # every registry version that acted, in order (null: not a registry version)
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
_VERSION_FROM_AVRO = {"policy_version": ("policy_version", "policy_version_text")}
_STEP_DERIVED: Mapping[str, Deriver] = {"event_time": _time_of_us, "event_date": _date_of_us, "ingest_time": _ingest_now}

STEPS = TableSpec(
    name="steps", schema=STEP_SCHEMA, partition_by=("task", "event_date"),
    description="One row per robot step, with reward/return/value/advantage filled when the episode closed.",
    stats_columns=_STEP_STATS, derived=_STEP_DERIVED, source_record="Step", avro_columns=_VERSION_FROM_AVRO,
)
DEMONSTRATIONS = TableSpec(
    name="demonstrations", schema=STEP_SCHEMA, partition_by=("task", "event_date"),
    description="Offline demonstration steps (same columns as steps).",
    stats_columns=_STEP_STATS, derived=_STEP_DERIVED, source_record="Step", avro_columns=_VERSION_FROM_AVRO,
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
        **_VERSION_FROM_AVRO,
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


# -- policy versions: text on the wire, a number in the tables -------------------------------------------------
# Avro's Step/EpisodeEvent carry ``policy_version`` as a string (a registry version "12", or a name such as
# "expert"); the tables store it as an int64, so that SQL orders and compares versions as numbers, and keep the
# text beside it (``policy_version_text``). Tables written before (format 1: a string ``policy_version``, a
# list<string> ``policy_versions``, no text column) are rewritten once by ``Lakehouse.migrate`` (every writer
# runs it); until then, and when reading them back in time, ``upgrade`` gives their rows the current shape.

VERSION = "policy_version"
VERSION_TEXT = "policy_version_text"
VERSION_LIST = "policy_versions"
VERSION_DIGITS = "[0-9]{1,18}"  # what counts as a registry version; longer would not fit an int64
_NUMBER = f"^{VERSION_DIGITS}$"
MIGRATION_PROPERTY = "sop.migrations"  # table property: JSON {migration name: Delta version of its rewrite}
VERSION_MIGRATION = "policy_version_int64"
MIGRATION_MARKER = "sop.migration"  # commitInfo key of a migration's rewrite


def version_number(text: str | None) -> int | None:
    """A version as the wire carries it -> the number stored (None for "expert", "", None, "-1", ...)."""
    return int(text) if text is not None and text.isascii() and text.isdigit() and len(text) <= 18 else None


def _is_text(type_: pa.DataType) -> bool:
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _numbers(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    text = pc.cast(text, pa.string())
    return pc.cast(pc.if_else(pc.match_substring_regex(text, _NUMBER), text, pa.scalar(None, pa.string())), pa.int64())


def _number_lists(lists: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    chunks = lists.chunks if isinstance(lists, pa.ChunkedArray) else [lists]
    out = []
    for chunk in chunks:
        chunk = pc.cast(chunk, pa.list_(pa.string()))
        out.append(pa.ListArray.from_arrays(chunk.offsets, _numbers(chunk.values), type=VERSIONS, mask=chunk.is_null()))
    return pa.chunked_array(out, VERSIONS) if isinstance(lists, pa.ChunkedArray) else out[0]


def needs_upgrade(schema: pa.Schema) -> bool:
    """Whether data of this schema is in the old shape (``policy_version`` as text)."""
    return VERSION in schema.names and _is_text(schema.field(VERSION).type)


def upgraded_schema(schema: pa.Schema) -> pa.Schema:
    """The schema :func:`upgrade` turns data of ``schema`` into."""
    if not needs_upgrade(schema):
        return schema
    fields = []
    for f in schema:
        if f.name == VERSION:
            fields.append(pa.field(VERSION, pa.int64(), nullable=True))
            if VERSION_TEXT not in schema.names:
                fields.append(pa.field(VERSION_TEXT, pa.string(), nullable=f.nullable))
        elif f.name == VERSION_LIST and pa.types.is_list(f.type) and _is_text(f.type.value_type):
            fields.append(pa.field(VERSION_LIST, VERSIONS, nullable=f.nullable))
        else:
            fields.append(f)
    return pa.schema(fields)


def source_columns(schema: pa.Schema, columns: Sequence[str]) -> list[str]:
    """The columns to read from data of ``schema`` for ``columns`` of its upgraded shape."""
    if not needs_upgrade(schema) or VERSION_TEXT in schema.names:
        return list(columns)
    return list(dict.fromkeys(VERSION if c == VERSION_TEXT else c for c in columns))


def upgrade(data: pa.Table | pa.RecordBatch) -> pa.Table:
    """Data read from a table of the old shape (text ``policy_version``) in the current one; other data as is.

    ``policy_version`` becomes the number (null where the text is not one), ``policy_version_text`` the text
    (unless present), ``policy_versions`` a list of numbers. Nothing else changes.
    """
    table = pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data
    if not needs_upgrade(table.schema):
        return table
    text = table.column(VERSION)
    columns, names = [], []
    for name, column in zip(table.column_names, table.columns, strict=True):
        if name == VERSION:
            columns.append(_numbers(text))
            names.append(VERSION)
            if VERSION_TEXT not in table.column_names:
                columns.append(pc.cast(text, pa.string()))
                names.append(VERSION_TEXT)
        elif name == VERSION_LIST and pa.types.is_list(column.type) and _is_text(column.type.value_type):
            columns.append(_number_lists(column))
            names.append(name)
        else:
            columns.append(column)
            names.append(name)
    return pa.table(columns, names=names)


def _version_text_of(table: pa.Table) -> pa.Table:
    """Rows with a numeric ``policy_version`` and no text (written by code that already has the number)."""
    if VERSION not in table.column_names or VERSION_TEXT in table.column_names:
        return table
    number = table.column(VERSION)
    text = pc.if_else(pc.is_null(number), pa.scalar("", pa.string()), pc.cast(number, pa.string()))
    return table.add_column(table.column_names.index(VERSION) + 1, VERSION_TEXT, text)


def migrations_of(dt: DeltaTable) -> dict[str, dict[str, int]]:
    """The migrations recorded on a table: name -> {"started": first version it may be at, "version": its
    rewrite's version (absent when the migrator stopped before recording it)}."""
    text = dt.metadata().configuration.get(MIGRATION_PROPERTY)
    return {str(k): {a: int(b) for a, b in v.items()} for k, v in json.loads(text).items()} if text else {}


def migration_versions(dt: DeltaTable) -> list[int]:
    """The Delta versions of the rewrites migrations made (commits that add no new rows: readers skip them).

    Where a migrator stopped before recording its rewrite's version, the commit history after the recorded
    start is searched for the rewrite's marker (once per table and start)."""
    out = []
    for entry in migrations_of(dt).values():
        if "version" in entry:
            out.append(entry["version"])
            continue
        key = (dt.table_uri, entry["started"])
        if key not in _FOUND:
            limit = dt.version() - entry["started"] + 1
            found = [c["version"] for c in dt.history(limit=max(1, limit)) if c.get(MIGRATION_MARKER)]
            if not found:
                continue  # not rewritten yet
            _FOUND[key] = min(v for v in found if v >= entry["started"])
        out.append(_FOUND[key])
    return sorted(out)


_FOUND: dict[tuple[str, int], int] = {}


# -- rows -> Arrow ---------------------------------------------------------------------------------------------

def _relaxed(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_nullable(True) for f in schema])


def _wire_type(name: str, rows: Rows, field_: pa.Field) -> pa.Field:
    """The type to read a row column as: the wire's text for versions given as strings (``upgrade`` splits them)."""
    if name == VERSION and any(isinstance(r.get(VERSION), str) for r in rows):
        return field_.with_type(pa.string())
    if name == VERSION_LIST and any(isinstance(v, str) for r in rows for v in (r.get(VERSION_LIST) or ())):
        return field_.with_type(STRINGS)
    return field_


def _from_rows(rows: Rows, target: pa.Schema) -> pa.Table:
    names = list(dict.fromkeys(k for row in rows for k in row))
    sub = _relaxed(pa.schema([_wire_type(n, rows, target.field(n)) for n in names if n in target.names]))
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

    Derived columns that are absent (``event_time``, ``event_date``, ``ingest_time``) are computed, a policy
    version given as text (as the wire carries it) becomes its number plus ``policy_version_text``, absent
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
    if VERSION in target.names:
        table = _version_text_of(upgrade(table))
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


def normalize_root(root: str) -> str:
    """One spelling per table root: an object-store URI with a lower-case scheme and bucket and no trailing slash
    (``s3a://`` as ``s3://``), a local path (or ``file://`` URI) absolute with symlinks resolved."""
    if "://" not in root:
        return str(Path(root).resolve())
    scheme, rest = root.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return str(Path(unquote(urlsplit(root).path)).resolve())
    if scheme in ("s3a", "s3n"):
        scheme = "s3"
    bucket, _, key = rest.partition("/")
    key = "/".join(part for part in key.split("/") if part)
    return f"{scheme}://{bucket.lower()}" + (f"/{key}" if key else "")


def same_root(a: str, b: str) -> bool:
    """Whether two table roots (paths or URIs) name the same place."""
    return normalize_root(a) == normalize_root(b)


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
