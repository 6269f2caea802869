"""Session fixtures: the real local stack on free loopback ports, torn down after the session.

- ``kafka``: one Kafka broker for the session (or ``SOP_TEST_KAFKA_BOOTSTRAP`` if set).
- ``topics``: fresh topic names for each test (``{"Step": ..., "deadletter": ...}``), created.
- ``mlflow_uri``: a fresh SQLite-backed MLflow registry with a local artifact root, per test.
"""

from __future__ import annotations

import os
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
