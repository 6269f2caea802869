"""Delta tables as SOP wrote them before ``policy_version`` became an int64 (a text column, a list<string>
``policy_versions``, no ``policy_version_text``), for the tests that run the current code on them."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from lakehouse import Lakehouse, conform
from lakehouse.tables import STRINGS, TableSpec


def old_schema(spec: TableSpec) -> pa.Schema:
    """The table's schema as code before this change wrote it."""
    fields = []
    for f in spec.schema:
        if f.name == "policy_version":
            fields.append(pa.field("policy_version", pa.string(), nullable=False))
        elif f.name == "policy_versions":
            fields.append(pa.field("policy_versions", STRINGS, nullable=False))
        elif f.name != "policy_version_text":
            fields.append(f)
    return pa.schema(fields)


def old_rows(spec: TableSpec, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (versions as text, as on the wire) in the old shape."""
    new = conform(spec, rows)
    text = new.column("policy_version_text")
    table = new.set_column(new.schema.get_field_index("policy_version"), "policy_version", text)
    table = table.drop_columns(["policy_version_text"])
    if "policy_versions" in table.column_names:
        table = table.set_column(table.schema.get_field_index("policy_versions"), "policy_versions",
                                 pa.array([[t] for t in text.to_pylist()], STRINGS))
    return table.cast(old_schema(spec))


def create_old(lake: Lakehouse, spec: TableSpec) -> None:
    DeltaTable.create(lake.uri(spec.name), old_schema(spec), partition_by=list(spec.partition_by),
                      configuration=spec.configuration)


def write_old(lake: Lakehouse, spec: TableSpec, rows: list[dict[str, Any]], *, app: str | None = None,
              watermark: int | None = None) -> None:
    """An append as the old code made it: rows (and a partition's watermark) in one commit."""
    props = CommitProperties(app_transactions=[Transaction(app, watermark)]) if app is not None else None
    write_deltalake(lake.uri(spec.name), old_rows(spec, rows), mode="append", commit_properties=props)
