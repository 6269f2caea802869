"""The :class:`Lakehouse`: the root under which the tables live, opening (creating, evolving) them and
handing out exactly-once writers::

    lake = Lakehouse("/data/lake")                      # or "s3://bucket/lake", storage_options=...
    steps = lake.table("steps")                         # a deltalake.DeltaTable, created empty if absent
    writer = lake.writer("steps", app_id_prefix="sop-sink")

It sits above ``tables`` (definitions) and ``writer`` (commits), so neither of those imports the other's
module back: the package's modules import one way.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from deltalake import Field as DeltaField
from deltalake.exceptions import CommitFailedError, DeltaError
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFoundError

from lakehouse.errors import SchemaMismatchError, TableNotFoundError
from lakehouse.tables import (
    MIGRATION_MARKER,
    MIGRATION_PROPERTY,
    TABLES,
    VERSION_MIGRATION,
    TableSpec,
    arrow_schema,
    join_uri,
    migrations_of,
    needs_upgrade,
    spec_of,
    time_travel,
    upgrade,
    upgraded_schema,
)
from lakehouse.writer import ExactlyOnceWriter

log = logging.getLogger("sop.lakehouse")
MIGRATION_BATCH_ROWS = 1024  # rows per batch while a migration rewrites a table (bounded memory)


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
    adds them), and columns whose type differs otherwise (not fixable automatically). A table of the old shape
    (text ``policy_version``) is compared in its upgraded shape: :meth:`Lakehouse.migrate` rewrites it."""
    existing = upgraded_schema(existing)
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




def _record_migration(dt: DeltaTable, entry: dict[str, int]) -> None:
    done = {**migrations_of(dt), VERSION_MIGRATION: entry}
    dt.alter.set_table_properties({MIGRATION_PROPERTY: json.dumps(done, sort_keys=True)}, raise_if_not_exists=False)


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
        a column of a different type raises :class:`SchemaMismatchError`, except a text ``policy_version`` of a
        table written before it became a number: reading such a table works as it is (the readers upgrade
        its rows), writing to it migrates it first (:meth:`migrate`).
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
        """An :class:`~lakehouse.writer.ExactlyOnceWriter` on table ``name`` (created when absent; migrated to the
        current definition first, see :meth:`migrate`)."""
        self.migrate(name)
        return ExactlyOnceWriter(self.table(name), app_id_prefix, spec=spec_of(name), topic=topic)

    def pending_migrations(self, name: str) -> list[str]:
        """The migrations table ``name`` still needs (none for a table that does not exist)."""
        if not self.exists(name):
            return []
        dt = self.table(name, create=False)
        return [VERSION_MIGRATION] if needs_upgrade(arrow_schema(dt)) else []

    def migrate(self, name: str) -> int | None:
        """Bring an existing table of an older shape to the current definition; the Delta version of the rewrite,
        or None when there was nothing to do.

        The one migration so far: ``policy_version`` from text to int64 (with the text kept in
        ``policy_version_text``, ``policy_versions`` as numbers). Delta cannot change a column's type in place,
        so the table is rewritten: one overwrite commit that streams the rows through :func:`upgrade` in
        bounded batches, keeps partitioning, properties and every application transaction (the Kafka
        watermarks), and is recorded in the table property ``sop.migrations`` so that incremental readers skip
        it (its rows are the old rows again). Versions before it stay readable by time travel, in the old shape.
        Concurrent migrators: the loser's commit fails, it reloads and finds the work done. Writers of the old
        code cannot append afterwards (their rows no longer fit): upgrade every processor together.
        """

        spec = spec_of(name)
        for _attempt in range(5):
            if not self.pending_migrations(name):
                return None
            dt = DeltaTable(self.uri(name), storage_options=self.storage_options)
            try:
                version = self._rewrite(spec, dt)
            except CommitFailedError as exc:  # another migrator (or writer) committed first: look again
                log.warning("migrating %s: %s; trying again", name, exc)
                continue
            except DeltaError as exc:
                raise SchemaMismatchError(f"could not migrate {name} at {dt.table_uri}: {exc}") from exc
            for _ in range(5):  # where the rewrite is (readers find it without this too, from the history)
                try:
                    dt.update_incremental()
                    started = migrations_of(dt)[VERSION_MIGRATION]["started"]
                    _record_migration(dt, {"started": started, "version": version})
                    break
                except CommitFailedError:
                    continue
            self._checked.discard(name)
            log.info("migrated %s at version %d", name, version)
            return version
        raise SchemaMismatchError(f"could not migrate {name}: other commits kept conflicting with the rewrite")

    def _rewrite(self, spec: TableSpec, dt: DeltaTable) -> int:
        """The migration's intent, then its rewrite (see :meth:`migrate`); the rewrite's version."""
        from deltalake import CommitProperties, write_deltalake

        # First the intent (so that a crash between the two leaves readers able to find the rewrite), then it;
        # an intent already there (another migrator, or one that stopped) stands: a second would only make the
        # two migrators' commits conflict with each other again and again.
        entry = migrations_of(dt).get(VERSION_MIGRATION)
        if entry is None or "version" in entry:
            _record_migration(dt, {"started": dt.version() + 1})
            dt.update_incremental()
        source = dt.to_pyarrow_dataset()  # opened before the write: delta-rs cannot open it inside one
        log.info("migrating %s (%d rows, version %d): policy_version text -> int64", spec.name, source.count_rows(),
                 dt.version())

        def batches() -> Iterator[pa.RecordBatch]:
            for batch in source.to_batches(batch_size=MIGRATION_BATCH_ROWS):
                yield from upgrade(batch).select(spec.schema.names).cast(spec.schema).to_batches()

        write_deltalake(dt, pa.RecordBatchReader.from_batches(spec.schema, batches()), mode="overwrite",
                        schema_mode="overwrite", partition_by=list(spec.partition_by),
                        commit_properties=CommitProperties(custom_metadata={MIGRATION_MARKER: VERSION_MIGRATION}))
        dt.update_incremental()  # the rewrite is the newest commit with the marker (a second one would have conflicted)
        return max(c["version"] for c in dt.history(limit=20) if c.get(MIGRATION_MARKER) == VERSION_MIGRATION)

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
