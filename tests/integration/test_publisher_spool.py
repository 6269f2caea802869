"""The publisher's on-disk spool against a real broker: what Kafka cannot take goes to disk, reaches the
topics once Kafka is back (original timestamp, key, headers; per-episode order), and a restarted
publisher drains what the previous one left."""

from __future__ import annotations

import collections
import time
import uuid
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from producers.loadgen import LoadGenConfig, iter_fleet
from producers.publisher import EventPublisher, PublisherConfig
from producers.spool import SpoolConfig
from schemas import codec

DEAD = "127.0.0.1:1"  # nothing listens there: Kafka unreachable


def consume_all(bootstrap: str, topics: list[str]) -> list[tuple[str, int, int, int, bytes | None, dict, list | None]]:
    """Every message on ``topics``: (topic, partition, offset, timestamp ms, key, decoded record, headers)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "enable.auto.commit": False})
    ends = {}
    for t in topics:
        for p in c.list_topics(t, timeout=10).topics[t].partitions:
            ends[(t, p)] = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1]
    c.assign([TopicPartition(t, p, 0) for (t, p), end in ends.items() if end > 0])
    out = []
    want = sum(ends.values())
    misses = 0
    while len(out) < want and misses < 30:
        msgs = c.consume(1000, timeout=1.0)
        misses = 0 if msgs else misses + 1
        for m in msgs:
            if m.error() is None:
                out.append((m.topic(), m.partition(), m.offset(), m.timestamp()[1], m.key(), codec.decode(m.value())[1],
                            m.headers()))
    c.close()
    assert len(out) == want
    return out


def check_once_and_in_order(messages: list, topics: dict[str, str], published: dict[str, int]) -> None:
    """Every step, episode event and intervention exactly once; each episode's steps in step order on their
    partition, its STARTED before its ENDED."""
    by_topic = collections.defaultdict(list)
    for m in messages:
        by_topic[m[0]].append(m)
    steps = by_topic[topics["Step"]]
    ids = [(m[5]["episode_id"], m[5]["step_index"]) for m in steps]
    assert len(ids) == len(set(ids)) == published["Step"]
    episodes = [(m[5]["episode_id"], m[5]["kind"]) for m in by_topic[topics["EpisodeEvent"]]]
    assert len(episodes) == len(set(episodes)) == published["EpisodeEvent"]
    interventions = [(m[5]["episode_id"], m[5]["kind"], m[5]["step_index"]) for m in by_topic[topics["InterventionEvent"]]]
    assert len(interventions) == len(set(interventions)) == published["InterventionEvent"]
    for name in ("Step", "EpisodeEvent", "InterventionEvent"):
        per_episode = collections.defaultdict(list)
        for m in sorted(by_topic[topics[name]], key=lambda m: (m[1], m[2])):  # partition, offset
            assert m[4] == m[5]["episode_id"].encode()  # key kept
            per_episode[m[5]["episode_id"]].append(m[5])
        for records in per_episode.values():
            if name == "Step":
                assert [r["step_index"] for r in records] == sorted(r["step_index"] for r in records)
            elif name == "EpisodeEvent":
                assert [r["kind"] for r in records][0] == "STARTED"
            else:
                assert [r["step_index"] for r in records] == sorted(r["step_index"] for r in records)


def publish_all(pub: EventPublisher, records: list[tuple[str, dict]]) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for name, rec in records:
        pub.publish(name, rec, key=rec["episode_id"])
        counts[name] += 1
    return dict(counts)


def test_a_restarted_publisher_drains_what_the_previous_one_spooled(kafka, topics: dict[str, str], tmp_path: Path) -> None:
    records = list(iter_fleet(LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=12, seed=11, image_size=16)))
    spool = SpoolConfig(directory=tmp_path / "spool", segment_bytes=64 * 1024, max_bytes=64 << 20)
    first = EventPublisher(PublisherConfig(bootstrap=DEAD, topics=topics, delivery_timeout_ms=3_000),
                           spool=spool, spill_after_s=1.0)
    published = publish_all(first, records)
    assert first.close(30) == 0  # nothing held only in RAM: all of it is on disk
    s = first.stats
    assert s.delivered == s.failed == 0
    assert s.spooled == s.produced == s.spool_pending == len(records)
    assert s.spills >= 1

    restarted_ms = time.time_ns() // 1_000_000
    restarted = EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics), spool=spool)
    assert restarted.stats.recovered == len(records)
    assert restarted.flush(120) == 0
    s = restarted.stats
    assert s.drained == s.delivered == len(records) and s.spool_pending == 0 and s.spool_state == "direct"
    # once drained, new events go straight to Kafka
    late = next(r for n, r in records if n == "Step") | {"step_index": 10_000}
    restarted.publish("Step", late, key="late")
    assert restarted.close(60) == 0
    assert restarted.stats.delivered == len(records) + 1 and restarted.stats.drained == len(records)
    assert not list(spool.directory.glob("*.seg"))  # drained segments are gone
    messages = [m for m in consume_all(kafka.bootstrap, list(topics[n] for n in published)) if m[4] != b"late"]
    check_once_and_in_order(messages, topics, published)
    # event-time reasoning downstream: the Kafka timestamp is when the record was first published, not drained
    assert max(m[3] for m in messages) < restarted_ms
