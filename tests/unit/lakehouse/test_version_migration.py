"""``policy_version`` became an int64: tables written the old way (a text column) stay readable, become writable
through a one-time migration, and incremental readers neither lose nor re-read rows across it."""

from __future__ import annotations

import json
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from lakehouse import EPISODES, STEPS, IncrementalReader, Lakehouse, conform, query, snapshot
from lakehouse.tables import (
    MIGRATION_PROPERTY,
    VERSION_MIGRATION,
    arrow_schema,
    migration_versions,
    upgrade,
    version_number,
)
from tests.old_tables import create_old, write_old

OLD_VERSIONS = ["99", "190", "expert", "2"]  # as text "99" > "190" > "2"; "expert": a scripted demonstration


@pytest.fixture
def old_lake(lake: Lakehouse, steps_of: Any, episode_of: Any) -> Lakehouse:
    for spec in (STEPS, EPISODES):
        create_old(lake, spec)
    offset = 0
    for i, version in enumerate(OLD_VERSIONS):
        rows = steps_of(f"e{i}", n=2, policy_version=version, offsets=[offset, offset + 1])
        write_old(lake, STEPS, rows, app="g.sop.steps-0", watermark=offset + 1)
        write_old(lake, EPISODES, [episode_of(f"e{i}", policy_version=version, offset=i)],
                  app="g.sop.episodes-0", watermark=i)
        offset += 2
    return lake


def test_version_numbers_from_the_wire() -> None:
    assert [version_number(v) for v in ["12", "0", "007", "expert", "", None, "-1", "1e3", "٣", "9" * 19]] == \
        [12, 0, 7, None, None, None, None, None, None, None]
    old = pa.table({"policy_version": ["10", "expert"], "policy_versions": [["9", "10"], ["expert"]]})
    new = upgrade(old)
    assert new.to_pylist() == [
        {"policy_version": 10, "policy_version_text": "10", "policy_versions": [9, 10]},
        {"policy_version": None, "policy_version_text": "expert", "policy_versions": [None]},
    ]
    assert upgrade(new) is new


def test_rows_with_text_versions_are_stored_as_numbers_with_the_text_kept(lake: Lakehouse, steps_of: Any,
                                                                           episode_of: Any) -> None:
    table = conform(STEPS, steps_of(n=1, policy_version="expert") + steps_of("e1", n=1, policy_version="12"))
    assert table.column("policy_version").to_pylist() == [None, 12]
    assert table.column("policy_version_text").to_pylist() == ["expert", "12"]
    episode = conform(EPISODES, [{**episode_of(policy_version="3"), "policy_versions": ["2", "3"]}])
    assert episode.column("policy_versions").to_pylist() == [[2, 3]]
    numeric = conform(STEPS, [{**r, "policy_version": 7} for r in steps_of(n=1)])  # code that has the number
    assert numeric.column("policy_version_text").to_pylist() == ["7"]


def test_an_old_table_reads_in_the_current_shape_before_any_migration(old_lake: Lakehouse) -> None:
    assert old_lake.pending_migrations("steps") == [VERSION_MIGRATION]
    ordered = query(old_lake, "SELECT DISTINCT policy_version, policy_version_text FROM episodes "
                              "ORDER BY policy_version NULLS LAST").to_pylist()
    assert [(r["policy_version"], r["policy_version_text"]) for r in ordered] == \
        [(2, "2"), (99, "99"), (190, "190"), (None, "expert")]
    rows, _ = snapshot(old_lake.table("steps", create=False), columns=["policy_version", "policy_version_text"])
    assert rows.schema.field("policy_version").type == pa.int64()
    assert sorted(rows.column("policy_version_text").to_pylist()) == sorted(OLD_VERSIONS * 2)
    # reading did not rewrite the table
    assert arrow_schema(DeltaTable(old_lake.uri("steps"))).field("policy_version").type == pa.string()


def test_a_writer_migrates_the_old_table_once_keeping_rows_and_watermarks(old_lake: Lakehouse, steps_of: Any) -> None:
    before = DeltaTable(old_lake.uri("steps"))
    reader = IncrementalReader(old_lake.table("steps", create=False), start=2)  # read the first two commits
    writer = old_lake.writer("steps", app_id_prefix="g.sop.steps")
    assert writer.resume_offset(0) == 2 * len(OLD_VERSIONS)  # the watermark survived the rewrite
    assert old_lake.pending_migrations("steps") == []
    dt = DeltaTable(old_lake.uri("steps"))
    assert arrow_schema(dt) == STEPS.schema
    assert dt.metadata().partition_columns == list(STEPS.partition_by)
    assert dt.metadata().configuration["delta.enableChangeDataFeed"] == "true"
    rewrite = json.loads(dt.metadata().configuration[MIGRATION_PROPERTY])[VERSION_MIGRATION]["version"]
    assert rewrite > before.version()
    assert old_lake.migrate("steps") is None  # once

    writer.write(steps_of("e9", n=2, policy_version="200", offsets=[8, 9]), offsets={0: 9})
    writer.write(steps_of("e8", n=2, policy_version="8", offsets=[8, 9]), offsets={0: 9})  # a replay: nothing new
    # any reader of the Delta table, not only SOP's: the column is a number now
    raw = DeltaTable(old_lake.uri("steps")).to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by name
    got = duckdb.sql("SELECT DISTINCT policy_version, policy_version_text FROM raw ORDER BY policy_version").fetchall()
    assert got == [(2, "2"), (99, "99"), (190, "190"), (200, "200"), (None, "expert")]

    # the incremental reader gets the rows committed after its version exactly once: not the rewrite's copies
    new = reader.poll()
    assert sorted(zip(new.column("episode_id").to_pylist(), new.column("policy_version").to_pylist(),
                      strict=True)) == [("e2", None), ("e2", None), ("e3", 2), ("e3", 2), ("e9", 200), ("e9", 200)]
    assert reader.poll().num_rows == 0

    # the versions before the rewrite are still there, read in the current shape
    old = query(old_lake, "SELECT policy_version FROM steps ORDER BY policy_version", versions={"steps": 2})
    assert old.column("policy_version").to_pylist() == [99, 99, 190, 190]


def test_a_migration_that_stopped_before_recording_its_version_is_found(old_lake: Lakehouse) -> None:
    version = old_lake.migrate("episodes")
    dt = DeltaTable(old_lake.uri("episodes"))
    started = json.loads(dt.metadata().configuration[MIGRATION_PROPERTY])[VERSION_MIGRATION]["started"]
    dt.alter.set_table_properties({MIGRATION_PROPERTY: json.dumps({VERSION_MIGRATION: {"started": started}})},
                                  raise_if_not_exists=False)
    dt.update_incremental()
    assert migration_versions(dt) == [version]
    reader = IncrementalReader(old_lake.table("episodes", create=False), start=1)
    assert sorted(reader.poll().column("policy_version_text").to_pylist()) == ["190", "2", "expert"]


def test_two_migrators_at_once_rewrite_the_table_once(old_lake: Lakehouse) -> None:
    import threading

    results, errors = [], []

    def migrate() -> None:
        try:
            results.append(Lakehouse(old_lake.root).migrate("steps"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results.count(None) == 1, results  # one rewrote, the other found it done
    dt = DeltaTable(old_lake.uri("steps"))
    assert arrow_schema(dt) == STEPS.schema
    assert dt.to_pyarrow_dataset().count_rows() == 2 * len(OLD_VERSIONS)
    rewrites = [c for c in dt.history() if c.get("sop.migration")]
    assert len(rewrites) == 1 and migration_versions(dt) == [rewrites[0]["version"]]
