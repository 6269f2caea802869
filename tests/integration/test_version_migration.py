"""An upgraded processor on a lake written before ``policy_version`` became an int64: it migrates the tables
once at start, stores the new episodes from the real broker beside the old rows, and SQL orders versions as
numbers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable

from lakehouse import EPISODES, STEPS, Lakehouse, query
from lakehouse.tables import arrow_schema
from learner.synthetic import episode_summary, synthetic_episode
from producers.loadgen import LoadGenConfig, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from schemas.images import jpeg_pool
from tests.integration.processing import ProcessorProcess, count, wait_for
from tests.old_tables import create_old, write_old

pytestmark = pytest.mark.integration
OLD = ("99", "190", "expert")  # as text: "99" > "190"; the scripted expert has no number


def test_an_upgraded_processor_migrates_an_old_lake_and_keeps_every_row(kafka, topics, tmp_path) -> None:
    lake = Lakehouse(tmp_path / "lake")
    rng, frames = np.random.default_rng(0), jpeg_pool(4, 32, 0)
    for spec in (STEPS, EPISODES):
        create_old(lake, spec)
    for version in OLD:
        eid = f"old-{version}"
        write_old(lake, STEPS, synthetic_episode("reach-v3", 5, rng, episode_id=eid, demo=False, frames=frames,
                                                 image_size=32, policy_version=version))
        write_old(lake, EPISODES, [episode_summary(eid, task="reach-v3", policy_version=version, outcome="SUCCESS",
                                                   num_steps=5)])
    assert arrow_schema(DeltaTable(lake.uri("steps"))).field("policy_version").type == pa.string()

    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=tmp_path / "lake").start()
    try:
        with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
            new = run_loadgen(LoadGenConfig(robots=2, hz=0, duration_s=None, episodes=4, min_steps=5, max_steps=20,
                                            image_size=64, seed=5), pub)  # policy_version "0"
            assert pub.flush(30) == 0
        wait_for(lambda: count(tmp_path / "lake", "SELECT count(*) FROM episodes") >= len(OLD) + new.episodes
                 and count(tmp_path / "lake", "SELECT count(*) FROM steps") >= 5 * len(OLD) + new.steps,
                 timeout_s=180, processor=proc)
    finally:
        proc.stop()

    for name in ("steps", "episodes"):  # migrated in place: what any Delta reader (Spark, DuckDB) now sees
        schema = arrow_schema(DeltaTable(lake.uri(name)))
        assert schema.field("policy_version").type == pa.int64() and "policy_version_text" in schema.names, name
    assert lake.pending_migrations("steps") == lake.pending_migrations("episodes") == []
    rows = query(lake, "SELECT policy_version, policy_version_text, count(*) AS n FROM episodes "
                       "GROUP BY ALL ORDER BY policy_version NULLS LAST").to_pylist()
    assert [(r["policy_version"], r["policy_version_text"]) for r in rows] == \
        [(0, "0"), (99, "99"), (190, "190"), (None, "expert")]
    assert [r["n"] for r in rows] == [new.episodes, 1, 1, 1]
    assert count(tmp_path / "lake", "SELECT count(*) FROM steps") == 5 * len(OLD) + new.steps
    assert count(tmp_path / "lake", "SELECT count(*) FROM (SELECT episode_id, step_index FROM steps "
                                    "GROUP BY 1, 2 HAVING count(*) > 1)") == 0
