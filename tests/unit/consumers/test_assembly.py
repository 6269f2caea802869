"""Episode assembly and the RECAP columns at close, against hand-computed episodes."""

import numpy as np
import pytest

from consumers import assembly
from consumers.assembly import RewardConfig, RunningBaseline


def _step(i: int, *, controller: str = "POLICY", eid: str = "e1") -> dict:
    return {"episode_id": eid, "actor_id": "a", "task": "t", "instruction": "do it", "step_index": i,
            "event_time_us": 1_000_000 + i, "policy_version": "3", "images": [], "proprio": [0.0],
            "action": [0.0], "policy_action": [0.0], "controller": controller, "env_reward": None, "success": False}


def _meta(n: int, outcome: str, *, interventions=()) -> dict:
    meta = assembly.new_meta("e1", 0, 0.0)
    for i in range(n):
        assembly.on_step(meta, _step(i), offset=100 + i)
    for kind, idx in interventions:
        assembly.on_intervention(meta, {"episode_id": "e1", "actor_id": "a", "task": "t", "kind": kind,
                                        "step_index": idx})
    assembly.on_episode_event(meta, {"episode_id": "e1", "kind": "ENDED", "actor_id": "a", "task": "t",
                                     "instruction": "do it", "policy_version": "3", "event_time_us": 2_000_000,
                                     "outcome": outcome, "num_steps": n}, topic="eps", partition=0, offset=7)
    return meta


def _present(n: int, last_seen_s: float = 0.0) -> assembly.Presence:
    return assembly.Presence(indices=set(range(n)), last_seen_s=last_seen_s)


def _close(meta, n, cfg, **kw):
    steps = [(_step(i, controller="HUMAN" if i == 1 else "POLICY"), "steps", 0, 100 + i) for i in reversed(range(n))]
    return assembly.close_episode(meta, steps, config=cfg, baseline=RunningBaseline(max_episode_length=10), **kw)


def test_success_rewards_returns_and_baseline_advantages() -> None:
    cfg = RewardConfig(max_episode_length=10, c_fail=10, advantage_horizon=2)
    closed = _close(_meta(4, "SUCCESS", interventions=[("STARTED", 1), ("ENDED", 2)]), 4, cfg)
    rows = closed.steps
    assert [r["step_index"] for r in rows] == [0, 1, 2, 3]  # ordered by step index whatever the arrival order
    assert [r["reward"] for r in rows] == [-1, -1, -1, 0]
    scale = 10 + 10
    assert np.allclose([r["mc_return"] for r in rows], np.array([-3, -2, -1, 0]) / scale)
    # no value model, fresh baseline = 0: A_t = r_t + r_{t+1} (+ V=0), normalised
    assert np.allclose([r["advantage"] for r in rows], np.array([-2, -2, -1, 0]) / scale)
    assert {r["advantage_source"] for r in rows} == {"running_baseline"}
    ep = closed.episode
    assert ep["outcome"] == "SUCCESS" and ep["num_steps"] == 4 and ep["mc_return"] == -3
    assert ep["num_interventions"] == 1 and ep["human_steps"] == 1
    assert (ep["kafka_topic"], ep["kafka_partition"], ep["kafka_offset"]) == ("eps", 0, 7)
    assert rows[0]["kafka_offset"] == 100


@pytest.mark.parametrize("outcome", ["FAILURE", "TIMEOUT"])
def test_failure_and_timeout_end_with_the_failure_penalty(outcome: str) -> None:
    cfg = RewardConfig(max_episode_length=10, c_fail=5, advantage_horizon=50)
    rows = _close(_meta(3, outcome), 3, cfg).steps
    assert [r["reward"] for r in rows] == [-1, -1, -5]
    assert np.allclose([r["mc_return"] for r in rows], np.array([-7, -6, -5]) / 15)


def test_aborted_episode_is_truncated_not_failed() -> None:
    cfg = RewardConfig(max_episode_length=10, c_fail=5, advantage_horizon=50)
    meta = assembly.new_meta("e1", 0, 0.0)
    for i in range(3):
        assert assembly.on_step(meta, _step(i), offset=i) == (i == 0)  # written once, not per step
    present = _present(3)
    assert assembly.should_abort(meta, present, now_s=100.0, timeout_s=60)
    assert not assembly.should_abort(meta, present, now_s=30.0, timeout_s=60)
    assembly.abort(meta, present, topic="ctl", partition=0, offset=9, now_us=5)
    assert meta["ended"]["num_steps"] == 3
    closed = _close(meta, 3, cfg)
    assert [r["reward"] for r in closed.steps] == [-1, -1, -1]
    assert closed.episode["closed_by"] == "aborted" and closed.episode["outcome"] == "ABORTED"


def test_value_model_values_are_used_for_the_n_step_advantage() -> None:
    cfg = RewardConfig(max_episode_length=10, c_fail=10, advantage_horizon=1)
    values = np.array([-0.2, -0.15, -0.1, -0.05])
    closed = _close(_meta(4, "SUCCESS"), 4, cfg, value_fn=lambda task, recs: values, value_source="value_model:v7")
    adv = [r["advantage"] for r in closed.steps]
    r = np.array([-1, -1, -1, 0]) / 20
    expected = r + np.append(values[1:], 0.0) - values  # terminal: V after the last step is 0
    assert np.allclose(adv, expected, atol=1e-6)
    assert closed.steps[0]["value"] == pytest.approx(-0.2)
    assert closed.episode["advantage_source"] == "value_model:v7"


def test_replayed_steps_and_duplicate_ends_change_nothing() -> None:
    meta = _meta(3, "SUCCESS")
    assert not assembly.on_step(meta, _step(1), offset=101)  # replay of a stored step: nothing to write
    assert assembly.is_complete(meta, _present(3))
    first_end = dict(meta["ended"])
    assembly.on_episode_event(meta, {"episode_id": "e1", "kind": "ENDED", "actor_id": "a", "task": "t",
                                     "instruction": "x", "policy_version": "9", "event_time_us": 9,
                                     "outcome": "TIMEOUT", "num_steps": 3}, topic="eps", partition=0, offset=99)
    assert meta["ended"] == first_end


def test_incomplete_episode_is_force_closed_after_grace() -> None:
    meta = _meta(3, "SUCCESS")
    meta["ended"]["num_steps"] = 5  # two steps never arrived
    present = _present(3, last_seen_s=1.0)
    assert not assembly.is_complete(meta, present)
    assert not assembly.should_force_close(meta, present, now_s=5.0, grace_s=10)
    assert assembly.should_force_close(meta, present, now_s=20.0, grace_s=10)


def test_running_baseline_learns_per_task_returns() -> None:
    b = RunningBaseline(buckets=2, max_episode_length=4)
    b.update("t", np.array([-0.4, -0.3, -0.2, -0.1]))
    b.update("t", np.array([-0.2, -0.1, -0.1, 0.0]))
    assert np.allclose(b.values("t", 4), [-0.25, -0.25, -0.1, -0.1])
    assert np.allclose(b.values("other", 3), 0.0)


def test_step_chunks_round_trip_in_arrival_order() -> None:
    entries = [(3, 1_000_000_000_123, b"\x00" * 5), (0, 7, b"step zero"), (1, 8, b"")]
    blob = assembly.pack_steps(entries)
    assert assembly.unpack_steps(blob) == entries
    assert assembly.unpack_steps(b"") == []
    assert assembly.chunk_key("ep-1", 2) == b"ep-1#c2"


def test_truncated_step_chunk_is_an_error_not_fewer_steps() -> None:
    blob = assembly.pack_steps([(0, 1, b"abcdef"), (1, 2, b"ghij")])
    with pytest.raises(ValueError, match="truncated"):
        assembly.unpack_steps(blob[:-1])
    with pytest.raises(ValueError, match="truncated"):
        assembly.unpack_steps(blob[:20])
