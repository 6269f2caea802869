"""The wire contract through a real broker: publisher → Kafka → decoding consumer (+ dead letters)."""

from __future__ import annotations

import time
import uuid

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.deadletter import (
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_TOPIC,
    Reason,
    deadletter_headers,
    parse_headers,
)
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


class _Killed(Exception):
    pass


def _read_all(bootstrap: str, topic: str) -> list:
    """Every message of ``topic`` now (all partitions, beginning to end)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False})
    md = c.list_topics(topic, timeout=15).topics[topic]
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in md.partitions}
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out, seen = [], dict.fromkeys(ends, 0)
    deadline = time.monotonic() + 60
    while any(seen[p] < ends[p] for p in ends) and time.monotonic() < deadline:
        for m in c.consume(100, timeout=1.0):
            if m.error() is None:
                out.append(m)
                seen[m.partition()] = m.offset() + 1
    c.close()
    assert all(seen[p] >= ends[p] for p in ends), "could not read the whole topic"
    return out


def test_replay_deadletter_is_exactly_once_when_killed_midway_and_run_again(kafka, topics, monkeypatch) -> None:
    from schemas import codec
    from sop.commands.replay import HEADER_REPLAYED_FROM, HEADER_REPLAYED_ORIGIN, replay_deadletters
    from sop.settings import load_settings

    monkeypatch.setenv("SOP_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("SOP_TOPIC_PREFIX", topics["Step"].removesuffix("steps"))
    settings = load_settings()
    assert settings.topics == topics
    # dead letters as the processor writes them: 20 unknown-schema steps (one of them dead-lettered twice, as
    # after a processor crash between the dead letter and its commit) and 3 corrupt episode events
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    now_ms = int(time.time() * 1000)
    letters = []
    for i in range(20):
        key, value, ts = f"ep-{i % 5}".encode(), b"\xc3\x01" + bytes([i]) * 30, now_ms - 60_000 + i
        headers = deadletter_headers(error=codec.UnknownSchemaError(b"\x01" * 8), topic=topics["Step"],
                                     partition=i % 2, offset=100 + i, timestamp_ms=ts, processor="old")
        raw.produce(topics["deadletter"], value, key, headers=headers)
        letters.append((key, value, ts))
        if i == 7:
            raw.produce(topics["deadletter"], value, key, headers=headers)  # the same origin event again
    for i in range(3):
        raw.produce(topics["deadletter"], b"junk", b"ep-x", headers=deadletter_headers(
            error=codec.CorruptMessageError("garbage"), topic=topics["EpisodeEvent"], partition=0, offset=i))
    assert raw.flush(30) == 0

    def kill_after_first_batch(report: dict) -> None:
        raise _Killed(report)

    with pytest.raises(_Killed):  # delivered, not committed: the worst moment to die
        replay_deadletters(settings, reasons=["unknown-schema"], batch=6, on_batch=kill_after_first_batch)
    first = sum(1 for m in _read_all(kafka.bootstrap, topics["Step"]))
    assert 0 < first < 20
    again = replay_deadletters(settings, reasons=["unknown-schema"], batch=6)
    assert again["recovered"] == first  # found by their sop.replayed-from headers, not published twice
    assert again["republished"] == 20 - first
    assert again["skipped"].get("other-reason") == 3
    third = replay_deadletters(settings, reasons=["unknown-schema"])
    assert third["republished"] == 0 and third["letters"] == 0  # the job's committed offsets are at the end

    replayed = _read_all(kafka.bootstrap, topics["Step"])
    assert len(replayed) == 20
    by_letter = {}
    for m in replayed:
        h = parse_headers(m.headers())
        by_letter.setdefault(h[HEADER_REPLAYED_ORIGIN], []).append(h[HEADER_REPLAYED_FROM])
        assert h[HEADER_REPLAYED_FROM].startswith(topics["deadletter"] + "/")
    assert len(by_letter) == 20 and all(len(v) == 1 for v in by_letter.values())
    assert sorted((m.key(), m.value(), m.timestamp()[1]) for m in replayed) == sorted(letters)
    assert not _read_all(kafka.bootstrap, topics["EpisodeEvent"])  # other reasons stay where they are


def test_replay_deadletter_command_counts_without_publishing_on_dry_run(kafka, topics, monkeypatch) -> None:
    from sop.commands.replay import command

    monkeypatch.setenv("SOP_KAFKA_BOOTSTRAP", kafka.bootstrap)
    monkeypatch.setenv("SOP_TOPIC_PREFIX", topics["Step"].removesuffix("steps"))
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    raw.produce(topics["deadletter"], b"x", b"k", headers=deadletter_headers(
        error=ValueError("?"), reason=Reason.UNKNOWN_SCHEMA, topic=topics["Step"], partition=0, offset=1))
    assert raw.flush(30) == 0
    runner = CliRunner()
    out = runner.invoke(command, ["deadletter", "--reason", "unknown-schema", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "would re-publish 1 of 1" in out.output
    assert not _read_all(kafka.bootstrap, topics["Step"])
    bad = runner.invoke(command, ["deadletter", "--reason", "no-such-reason"])
    assert bad.exit_code != 0 and "unknown-schema" in bad.output
