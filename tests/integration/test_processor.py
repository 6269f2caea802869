"""The stream processor against the real broker and real Delta tables: exactly once, replay, dead letters."""

from __future__ import annotations

import random
import threading
import time

import pytest
from confluent_kafka import Consumer, Producer

from consumers.deadletter import HEADER_OFFSET, HEADER_REASON, HEADER_TOPIC, parse_headers
from lakehouse import Lakehouse, query
from producers.loadgen import LoadGenConfig, iter_fleet, run_loadgen
from producers.publisher import EventPublisher, PublisherConfig
from tests.integration.processing import ProcessorProcess, count, wait_for

EPISODES = "SELECT count(*) FROM episodes"
STEPS = "SELECT count(*) FROM steps"
DUPLICATE_STEPS = "SELECT count(*) FROM (SELECT episode_id, step_index FROM steps GROUP BY 1, 2 HAVING count(*) > 1)"
INTERVENTIONS = "SELECT count(*) FROM interventions WHERE kind = 'STARTED'"
DUPLICATE_EPISODES = "SELECT count(*) FROM (SELECT episode_id FROM episodes GROUP BY 1 HAVING count(*) > 1)"


def _publish(kafka, topics, cfg: LoadGenConfig):
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        report = run_loadgen(cfg, pub)
        assert pub.flush(30) == 0 and pub.stats.failed == 0
    return report


def test_n_episodes_become_exactly_n_rows(kafka, topics, tmp_path) -> None:
    report = _publish(kafka, topics, LoadGenConfig(robots=4, hz=0, duration_s=None, episodes=24, seed=11,
                                                   min_steps=10, max_steps=60, intervention_rate=0.5))
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake).start()
    try:
        wait_for(lambda: count(lake, EPISODES) >= report.episodes and count(lake, STEPS) >= report.steps,
                 timeout_s=180, processor=proc)
        time.sleep(2)  # nothing more may arrive
        assert count(lake, EPISODES) == report.episodes == 24
        assert count(lake, STEPS) == report.steps
        assert count(lake, DUPLICATE_STEPS) == 0
        lh = Lakehouse(str(lake))
        assert count(lake, "SELECT count(*) FROM interventions WHERE kind = 'STARTED'") == report.interventions
        by_outcome = dict(query(lh, "SELECT outcome, count(*) FROM episodes GROUP BY 1").to_pylist()
                          and [(r["outcome"], r["count_star()"]) for r in
                               query(lh, "SELECT outcome, count(*) FROM episodes GROUP BY 1").to_pylist()])
        assert by_outcome == dict(report.outcomes)
        # every step row of an episode carries the episode's outcome and the RECAP columns
        bad = query(lh, "SELECT count(*) FROM steps s JOIN episodes e USING (episode_id) "
                        "WHERE s.outcome <> e.outcome OR s.episode_length <> e.num_steps OR s.advantage IS NULL "
                        "OR s.mc_return > 0 OR s.mc_return < -1").column(0)[0].as_py()
        assert bad == 0
    finally:
        proc.stop()


@pytest.mark.parametrize(("chunk_steps", "chunk_age_s"), [(5, 0.5), (256, 5.0)])
def test_sigkill_mid_stream_still_exactly_once(kafka, topics, tmp_path, chunk_steps, chunk_age_s) -> None:
    # small chunks: most held steps are in recovered changelog chunks at each kill; large: most are re-read
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake,
                            group=f"sigkill-group-{chunk_steps}", processor_chunk_steps=chunk_steps,
                            processor_chunk_age_s=chunk_age_s).start()
    cfg = LoadGenConfig(robots=6, hz=40, duration_s=25, seed=5, min_steps=20, max_steps=80, intervention_rate=0.4)
    result = {}
    publisher = threading.Thread(target=lambda: result.update(report=_publish(kafka, topics, cfg)))
    publisher.start()
    rng = random.Random(3)
    try:
        for _ in range(3):  # kill it three times while data flows
            time.sleep(rng.uniform(4, 7))
            proc.kill()
            time.sleep(rng.uniform(0.2, 1.5))
            proc.start()
        publisher.join()
        report = result["report"]
        # interventions are written on their own (not with their episode): wait for them too
        wait_for(lambda: count(lake, EPISODES) >= report.episodes and count(lake, STEPS) >= report.steps
                 and count(lake, INTERVENTIONS) >= report.interventions, timeout_s=240, processor=proc)
        time.sleep(3)
        assert count(lake, EPISODES) == report.episodes
        assert count(lake, STEPS) == report.steps
        assert count(lake, DUPLICATE_STEPS) == 0
        assert count(lake, DUPLICATE_EPISODES) == 0
        assert count(lake, "SELECT count(*) FROM interventions WHERE kind = 'STARTED'") == report.interventions
    finally:
        proc.stop()


def test_replay_of_the_whole_topic_gives_the_same_rows(kafka, topics, tmp_path, monkeypatch) -> None:
    report = _publish(kafka, topics, LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=12, seed=21,
                                                   min_steps=5, max_steps=40, intervention_rate=0.5))
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake).start()
    try:
        wait_for(lambda: count(lake, EPISODES) >= report.episodes, timeout_s=180, processor=proc)
    finally:
        proc.stop()

    from sop.commands.replay import replay_into
    from sop.settings import load_settings

    for key, value in proc.env.items():
        if key.startswith("SOP_"):
            monkeypatch.setenv(key, value)
    rebuilt = tmp_path / "rebuilt"
    out = replay_into(load_settings(), into=str(rebuilt), timeout_s=300)
    assert out["messages"] > report.steps
    cols = "episode_id, step_index, controller, reward, mc_return, outcome, episode_length, kafka_offset"
    live = query(Lakehouse(str(lake)), f"SELECT {cols} FROM steps ORDER BY 1, 2").to_pylist()
    again = query(Lakehouse(str(rebuilt)), f"SELECT {cols} FROM steps ORDER BY 1, 2").to_pylist()
    assert len(again) == report.steps and again == live
    ecols = "episode_id, outcome, num_steps, num_interventions, human_steps, mc_return"
    assert query(Lakehouse(str(rebuilt)), f"SELECT {ecols} FROM episodes ORDER BY 1").to_pylist() == \
        query(Lakehouse(str(lake)), f"SELECT {ecols} FROM episodes ORDER BY 1").to_pylist()
    _replay_with_a_new_value_model_and_c_fail(lake, tmp_path, proc.env)


C_FAIL = 60.0  # the live tables used the default, max_episode_steps = 150


def _replay_with_a_new_value_model_and_c_fail(lake, tmp_path, env: dict[str, str]) -> None:  # noqa: ANN001
    """A team trained a better value model (v1; v2 is newer and the champion) and changes C_fail: the rebuilt tables
    differ from the live ones (advantages from the running baseline, C_fail 150) exactly in the cells whose reward
    or values changed, and everywhere else they are the same, cell for cell."""
    import numpy as np
    import torch
    from click.testing import CliRunner

    from infra.mlflow_local import ensure_experiment
    from learner import registry
    from learner.config import EncoderConfig, ValueConfig
    from learner.synthetic import HashEmbedder
    from learner.value import ValueModel, ValueRuntime
    from producers.loadgen import INSTRUCTIONS
    from sop.cli import cli

    uri = env["SOP_MLFLOW_TRACKING_URI"]
    ensure_experiment(uri, tmp_path / "mlartifacts")
    texts = sorted(INSTRUCTIONS.values())
    table = dict(zip(texts, HashEmbedder().embed(texts), strict=True))
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(ValueModel(ValueConfig(encoder=EncoderConfig(image_size=32, cnn_channels=(8, 16)),
                                             hidden=(16,))).eval())
        registry.register_value(models[-1], tracking_uri=uri, embeddings=table, experiment="sop")
    value = ValueRuntime(models[0], HashEmbedder(), version="1")

    rebuilt = tmp_path / "rebuilt-v1"
    result = CliRunner().invoke(cli, ["replay", "kafka", "--into", str(rebuilt), "--c-fail", str(C_FAIL),
                                      "--value-version", "1", "--timeout", "300"], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "values from value_model:sop-value/1" in result.output

    def rows(root, table_name: str, order: str) -> list[dict]:  # noqa: ANN001
        out = query(Lakehouse(str(root)), f"SELECT * FROM {table_name} ORDER BY {order}").to_pylist()
        for r in out:
            r.pop("ingest_time")  # when the row was written: the one column a rebuild cannot keep
        return out

    live, new = rows(lake, "steps", "episode_id, step_index"), rows(rebuilt, "steps", "episode_id, step_index")
    assert [(r["episode_id"], r["step_index"]) for r in new] == [(r["episode_id"], r["step_index"]) for r in live]
    # What the new reward and the new values predict for the RECAP columns, from their definitions.
    predicted: list[dict] = []
    by_episode: dict[str, list[dict]] = {}
    for r in new:
        by_episode.setdefault(r["episode_id"], []).append(r)
    for steps in by_episode.values():
        n, outcome = len(steps), steps[0]["outcome"]
        reward = np.full(n, -1.0)
        reward[-1] = 0.0 if outcome == "SUCCESS" else -C_FAIL  # loadgen's episodes end SUCCESS or TIMEOUT
        scale = 150 + C_FAIL
        r = reward / scale
        v = value.values_for_rows(steps).astype(np.float64)
        for t in range(n):
            horizon = r[t:t + 50].sum() + (v[t + 50] if t + 50 < n else 0.0)
            predicted.append({"reward": reward[t], "mc_return": r[t:].sum(), "value": v[t],
                              "advantage": horizon - v[t], "advantage_source": "value_model:sop-value/1"})
    recap_cols = ("reward", "mc_return", "value", "advantage")
    changed, expected_changed = set(), set()
    for i, (old, got, want) in enumerate(zip(live, new, predicted, strict=True)):
        for col in old:
            if col in recap_cols:
                assert got[col] == pytest.approx(want[col], abs=1e-5), (col, got["episode_id"], got["step_index"])
                if not np.isclose(want[col], old[col], atol=1e-9):
                    expected_changed.add((i, col))
            elif col == "advantage_source":
                assert old[col] == "running_baseline" and got[col] == want[col]
                expected_changed.add((i, col))
            if col in recap_cols and not np.isclose(got[col], old[col], atol=1e-9) or \
                    col not in recap_cols and got[col] != old[col]:
                changed.add((i, col))
    assert changed == expected_changed  # nothing else moved: not an action, image, outcome, offset or version
    rewards_changed = {(new[i]["episode_id"], new[i]["step_index"]) for i, col in changed if col == "reward"}
    assert rewards_changed == {(eid, len(s) - 1) for eid, s in by_episode.items() if s[0]["outcome"] != "SUCCESS"}
    assert rewards_changed and sum(col == "value" for _, col in changed) == len(new)  # every value is the model's

    live_eps, new_eps = rows(lake, "episodes", "episode_id"), rows(rebuilt, "episodes", "episode_id")
    assert len(new_eps) == len(live_eps) == len(by_episode)
    for old, got in zip(live_eps, new_eps, strict=True):
        differs = {col for col in old if got[col] != old[col]}
        timeout = old["outcome"] != "SUCCESS"
        assert differs == ({"mc_return", "advantage_source"} if timeout else {"advantage_source"}), differs
        assert got["mc_return"] == pytest.approx(-(old["num_steps"] - 1) - (C_FAIL if timeout else 0.0))


def test_poisoned_message_is_dead_lettered_and_the_partition_keeps_moving(kafka, topics, tmp_path) -> None:
    records = list(iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=3, min_steps=6,
                                            max_steps=6, seed=2)))
    raw = Producer({"bootstrap.servers": kafka.bootstrap})
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        for i, (name, rec) in enumerate(records):
            pub.publish(name, rec, key=rec["episode_id"])
            if i == 5:  # poison the same partition as the first episode, mid-episode
                pub.flush()
                raw.produce(topics["Step"], b"\x00\x01 definitely not avro", rec["episode_id"].encode())
                raw.flush(10)
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake).start()
    try:
        wait_for(lambda: count(lake, EPISODES) >= 3, timeout_s=180, processor=proc)
        assert count(lake, STEPS) == 18
    finally:
        proc.stop()
    dlq = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "dlq", "auto.offset.reset": "earliest"})
    dlq.subscribe([topics["deadletter"]])
    letter = None
    for _ in range(60):
        m = dlq.poll(0.5)
        if m is not None and not m.error():
            letter = m
            break
    dlq.close()
    assert letter is not None and letter.value() == b"\x00\x01 definitely not avro"
    headers = parse_headers(letter.headers())
    assert headers[HEADER_TOPIC] == topics["Step"] and headers[HEADER_OFFSET].isdigit()
    assert headers[HEADER_REASON] == "corrupt"


def test_episode_without_end_is_stored_as_aborted(kafka, topics, tmp_path) -> None:
    records = list(iter_fleet(LoadGenConfig(robots=1, hz=0, duration_s=None, episodes=1, min_steps=8,
                                            max_steps=8, seed=4)))
    assert records[-1][0] == "EpisodeEvent"
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        for name, rec in records[:-1]:  # the robot dies before its ENDED event
            pub.publish(name, rec, key=rec["episode_id"])
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake,
                            processor_abort_timeout_s=4).start()
    try:
        wait_for(lambda: count(lake, EPISODES) >= 1, timeout_s=120, processor=proc)
    finally:
        proc.stop()
    row = query(Lakehouse(str(lake)), "SELECT outcome, closed_by, num_steps FROM episodes").to_pylist()
    assert row == [{"outcome": "ABORTED", "closed_by": "aborted", "num_steps": 8}]
    assert count(lake, "SELECT count(*) FROM steps WHERE outcome = 'ABORTED'") == 8


def test_two_workers_in_one_group_split_the_partitions_exactly_once(kafka, tmp_path) -> None:
    from tests.conftest import make_topics

    topics = make_topics(kafka.bootstrap, partitions=4)
    lake = tmp_path / "lake"
    group = "two-workers"
    first = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "w1", lake=lake,
                             group=group).start()
    second = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "w2", lake=lake,
                              group=group).start()
    try:
        time.sleep(8)  # both join; publishing during the rebalance is part of the test
        report = _publish(kafka, topics, LoadGenConfig(robots=8, hz=60, duration_s=12, seed=8, min_steps=20,
                                                       max_steps=60, intervention_rate=0.3))
        wait_for(lambda: count(lake, EPISODES) >= report.episodes and count(lake, STEPS) >= report.steps,
                 timeout_s=240, processor=first)
        time.sleep(2)
        assert count(lake, EPISODES) == report.episodes
        assert count(lake, STEPS) == report.steps
        assert count(lake, DUPLICATE_STEPS) == 0
        import json

        worked = [json.loads(f.read_text())["steps_in"] for w in ("w1", "w2")
                  for f in (tmp_path / w / "processor").glob("metrics-*.json")]
        assert len(worked) == 2 and all(n > 0 for n in worked), worked
    finally:
        first.stop()
        second.stop()


def _letters(kafka, topic: str, *, expect: int, timeout_s: float = 60) -> list:
    dlq = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": f"dlq-{time.time()}",
                    "auto.offset.reset": "earliest"})
    dlq.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < expect and time.monotonic() < deadline:
        m = dlq.poll(0.5)
        if m is not None and not m.error():
            out.append(parse_headers(m.headers()))
    dlq.close()
    return out


def test_one_poison_episode_among_fifty_in_one_partition(kafka, tmp_path) -> None:
    # every step of one episode carries NaN proprio: its steps are dead-lettered (invalid-value), its end closes
    # it with what arrived (nothing), and the 50 healthy episodes of the same partition are all stored
    import math

    from tests.conftest import make_topics

    topics = make_topics(kafka.bootstrap, partitions=1)
    records = list(iter_fleet(LoadGenConfig(robots=3, hz=0, duration_s=None, episodes=51, min_steps=5,
                                            max_steps=12, seed=9)))
    poison = records[0][1]["episode_id"]
    with EventPublisher(PublisherConfig(bootstrap=kafka.bootstrap, topics=topics)) as pub:
        for name, rec in records:
            if name == "Step" and rec["episode_id"] == poison:
                rec = {**rec, "proprio": [math.nan, *rec["proprio"][1:]]}  # encodes; decoding refuses it
            pub.publish(name, rec, key=rec["episode_id"])
    poisoned_steps = sum(1 for n, r in records if n == "Step" and r["episode_id"] == poison)
    healthy_steps = sum(1 for n, r in records if n == "Step" and r["episode_id"] != poison)
    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake,
                            processor_end_grace_s=3).start()
    try:
        wait_for(lambda: count(lake, EPISODES) >= 51, timeout_s=180, processor=proc)
        assert count(lake, STEPS) == healthy_steps
        assert count(lake, f"SELECT count(*) FROM episodes WHERE episode_id <> '{poison}' AND closed_by = 'end_event'") == 50
        assert count(lake, f"SELECT missing_steps FROM episodes WHERE episode_id = '{poison}'") == poisoned_steps
    finally:
        proc.stop()
    letters = _letters(kafka, topics["deadletter"], expect=poisoned_steps)
    assert len(letters) == poisoned_steps and {h[HEADER_REASON] for h in letters} == {"invalid-value"}


def test_a_killed_worker_s_partitions_are_taken_over_exactly_once(kafka, tmp_path) -> None:
    # two workers in one group; one is SIGKILLed mid-stream and never comes back: the other is assigned its
    # partitions (revoke -> re-assign), rebuilds their state from the changelog and stores everything once
    from tests.conftest import make_topics

    topics = make_topics(kafka.bootstrap, partitions=4)
    lake = tmp_path / "lake"
    group = "takeover"
    survivor = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "w1", lake=lake,
                                group=group, processor_chunk_steps=8, processor_chunk_age_s=0.5).start()
    victim = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path / "w2", lake=lake,
                              group=group, processor_chunk_steps=8, processor_chunk_age_s=0.5).start()
    cfg = LoadGenConfig(robots=8, hz=40, duration_s=20, seed=12, min_steps=20, max_steps=60, intervention_rate=0.4)
    result = {}
    publisher = threading.Thread(target=lambda: result.update(report=_publish(kafka, topics, cfg)))
    try:
        time.sleep(8)  # both joined
        publisher.start()
        time.sleep(9)
        victim.kill()
        publisher.join()
        report = result["report"]
        wait_for(lambda: count(lake, EPISODES) >= report.episodes and count(lake, STEPS) >= report.steps
                 and count(lake, INTERVENTIONS) >= report.interventions, timeout_s=240, processor=survivor)
        time.sleep(3)
        assert count(lake, EPISODES) == report.episodes
        assert count(lake, STEPS) == report.steps
        assert count(lake, DUPLICATE_STEPS) == 0 and count(lake, DUPLICATE_EPISODES) == 0
        assert count(lake, INTERVENTIONS) == report.interventions
    finally:
        survivor.stop()
        victim.stop()
