"""Table definitions: they match the Avro wire contract, conform rows, and open/create/evolve Delta tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from lakehouse import (
    DEMONSTRATIONS,
    EPISODES,
    INTERVENTIONS,
    STEPS,
    TABLES,
    Lakehouse,
    SchemaMismatchError,
    TableNotFoundError,
    UnknownTableError,
    conform,
)
from lakehouse.tables import TIMESTAMP, arrow_schema, join_uri

AVSC_DIR = Path(__file__).resolve().parents[3] / "schemas" / "avsc"
PRIMITIVES = {"string": pa.string(), "int": pa.int32(), "long": pa.int64(), "float": pa.float32(),
              "double": pa.float64(), "boolean": pa.bool_(), "bytes": pa.binary()}
# Avro type -> column type conversions a table may apply when it stores a field under another name.
# (Avro type, column type) pairs the lakehouse converts: event microseconds to timestamps, and the policy version's
# text to its number (``tables.upgrade``; the text itself is kept in ``policy_version_text``)
CONVERSIONS = {(pa.int64(), TIMESTAMP), (pa.string(), pa.int64())}


def avro_to_arrow(avro: Any) -> tuple[pa.DataType, bool]:
    """Arrow type and nullability of an Avro type, by the mapping the lakehouse promises."""
    if isinstance(avro, list):
        branches = [t for t in avro if t != "null"]
        assert len(branches) == 1, f"only [null, T] unions are mapped, got {avro}"
        return avro_to_arrow(branches[0])[0], "null" in avro
    if isinstance(avro, str):
        return PRIMITIVES[avro], False
    kind = avro["type"]
    if kind == "enum":
        return pa.string(), False
    if kind == "array":
        return pa.list_(avro_to_arrow(avro["items"])[0]), False
    if kind == "record":
        return pa.struct([pa.field(f["name"], avro_to_arrow(f["type"])[0]) for f in avro["fields"]]), False
    return avro_to_arrow(kind)


def same_type(a: pa.DataType, b: pa.DataType) -> bool:
    """Type equality that ignores list item names and nested nullability."""
    if pa.types.is_list(a) and pa.types.is_list(b):
        return same_type(a.value_type, b.value_type)
    if pa.types.is_struct(a) and pa.types.is_struct(b):
        return [f.name for f in a] == [f.name for f in b] and all(same_type(x.type, y.type) for x, y in zip(a, b, strict=True))
    return a == b


def avsc(record: str) -> dict[str, Any]:
    return json.loads((AVSC_DIR / f"{record}.avsc").read_text())


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_avro_field_has_a_column_of_matching_type(name: str) -> None:
    spec = TABLES[name]
    assert spec.source_record is not None
    fields = {f["name"]: f for f in avsc(spec.source_record)["fields"]}
    assert set(spec.avro_columns) <= set(fields), f"{name} maps Avro fields that no longer exist"
    problems = []
    for fname, f in fields.items():
        expected, nullable = avro_to_arrow(f["type"])
        if fname in spec.avro_columns:
            for col in spec.avro_columns[fname]:
                if col not in spec.schema.names:
                    problems.append(f"{fname} -> missing column {col}")
                elif not (same_type(spec.schema.field(col).type, expected)
                          or (expected, spec.schema.field(col).type) in CONVERSIONS):
                    problems.append(f"{fname} ({expected}) -> {col} ({spec.schema.field(col).type})")
            continue
        if fname not in spec.schema.names:
            problems.append(f"{fname}: no column (add one, or map it in avro_columns)")
            continue
        column = spec.schema.field(fname)
        if not same_type(column.type, expected):
            problems.append(f"{fname}: Avro {expected}, column {column.type}")
        if column.nullable != nullable:
            problems.append(f"{fname}: Avro nullable={nullable}, column nullable={column.nullable}")
    assert not problems, f"{name} drifted from {spec.source_record}.avsc: {problems}"


def test_demonstrations_have_the_step_columns() -> None:
    assert DEMONSTRATIONS.schema == STEPS.schema
    assert DEMONSTRATIONS.partition_by == STEPS.partition_by


def test_partitioning_serves_task_and_recency_reads() -> None:
    assert STEPS.partition_by == ("task", "event_date")
    assert EPISODES.partition_by == ("event_date",)
    assert INTERVENTIONS.partition_by == ("event_date",)
    for spec in TABLES.values():
        assert set(spec.stats_columns) <= set(spec.schema.names)
        assert "images" not in spec.stats_columns


def test_create_all_tables_round_trips_the_schemas(lake: Lakehouse) -> None:
    assert lake.existing() == []
    tables = lake.create_all()
    assert sorted(lake.existing()) == sorted(TABLES)
    for name, dt in tables.items():
        assert arrow_schema(dt) == TABLES[name].schema
        assert dt.metadata().partition_columns == list(TABLES[name].partition_by)
        assert dt.metadata().configuration["delta.enableChangeDataFeed"] == "true"


def test_open_without_create_names_existing_tables(lake: Lakehouse) -> None:
    lake.table("episodes")
    with pytest.raises(TableNotFoundError, match=r"'steps' does not exist.*episodes"):
        lake.table("steps", create=False)
    with pytest.raises(UnknownTableError, match="defines"):
        lake.table("stepz")


def test_conform_derives_dates_and_fills_nullable_columns(steps_of: Any) -> None:
    table = conform(STEPS, steps_of(n=3))
    assert table.schema == STEPS.schema
    row = table.to_pylist()[0]
    assert str(row["event_date"]) == "2026-11-18"
    assert row["event_time"].timestamp() == pytest.approx(1_795_000_000)
    assert row["ingest_time"] is not None


def test_conform_accepts_arrow_with_other_list_item_names(steps_of: Any) -> None:
    rows = steps_of(n=2)
    loose = pa.Table.from_pylist(rows)  # inferred types: list<item: double>, int64, ...
    assert conform(STEPS, loose).schema == STEPS.schema


def test_conform_names_missing_required_and_unknown_columns(steps_of: Any) -> None:
    rows = steps_of(n=1)
    del rows[0]["reward"]
    with pytest.raises(SchemaMismatchError, match=r"required column\(s\) \['reward'\]"):
        conform(STEPS, rows)
    rows = steps_of(n=1)
    rows[0]["rewrd"] = 1.0
    with pytest.raises(SchemaMismatchError, match="unknown column.*rewrd"):
        conform(STEPS, rows)
    rows = steps_of(n=2)
    rows[1]["outcome"] = None
    with pytest.raises(SchemaMismatchError, match=r"outcome \(1 nulls\)"):
        conform(STEPS, rows)


def test_conform_rejects_wrong_types(steps_of: Any) -> None:
    rows = steps_of(n=1)
    rows[0]["step_index"] = "three"
    with pytest.raises(SchemaMismatchError, match="types"):
        conform(STEPS, rows)


def test_existing_table_gains_new_nullable_columns(lake: Lakehouse, intervention_of: Any) -> None:
    old = pa.schema([f for f in INTERVENTIONS.schema if f.name != "kafka_topic"])
    DeltaTable.create(lake.uri("interventions"), old, partition_by=["event_date"])
    dt = lake.table("interventions")
    assert arrow_schema(dt).names == [f.name for f in old] + ["kafka_topic"]
    writer = lake.writer("interventions", app_id_prefix="g.sop.interventions")
    writer.write([intervention_of()], offsets={0: 0})
    dt.update_incremental()
    assert dt.to_pyarrow_table().column("kafka_topic").to_pylist() == ["sop.interventions"]


def test_existing_table_with_other_types_is_refused(lake: Lakehouse) -> None:
    bad = pa.schema([f if f.name != "step_index" else f.with_type(pa.string()) for f in INTERVENTIONS.schema])
    DeltaTable.create(lake.uri("interventions"), bad, partition_by=["event_date"])
    with pytest.raises(SchemaMismatchError, match="step_index: table has string"):
        lake.table("interventions")


def test_object_store_uris_join_with_slashes() -> None:
    assert join_uri("s3://bucket/lake/", "steps") == "s3://bucket/lake/steps"
    assert Lakehouse("s3://bucket/lake", storage_options={"AWS_REGION": "x"}).uri("episodes") == "s3://bucket/lake/episodes"


def test_a_table_made_before_a_nested_field_existed_gains_it(tmp_path) -> None:  # noqa: ANN001
    # Step v2 added images[].capture_time_us: tables written by v1 processors evolve in place, rows kept
    import pyarrow as pa
    from deltalake import DeltaTable

    import lakehouse.tables as tables
    from lakehouse import Lakehouse

    spec = tables.spec_of("steps")
    old_camera = pa.struct([f for f in tables.CAMERA_IMAGE if f.name != "capture_time_us"])
    old = pa.schema([pa.field(f.name, pa.list_(pa.field("element", old_camera)), f.nullable) if f.name == "images"
                     else f for f in spec.schema])
    DeltaTable.create(str(tmp_path / "steps"), old, partition_by=list(spec.partition_by))
    table = Lakehouse(tmp_path).table("steps")
    assert tables.arrow_schema(table).field("images").type == tables.IMAGES


@pytest.mark.parametrize(("a", "b", "same"), [
    ("s3://sop/lake", "s3://sop/lake/", True),
    ("s3://sop/lake", "S3://SOP//lake", True),
    ("s3a://sop/lake", "s3://sop/lake", True),
    ("s3://sop/lake", "s3://sop/lake2", False),
    ("s3://sop/lake", "s3://other/lake", False),
    ("/data/lake", "/data/./lake/", True),
    ("/data/lake", "file:///data/lake", True),
    ("/data/lake", "s3://data/lake", False),
])
def test_same_root_compares_paths_and_uris(a: str, b: str, same: bool) -> None:
    from lakehouse.tables import same_root

    assert same_root(a, b) is same
