"""The publisher survives the broker going away: every message is delivered after a restart or reported failed."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from infra import KafkaBrokerConfig, LocalKafka, ensure_topics
from infra.kafka import TopicSpec
from producers.loadgen import LoadGenConfig, iter_fleet
from producers.publisher import EventPublisher, PublisherConfig


def _count(bootstrap: str, topic: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex})
    md = c.list_topics(topic, timeout=10).topics[topic]
    n = sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in md.partitions)
    c.close()
    return n


def test_messages_published_across_a_broker_restart_are_all_delivered(tmp_path) -> None:
    broker = LocalKafka(KafkaBrokerConfig(data_dir=tmp_path / "k", port=0, heap_mb=384))
    bootstrap = broker.start()
    try:
        topics = {"Step": "r.steps", "EpisodeEvent": "r.episodes", "InterventionEvent": "r.interventions"}
        ensure_topics(bootstrap, [TopicSpec(name=t, partitions=2) for t in topics.values()])
        records = list(iter_fleet(LoadGenConfig(robots=4, hz=0, duration_s=None, episodes=40, seed=3)))
        pub = EventPublisher(PublisherConfig(bootstrap=bootstrap, topics=topics, delivery_timeout_ms=120_000,
                                             queue_max_messages=2_000), raise_on_failure=False)
        third = len(records) // 3
        for name, rec in records[:third]:
            pub.publish(name, rec, key=rec["episode_id"])
        pub.flush(30)
        broker.kill()  # the broker dies with messages about to be sent
        restarter = threading.Timer(3.0, broker.restart_same_ports)
        restarter.start()
        for name, rec in records[third:]:  # queue fills up, publish blocks (back-pressure) until the restart
            pub.publish(name, rec, key=rec["episode_id"])
        restarter.join()
        assert pub.flush(120) == 0
        s = pub.stats
        assert s.produced == len(records)
        assert s.delivered + s.failed == s.produced  # nothing silently lost
        assert s.failed == 0
        assert s.backpressure_waits > 0
        on_broker = sum(_count(bootstrap, t) for t in topics.values())
        assert on_broker == s.delivered  # idempotent producer: no duplicates from the retries
    finally:
        broker.stop()


def test_messages_that_cannot_be_delivered_are_reported_failed(tmp_path) -> None:
    broker = LocalKafka(KafkaBrokerConfig(data_dir=tmp_path / "k", port=0, heap_mb=384))
    bootstrap = broker.start()
    topics = {"Step": "f.steps", "EpisodeEvent": "f.episodes", "InterventionEvent": "f.interventions"}
    ensure_topics(bootstrap, [TopicSpec(name=t, partitions=1) for t in topics.values()])
    broker.stop()  # and it never comes back
    failures = []
    pub = EventPublisher(PublisherConfig(bootstrap=bootstrap, topics=topics, delivery_timeout_ms=3_000),
                         on_failure=failures.append, raise_on_failure=False)
    records = list(iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=3, seed=5,
                                            intervention_rate=1.0)))
    for name, rec in records:
        pub.publish(name, rec, key=rec["episode_id"])
    deadline = time.monotonic() + 30
    while pub.stats.in_flight and time.monotonic() < deadline:
        pub.poll(0.2)
    assert pub.stats.failed == len(records) == len(failures)
    assert pub.stats.delivered == 0
    assert {f.topic for f in failures} == set(topics.values())
