"""Faults in every service of the cluster profile while the loop runs (benchmarks/chaos_cluster.py, fewer faults):
a broker SIGKILLed, the S3 server and the MLflow server restarted, a processor worker SIGKILLed — and every event
published accounted for one by one. Runs on the session's cluster (`cluster` fixture) with its own topics, consumer
group, lake prefix and policy name; every service it breaks is running again, with full in-sync replicas, when it
returns (checked below), so the tests after it see a healthy cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.chaos_cluster import CampaignConfig, run_campaign, under_replicated
from sop.stack import running_cluster
from tests.conftest import ClusterUnderTest

pytestmark = pytest.mark.integration


def test_broker_s3_registry_and_worker_faults_lose_and_duplicate_nothing(cluster: ClusterUnderTest,
                                                                         tmp_path: Path) -> None:
    settings = cluster.settings()
    cfg = CampaignConfig(broker_kills=1, s3_restarts=1, mlflow_restarts=1, worker_kills=1, robots=4, hz=20,
                         down_s=5.0, broker_down_s=10.0, settle_s=3.0, quiet_s=120.0,
                         abort_timeout_s=15.0)
    res = run_campaign(settings, cfg, workdir=tmp_path / "faults")
    summary = "\n".join([*(f"{ph.name}: {'; '.join(ph.notes)}" for ph in res.phases), *res.failed_checks,
                         *(x for v in res.verdicts for x in v.lost[:10])])

    assert [ph.name for ph in res.phases] == ["1 broker kills", "2 S3 restarts", "3 MLflow restarts", "4 worker kills"]
    assert all(v.sent > 0 for v in res.verdicts), summary  # the loop ran through every fault
    assert res.lost == 0 and res.duplicated == 0, summary
    assert res.extra["accepted_not_in_log"] == 0, summary  # acks=all: nothing acknowledged was lost with a broker
    assert not res.phases[-1].stalled, summary
    assert res.failed_checks == [], summary
    assert res.unexpected_exits == [], summary
    learner = res.extra["learner"]
    assert learner["versions"] >= 2 and learner["steps_twice"] == 0 and learner["incomplete"] == [], learner

    # the session's cluster is whole again
    parts = running_cluster(settings)
    assert all(parts.kafka.node(i).state() for i in parts.kafka.node_ids)
    assert parts.s3.state() and parts.mlflow.state()
    assert under_replicated(settings.bootstrap()) == {}
