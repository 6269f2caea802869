"""`sop kafka topics | groups | consume`: Kafka's own tools (kafka-tools jars) against the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

pytestmark = [pytest.mark.integration]


def sop_kafka(*args: str, kafka, topics: dict[str, str], run_dir: Path) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {**os.environ, "SOP_KAFKA_BOOTSTRAP": kafka.bootstrap, "SOP_RUN_DIR": str(run_dir),
           "SOP_TOPIC_PREFIX": topics["Step"].removesuffix("steps")}
    return subprocess.run([sys.executable, "-m", "sop", "kafka", *args], env=env, capture_output=True, text=True,
                          timeout=180)


def test_topics_groups_and_console_consumer(kafka, topics, tmp_path: Path) -> None:  # noqa: ANN001
    steps = topics["Step"]
    listed = sop_kafka("topics", kafka=kafka, topics=topics, run_dir=tmp_path)  # default: --list
    assert listed.returncode == 0, listed.stderr
    assert set(topics.values()) <= set(listed.stdout.split())

    described = sop_kafka("topics", "--describe", "--topic", steps, kafka=kafka, topics=topics, run_dir=tmp_path)
    assert described.returncode == 0, described.stderr
    assert f"Topic: {steps}" in described.stdout and "PartitionCount: 2" in described.stdout

    producer = Producer({"bootstrap.servers": kafka.bootstrap})
    for i in range(5):
        producer.produce(steps, key=f"episode-{i}", value=f"value-{i}".encode(), partition=0)
    assert producer.flush(30) == 0
    group = f"tools-{uuid.uuid4().hex[:8]}"
    consumer = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
    consumer.subscribe([steps])
    got = []
    while len(got) < 3:
        msg = consumer.poll(10)
        assert msg is not None, "no message within 10 s"
        got.append(msg)
    consumer.commit(message=got[-1], asynchronous=False)  # committed 3 of 5: a lag of 2 on partition 0
    consumer.close()

    groups = sop_kafka("groups", kafka=kafka, topics=topics, run_dir=tmp_path)
    assert groups.returncode == 0 and group in groups.stdout.split(), groups.stderr
    lag = sop_kafka("groups", "--describe", "--group", group, kafka=kafka, topics=topics, run_dir=tmp_path)
    assert lag.returncode == 0, lag.stderr
    rows = [line.split() for line in lag.stdout.splitlines() if line.startswith(group)]
    # GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG …
    assert [(r[1], r[2], r[3], r[4], r[5]) for r in rows if r[2] == "0"] == [(steps, "0", "3", "5", "2")]

    consumed = sop_kafka("consume", steps, "--from-beginning", "--max-messages", "5", "--property", "print.key=true",
                         kafka=kafka, topics=topics, run_dir=tmp_path)
    assert consumed.returncode == 0, consumed.stderr
    assert sorted(consumed.stdout.splitlines()) == [f"episode-{i}\tvalue-{i}" for i in range(5)]
    props = (tmp_path / "kafka-tools.properties").read_text()
    assert f"bootstrap.servers={kafka.bootstrap}".replace(":", "\\:") in props


def test_a_client_setting_without_a_java_name_is_an_error(kafka, topics, tmp_path: Path,  # noqa: ANN001
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_KAFKA_CLIENT_CONFIG",  # valid for every Python client, not expressible in Java properties
                       '{"security.protocol": "SSL", "enable.ssl.certificate.verification": "false"}')
    result = sop_kafka("topics", kafka=kafka, topics=topics, run_dir=tmp_path)
    assert result.returncode == 1 and "enable.ssl.certificate.verification cannot be translated" in result.stderr
