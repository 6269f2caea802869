"""The wire contract through a real broker: publisher → Kafka → decoding consumer (+ dead letters)."""

from __future__ import annotations

import uuid

from confluent_kafka import Consumer, Producer

from consumers.deadletter import HEADER_OFFSET, HEADER_PARTITION, HEADER_TOPIC, parse_headers
from consumers.decoding import DecodingConsumer, DecodingConsumerConfig
from producers.loadgen import LoadGenConfig, iter_fleet
from producers.publisher import EventPublisher, PublisherConfig


def _consumer(kafka, topics: dict[str, str], names=("Step", "EpisodeEvent", "InterventionEvent")) -> DecodingConsumer:
    return DecodingConsumer(DecodingConsumerConfig(
        bootstrap=kafka.bootstrap, group_id=f"g-{uuid.uuid4().hex[:6]}", topics=[topics[n] for n in names],
        deadletter_topic=topics["deadletter"]))


def test_round_trip_of_all_three_event_types(kafka, topics) -> None:
    records = list(iter_fleet(LoadGenConfig(robots=2, hz=0, duration_s=None, episodes=6, intervention_rate=1.0,
                                            min_steps=5, max_steps=12, seed=1)))
    sent = {"Step": 0, "EpisodeEvent": 0, "InterventionEvent": 0}
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        for name, rec in records:
            pub.publish(name, rec, key=rec["episode_id"])
            sent[name] += 1
        assert pub.flush(30) == 0
        assert pub.stats.delivered == len(records) and pub.stats.failed == 0
    assert all(sent.values())

    by_episode: dict[str, list] = {}
    with _consumer(kafka, topics) as consumer:
        got = list(consumer.messages(timeout_s=60, max_messages=len(records)))
    assert len(got) == len(records)
    assert consumer.counts.by_name == sent
    for m in got:
        assert m.key == m.record["episode_id"]
        by_episode.setdefault((m.name, m.record["episode_id"]), []).append(m)
    # key = episode_id keeps an episode's steps in one partition, in order
    for (name, _ep), msgs in by_episode.items():
        assert len({m.partition for m in msgs}) == 1
        if name == "Step":
            assert [m.record["step_index"] for m in msgs] == list(range(len(msgs)))
    # records arrive equal to what was sent
    sent_steps = {(r["episode_id"], r["step_index"]): r for n, r in records if n == "Step"}
    for m in got:
        if m.name == "Step":
            want = sent_steps[(m.record["episode_id"], m.record["step_index"])]
            assert m.record["images"][0]["data"] == want["images"][0]["data"]
            assert m.record["controller"] == want["controller"]


def test_malformed_message_goes_to_deadletter_and_partition_keeps_moving(kafka, topics) -> None:
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    good = list(iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=1, min_steps=3, max_steps=3)))
    key = good[0][1]["episode_id"]
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        pub.publish(*good[0], key=key)  # STARTED
        pub.flush()
        raw.produce(topics["EpisodeEvent"], b"\xc3\x01garbage!", key.encode())  # corrupt
        raw.produce(topics["EpisodeEvent"], b"plain text", key.encode())  # not Avro at all
        raw.flush(10)
        for name, rec in good[1:]:
            pub.publish(name, rec, key=key)
    with _consumer(kafka, topics) as consumer:
        got = list(consumer.messages(timeout_s=60, max_messages=len(good)))
    assert len(got) == len(good)
    assert consumer.counts.deadlettered == 2

    dlq = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "dlq-check", "auto.offset.reset": "earliest"})
    dlq.subscribe([topics["deadletter"]])
    letters = []
    for _ in range(100):
        m = dlq.poll(0.5)
        if m is not None and not m.error():
            letters.append(m)
        if len(letters) == 2:
            break
    dlq.close()
    assert [m.value() for m in letters] == [b"\xc3\x01garbage!", b"plain text"]
    headers = [parse_headers(m.headers()) for m in letters]
    assert {h[HEADER_TOPIC] for h in headers} == {topics["EpisodeEvent"]}
    assert int(headers[1][HEADER_OFFSET]) == int(headers[0][HEADER_OFFSET]) + 1
    assert all(h[HEADER_PARTITION].isdigit() for h in headers)
    assert headers[0]["sop.error_type"] in {"CorruptMessageError", "UnknownSchemaError"}
