"""The whole loop, small: `sop run` on a fresh run directory, as a newcomer would start it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from confluent_kafka import Consumer
from mlflow.tracking import MlflowClient

from lakehouse import Lakehouse, query
from schemas import codec


def _ended_episodes(bootstrap: str, topic: str) -> set[str]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe([topic])
    ended, idle = set(), 0
    while idle < 10:
        m = c.poll(0.5)
        if m is None:
            idle += 1
            continue
        idle = 0
        if m.error():
            continue
        name, rec = codec.decode(m.value())
        if name == "EpisodeEvent" and rec["kind"] == "ENDED":
            ended.add(rec["episode_id"])
    c.close()
    return ended


def test_sop_run_registers_versions_actors_follow_and_delta_matches_kafka(tmp_path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_PORT": "0", "SOP_PRETRAIN_STEPS": "40",
           "SOP_LEARN_PUBLISH_EVERY": "20", "SOP_ACTOR_IMAGE_SIZE": "48", "SOP_TOPIC_PARTITIONS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "sop", "run", "--actors", "2", "--minutes", "1.5", "--demos-per-task", "2",
         "--tasks", "drawer-open-v3,reach-v3", "--keep-stack"],
        env=env, capture_output=True, text=True, timeout=900)
    try:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        bootstrap = json.loads((run_dir / "kafka" / "broker.json").read_text())["bootstrap"]

        client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
        versions = client.search_model_versions("name = 'sop-policy'")
        assert len(versions) >= 3, "the base policy and at least two learner versions"
        base = min(int(v.version) for v in versions)

        lake = Lakehouse(str(run_dir / "lake"))
        acted = query(lake, "SELECT DISTINCT actor_id, policy_version FROM episodes").to_pylist()
        followed = {r["actor_id"] for r in acted if r["policy_version"].isdigit() and int(r["policy_version"]) > base}
        assert followed == {"actor-00", "actor-01"}, acted  # both actors switched to learner versions

        in_delta = set(query(lake, "SELECT episode_id FROM episodes").column(0).to_pylist())
        published = _ended_episodes(bootstrap, "sop.episodes")
        assert in_delta == published and len(published) > 0
        steps = query(lake, "SELECT count(*) AS n FROM steps").to_pylist()[0]
        assert steps["n"] == query(lake, "SELECT sum(num_steps) FROM episodes").column(0)[0].as_py()

        reports = list((run_dir / "reports").glob("*/report.md"))
        assert len(reports) == 1
        folder = reports[0].parent
        for name in ("success_vs_time.png", "interventions_vs_time.png", "episodes_per_hour.png", "summary.json"):
            assert (folder / name).stat().st_size > 0, name
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["episodes"] == len(in_delta)
    finally:
        subprocess.run([sys.executable, "-m", "sop", "down"], env=env, capture_output=True, timeout=120)
