"""The whole loop on the cluster profile, short: `sop run --profile cluster` with two processor workers in one
group, the lake in the S3 bucket and the registry on the PostgreSQL-backed MLflow server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from infra.registry import registry_client
from lakehouse import Lakehouse, query
from tests.conftest import ClusterUnderTest

pytestmark = pytest.mark.e2e


def test_sop_run_on_the_cluster_profile(cluster: ClusterUnderTest, tmp_path) -> None:
    env = {**cluster.env, "SOP_PRETRAIN_STEPS": "40", "SOP_LEARN_PUBLISH_EVERY": "20", "SOP_ACTOR_IMAGE_SIZE": "48"}
    # only --profile selects the cluster: the children must get every endpoint explicitly, as on a real site
    env.pop("SOP_PROFILE")
    log = tmp_path / "sop-run.log"
    with open(log, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "sop", "run", "--profile", "cluster", "--actors", "1", "--minutes", "1.5",
             "--demos-per-task", "2", "--tasks", "reach-v3", "--keep-stack"],
            env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-4000:]
    run_dir = cluster.run_dir
    assert "duration" in json.loads((run_dir / "last-run.json").read_text())["stop_reason"]
    # nothing fell back to the embedded stores: no local lake, no SQLite registry
    assert not (run_dir / "lake").exists() and not (run_dir / "mlflow.db").exists()
    logs = {p.name: p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log")}
    assert {"processor-0.log", "processor-1.log", "learner.log", "actor-00.log"} <= set(logs)
    assert not [name for name, text in logs.items() if "Traceback" in text], logs

    # both workers of the group held partitions and processed steps
    metrics = [json.loads(p.read_text()) for p in (run_dir / "processor").glob("metrics-sop-processor@*.json")]
    assert len(metrics) == 2 and all(m["steps_in"] > 0 for m in metrics), metrics

    settings = cluster.settings()
    assert settings.lake_root == "s3://sop/lake"
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options)
    episodes = query(lake, "SELECT episode_id, num_steps, policy_version FROM episodes").to_pylist()
    assert len(episodes) >= 5, episodes
    steps = {r["episode_id"]: r["n"] for r in query(
        lake, "SELECT episode_id, count(*) AS n, count(DISTINCT step_index) AS k FROM steps GROUP BY episode_id "
              "HAVING n = k").to_pylist()}
    assert all(steps.get(e["episode_id"]) == e["num_steps"] for e in episodes), (episodes, steps)

    client = registry_client(settings.tracking_uri)
    versions = client.search_model_versions("name = 'sop-policy'")
    base = min(int(v.version) for v in versions)
    assert len(versions) >= 3, "the base policy and learner versions"
    assert all(v.source.startswith("mlflow-artifacts:/") for v in versions)
    assert any(e["policy_version"] is not None and e["policy_version"] > base for e in episodes), episodes
