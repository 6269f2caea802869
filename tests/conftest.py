"""Session fixtures: the real local stack on free loopback ports, torn down after the session.

- ``kafka``: one Kafka broker for the session (or ``SOP_TEST_KAFKA_BOOTSTRAP`` if set).
- ``topics``: fresh topic names for each test (``{"Step": ..., "deadletter": ...}``), created.
- ``mlflow_uri``: a fresh SQLite-backed MLflow registry with a local artifact root, per test.
- ``cluster``: the cluster profile (3 brokers, SeaweedFS S3, MLflow server on PostgreSQL) for the session,
  started by `sop up --profile cluster` the first time a test asks for it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import KafkaBrokerConfig, LocalKafka
from infra.kafka import create_topic_set

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MUJOCO_GL", "egl")


@dataclass
class KafkaUnderTest:
    bootstrap: str
    broker: LocalKafka | None  # None when an external broker is used


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaUnderTest]:
    external = os.environ.get("SOP_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield KafkaUnderTest(bootstrap=external, broker=None)
        return
    broker = LocalKafka(KafkaBrokerConfig(data_dir=tmp_path_factory.mktemp("kafka"), port=0, heap_mb=512))
    bootstrap = broker.start()
    try:
        yield KafkaUnderTest(bootstrap=bootstrap, broker=broker)
    finally:
        broker.stop()


def make_topics(bootstrap: str, *, partitions: int = 2) -> dict[str, str]:
    return create_topic_set(bootstrap, prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=partitions)


@pytest.fixture
def topics(kafka: KafkaUnderTest) -> dict[str, str]:
    return make_topics(kafka.bootstrap)


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    from infra.mlflow_local import ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_experiment(uri, tmp_path / "mlartifacts")
    return uri


@dataclass
class ClusterUnderTest:
    """The cluster profile started by `sop up --profile cluster` in its own run directory (once per session)."""

    run_dir: Path
    env: dict[str, str]  # the environment that selects it: SOP_RUN_DIR, SOP_PROFILE=cluster, free ports

    def settings(self):  # noqa: ANN201 - sop.settings.Settings, resolved with the cluster's endpoints
        from sop.settings import Settings, resolve_profile

        return resolve_profile(Settings(run_dir=self.run_dir, profile="cluster"))


def sop_cli(*args: str, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "sop", *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterUnderTest]:
    run_dir = tmp_path_factory.mktemp("cluster") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_") or k in ("SOP_JAR_CACHE", "SOP_TOOL_CACHE")}
    env.update({"SOP_RUN_DIR": str(run_dir), "SOP_PROFILE": "cluster", "SOP_KAFKA_PORT": "0", "COLUMNS": "200",
                "HF_HUB_OFFLINE": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
    started = sop_cli("up", env=env, timeout_s=900)
    under_test = ClusterUnderTest(run_dir=run_dir, env=env)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield under_test
    finally:
        sop_cli("down", env=env)
