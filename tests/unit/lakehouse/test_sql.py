"""SQL over the registered tables: the README's example queries, missing tables, time travel, output files."""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lakehouse import EXAMPLES, Lakehouse, QueryError, TableNotFoundError, history, query, write_result
from lakehouse.sql import format_of


def fill(lake: Lakehouse, steps_of: Any, episode_of: Any, intervention_of: Any) -> None:
    """Two tasks, two policy versions, two robots; robot-1 needs the operator."""
    episodes = [
        episode_of("a", task="reach-v3", policy_version="1", outcome="SUCCESS", num_steps=10, offset=0),
        episode_of("b", task="reach-v3", policy_version="1", outcome="FAILURE", num_steps=30, offset=1),
        episode_of("c", task="reach-v3", policy_version="2", outcome="SUCCESS", num_steps=12, offset=2),
        episode_of("d", task="drawer-open-v3", policy_version="2", outcome="SUCCESS", num_steps=40, offset=3,
                   actor_id="robot-1", num_interventions=2, human_steps=10),
        episode_of("e", task="drawer-open-v3", policy_version="2", outcome="TIMEOUT", num_steps=60, offset=4,
                   actor_id="robot-1", num_interventions=0, human_steps=0),
    ]
    lake.writer("episodes", app_id_prefix="g.sop.episodes").write(episodes, offsets={0: 4})
    interventions = [
        intervention_of("d", kind="STARTED", step_index=5, actor_id="robot-1", offset=0),
        intervention_of("d", kind="ENDED", step_index=10, actor_id="robot-1", offset=1),
        intervention_of("d", kind="STARTED", step_index=20, actor_id="robot-1", offset=2),
        intervention_of("d", kind="ENDED", step_index=25, actor_id="robot-1", offset=3),
    ]
    lake.writer("interventions", app_id_prefix="g.sop.interventions").write(interventions, offsets={0: 3})
    rows = steps_of("a", n=3, human_steps=frozenset({1}))
    for i, row in enumerate(rows):
        row["advantage"] = [0.5, -0.1, 0.2][i]
    lake.writer("steps", app_id_prefix="g.sop.steps").write(rows, offsets={0: 2})


@pytest.fixture
def filled(lake: Lakehouse, steps_of: Any, episode_of: Any, intervention_of: Any) -> Lakehouse:
    fill(lake, steps_of, episode_of, intervention_of)
    return lake


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_query_runs(filled: Lakehouse, name: str) -> None:
    sql = EXAMPLES[name]
    if "now()" in sql:  # relative to the wall clock: the fixture's rows are from a fixed day
        sql = sql.replace("now()", "TIMESTAMPTZ '2100-01-01 00:00:00+00'").replace("INTERVAL 1 HOUR", "INTERVAL 200 YEAR")
    assert query(filled, sql).num_rows > 0


def test_success_rate_per_task_and_policy_version(filled: Lakehouse) -> None:
    rows = query(filled, EXAMPLES["success_rate_by_task_and_policy"]).to_pylist()
    got = {(r["task"], r["policy_version"]): (r["episodes"], r["success_rate"]) for r in rows}
    assert got == {("drawer-open-v3", 2): (2, 0.5), ("reach-v3", 1): (2, 0.5), ("reach-v3", 2): (1, 1.0)}


def test_intervention_rate_per_actor(filled: Lakehouse) -> None:
    rows = {r["actor_id"]: r for r in query(filled, EXAMPLES["intervention_rate_by_actor"]).to_pylist()}
    assert rows["robot-0"]["share_of_episodes_with_takeover"] == 0.0
    assert rows["robot-1"]["share_of_episodes_with_takeover"] == 0.5
    assert rows["robot-1"]["takeovers_per_episode"] == 1.0
    assert rows["robot-1"]["human_step_share"] == pytest.approx(10 / 100)


def test_episode_length_distribution(filled: Lakehouse) -> None:
    rows = {r["task"]: r for r in query(filled, EXAMPLES["episode_length_distribution"]).to_pylist()}
    assert (rows["reach-v3"]["min_steps"], rows["reach-v3"]["median_steps"], rows["reach-v3"]["max_steps"]) == (10, 12, 30)
    assert rows["drawer-open-v3"]["median_steps"] == 50


def test_takeovers_pair_started_and_ended_events(filled: Lakehouse) -> None:
    rows = query(filled, EXAMPLES["takeovers"]).to_pylist()
    assert [(r["start_step"], r["end_step"], r["human_steps"]) for r in rows] == [(5, 10, 5), (20, 25, 5)]


def test_positive_advantage_share(filled: Lakehouse) -> None:
    (row,) = query(filled, EXAMPLES["positive_advantage_share"]).to_pylist()
    assert row["positive_share"] == pytest.approx(2 / 3)
    assert row["human_share"] == pytest.approx(1 / 3)


def test_a_missing_table_error_names_the_existing_ones(lake: Lakehouse, episode_of: Any) -> None:
    lake.writer("episodes", app_id_prefix="g").write([episode_of()], offsets={0: 0})
    with pytest.raises(TableNotFoundError, match=r"'steps' does not exist.*tables there: episodes"):
        query(lake, "SELECT count(*) FROM steps")
    with pytest.raises(TableNotFoundError, match="'episodez'.*no table of that name"):
        query(lake, "SELECT * FROM episodez")
    with pytest.raises(QueryError, match="nope"):
        query(lake, "SELECT nope FROM episodes")


def test_time_travel_by_version_and_timestamp(lake: Lakehouse, episode_of: Any, steps_of: Any) -> None:
    writer = lake.writer("episodes", app_id_prefix="g")
    writer.write([episode_of("a", offset=0)], offsets={0: 0})
    # commits well apart, so "as of" a time between them is unambiguous even on a loaded machine (a commit's
    # recorded timestamp and its log file's modification time can differ by milliseconds); not a timing test
    time.sleep(0.6)
    writer.write([episode_of("b", offset=1)], offsets={0: 1})
    commits = history(lake.table("episodes"))
    first = commits[1]
    between = first.timestamp + timedelta(seconds=0.3)
    time.sleep(0.6)
    lake.writer("steps", app_id_prefix="g").write(steps_of(n=1), offsets={0: 0})

    count = "SELECT count(*) AS n FROM episodes"
    assert query(lake, count).column("n").to_pylist() == [2]
    assert query(lake, count, versions={"episodes": first.version}).column("n").to_pylist() == [1]
    assert query(lake, count, as_of=between).column("n").to_pylist() == [1]
    with pytest.raises(TableNotFoundError, match="'steps'"):  # steps did not exist yet then
        query(lake, "SELECT count(*) FROM steps", as_of=between.isoformat())


def test_results_write_to_csv_json_and_parquet(filled: Lakehouse, tmp_path: Path) -> None:
    result = query(filled, "SELECT episode_id, step_index, images, proprio, event_time FROM steps ORDER BY step_index")
    write_result(result, tmp_path / "out.parquet")
    assert pq.read_table(tmp_path / "out.parquet").equals(result)

    write_result(result, tmp_path / "out.csv")
    csv = pacsv.read_csv(tmp_path / "out.csv")
    assert csv.column("step_index").to_pylist() == [0, 1, 2]
    assert json.loads(csv.column("proprio")[1].as_py()) == pytest.approx([0.1] * 4)

    stream = io.BytesIO()
    write_result(result, stream, fmt="json")
    lines = [json.loads(line) for line in stream.getvalue().decode().splitlines()]
    assert [line["step_index"] for line in lines] == [0, 1, 2]
    assert lines[0]["images"][0]["camera"] == "corner"
    assert lines[0]["event_time"].startswith("2026-11-18T")

    assert format_of("x.jsonl") == "json"
    empty = pa.table({"a": pa.array([], pa.int64())})
    write_result(empty, tmp_path / "empty.csv")
