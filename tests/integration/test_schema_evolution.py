"""Schema evolution through the real broker and real Delta tables: v1 and v2 producers at once, a processor that
predates v2 dead-letters its messages as unknown-schema, and `sop replay deadletter` brings them back exactly once."""

from __future__ import annotations

import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from consumers.deadletter import HEADER_REASON, parse_headers
from lakehouse import Lakehouse, query
from producers.loadgen import LoadGenConfig, LoadGenReport, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from schemas import codec
from tests.integration.processing import ProcessorProcess, count, wait_for

EPISODES = "SELECT count(*) FROM episodes"
STEPS = "SELECT count(*) FROM steps"
DUPLICATE_STEPS = "SELECT count(*) FROM (SELECT episode_id, step_index FROM steps GROUP BY 1, 2 HAVING count(*) > 1)"
DUPLICATE_EPISODES = "SELECT count(*) FROM (SELECT episode_id FROM episodes GROUP BY 1 HAVING count(*) > 1)"


class _CodecSink:
    """An ``EventSink`` that writes with a given codec: ``Codec(known_versions=["v1"])`` is a v1 robot."""

    def __init__(self, publisher: EventPublisher, writer: codec.Codec) -> None:
        self.publisher, self.writer = publisher, writer

    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        self.publisher.publish_raw(self.publisher.config.topics[record_name], self.writer.encode(record_name, record),
                                   key=key)


def _fleets_at_once(kafka, topics, *, episodes: int) -> tuple[LoadGenReport, LoadGenReport]:  # noqa: ANN001
    """A v1 fleet (old firmware) and a v2 fleet (capture times) publishing on the same topics at the same time."""
    cfgs = {
        "v1": LoadGenConfig(robots=2, hz=60, duration_s=None, episodes=episodes, seed=31, min_steps=5, max_steps=30,
                            intervention_rate=0.5, run_id=f"v1{uuid.uuid4().hex[:6]}"),
        "v2": LoadGenConfig(robots=2, hz=60, duration_s=None, episodes=episodes, seed=32, min_steps=5, max_steps=30,
                            intervention_rate=0.5, capture_times=True, run_id=f"v2{uuid.uuid4().hex[:6]}"),
    }
    writers = {"v1": codec.Codec(known_versions=["v1"]), "v2": codec.Codec()}
    reports: dict[str, LoadGenReport] = {}

    def fleet(version: str) -> None:
        with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
            reports[version] = run_loadgen(cfgs[version], _CodecSink(pub, writers[version]))
            assert pub.flush(30) == 0 and pub.stats.failed == 0

    threads = [threading.Thread(target=fleet, args=(v,)) for v in cfgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(reports) == {"v1", "v2"}, "a fleet thread failed"
    return reports["v1"], reports["v2"]


def _reasons(bootstrap: str, topic: str) -> list[str]:
    """The sop.reason of every dead letter on ``topic`` now."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"dl-{uuid.uuid4().hex[:6]}", "enable.auto.commit": False})
    parts = list(c.list_topics(topic, timeout=15).topics[topic].partitions)
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in parts}
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    seen = dict.fromkeys(parts, 0)
    out = []
    deadline = time.monotonic() + 60
    while any(seen[p] < ends[p] for p in parts) and time.monotonic() < deadline:
        for m in c.consume(200, timeout=1.0):
            if m.error() is None:
                out.append(parse_headers(m.headers()).get(HEADER_REASON, ""))
                seen[m.partition()] = m.offset() + 1
    c.close()
    return out


def _steps_of(lake, actor_prefix: str) -> int:  # noqa: ANN001
    return count(lake, f"SELECT count(*) FROM steps WHERE actor_id LIKE 'loadgen-{actor_prefix}%'")


def test_v1_and_v2_producers_at_once_every_row_is_stored(kafka, topics, tmp_path) -> None:
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake).start()
    try:
        v1, v2 = _fleets_at_once(kafka, topics, episodes=8)
        episodes, steps = v1.episodes + v2.episodes, v1.steps + v2.steps
        wait_for(lambda: count(lake, EPISODES) >= episodes and count(lake, STEPS) >= steps, timeout_s=240,
                 processor=proc)
        time.sleep(2)  # nothing more may arrive
        assert count(lake, EPISODES) == episodes == 16
        assert count(lake, STEPS) == steps
        assert count(lake, DUPLICATE_STEPS) == 0
        v1_actor = v1.episode_ids[0].split("-")[1]
        assert _steps_of(lake, v1_actor) == v1.steps
        assert _reasons(kafka.bootstrap, topics["deadletter"]) == []
        images = query(Lakehouse(str(lake)), "SELECT images FROM steps LIMIT 0").schema.field("images").type.value_type
    finally:
        proc.stop()
    assert images.get_field_index("capture_time_us") >= 0
    lh = Lakehouse(str(lake))
    with_time = query(lh, "SELECT count(*) FROM (SELECT unnest(images) AS i FROM steps) "
                          "WHERE i.capture_time_us IS NOT NULL").column(0)[0].as_py()
    assert with_time == v2.steps  # one camera per v2 step (the default task contracts), none from v1


def test_old_processor_deadletters_v2_and_replay_restores_them_exactly_once(kafka, topics, tmp_path,
                                                                             monkeypatch) -> None:
    lake, group = tmp_path / "lake", f"evolve-{uuid.uuid4().hex[:6]}"
    # episodes stay open while their steps wait in the dead-letter topic (no forced close, no abort) — even with
    # a short grace and abort timeout: the processor holds an episode whose steps it could not read yet
    hold = {"processor_end_grace_s": 2, "processor_abort_timeout_s": 4}
    old = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "old", lake=lake, group=group,
                           codec_known_versions="v1", **hold).start()
    try:
        v1, v2 = _fleets_at_once(kafka, topics, episodes=6)
        wait_for(lambda: count(lake, EPISODES) >= v1.episodes and count(lake, STEPS) >= v1.steps
                 and len(_reasons(kafka.bootstrap, topics["deadletter"])) >= v2.steps, timeout_s=240, processor=old)
        time.sleep(2)
        assert count(lake, EPISODES) == v1.episodes and count(lake, STEPS) == v1.steps
        assert _reasons(kafka.bootstrap, topics["deadletter"]) == ["unknown-schema"] * v2.steps
    finally:
        old.stop()

    # the processor is upgraded (knows v2), same group and lake; then the dead letters are replayed
    new = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "new", lake=lake, group=group,
                           **hold).start()
    try:
        from sop.commands.replay import replay_deadletters
        from sop.settings import load_settings

        monkeypatch.setenv("SOP_KAFKA_BOOTSTRAP", kafka.bootstrap)
        monkeypatch.setenv("SOP_TOPIC_PREFIX", topics["Step"].removesuffix("steps"))
        first = replay_deadletters(load_settings(), reasons=["unknown-schema"], timeout_s=120)
        assert first["republished"] == v2.steps
        episodes, steps = v1.episodes + v2.episodes, v1.steps + v2.steps
        wait_for(lambda: count(lake, EPISODES) >= episodes and count(lake, STEPS) >= steps, timeout_s=240,
                 processor=new)
        second = replay_deadletters(load_settings(), reasons=["unknown-schema"], timeout_s=120)
        assert second["republished"] == 0
        time.sleep(3)  # nothing more may arrive
        assert count(lake, EPISODES) == episodes
        assert count(lake, STEPS) == steps
        assert count(lake, DUPLICATE_STEPS) == 0 and count(lake, DUPLICATE_EPISODES) == 0
        # the replayed steps were not refused a second time (late, duplicate, ...)
        assert _reasons(kafka.bootstrap, topics["deadletter"]) == ["unknown-schema"] * v2.steps
    finally:
        new.stop()
