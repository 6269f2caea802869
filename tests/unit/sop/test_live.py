from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from sop.live import LiveFeed, LiveState, episode_stats, render

T0 = 1_800_000_000.0


def episodes(rows: list[tuple[str, str, float, int, str, str]]) -> pa.Table:
    """(task, outcome, end seconds after T0, interventions, version, actor) per episode."""
    return pa.table({
        "task": [r[0] for r in rows], "outcome": [r[1] for r in rows],
        "end_time": pa.array([datetime.fromtimestamp(T0 + r[2], UTC) for r in rows], pa.timestamp("us", tz="UTC")),
        "num_interventions": pa.array([r[3] for r in rows], pa.int32()),
        # the version as tables written before it became a number held it (text): episode_stats reads both
        "policy_version": pa.array([r[4] for r in rows], pa.string()), "actor_id": [r[5] for r in rows],
    })


def test_episode_stats_per_task_version_actor_and_rate() -> None:
    table = episodes([
        ("reach", "FAILURE", 10, 1, "1", "a0"),
        ("reach", "SUCCESS", 700, 0, "2", "a1"),
        ("reach", "SUCCESS", 710, 0, "2", "a0"),
        ("push", "TIMEOUT", 650, 2, "1", "a1"),
        ("push", "SUCCESS", 30, 0, "1", "a0"),
    ])
    stats = episode_stats(table, now_s=T0 + 720, elapsed_s=720, window=2)
    by_task = {r["task"]: r for r in stats["per_task"]}
    assert [r["task"] for r in stats["per_task"]] == ["push", "reach"]
    assert by_task["reach"]["episodes"] == 3
    assert by_task["reach"]["success_all"] == pytest.approx(2 / 3)
    assert by_task["reach"]["success_recent"] == 1.0  # the last 2 by end time
    assert by_task["push"]["success_recent"] == 0.5
    assert by_task["push"]["takeover_rate"] == 0.5
    assert [r["policy_version"] for r in stats["per_version"]] == ["2", "1"]  # newest episode first
    assert stats["per_version"][1] == {"policy_version": "1", "episodes": 3, "success": pytest.approx(1 / 3),
                                       "autonomous": pytest.approx(1 / 3), "takeover_rate": pytest.approx(2 / 3)}
    assert stats["actors"] == [{"actor_id": "a0", "version": "2", "episodes": 3},
                               {"actor_id": "a1", "version": "2", "episodes": 2}]
    assert stats["episodes"] == 5
    assert stats["intervention_rate"] == pytest.approx(2 / 5)
    assert stats["episodes_per_hour"] == pytest.approx(3 * 3600 / 600)  # 3 ended in the last 10 minutes


def test_autonomous_success_leaves_out_the_rescues_and_aborted_episodes() -> None:
    table = episodes([
        ("reach", "SUCCESS", 10, 2, "3", "a0"),  # rescued by the operator
        ("reach", "SUCCESS", 20, 0, "3", "a0"),
        ("reach", "SUCCESS", 30, 0, "4", "a1"),
        ("reach", "FAILURE", 40, 0, "4", "a1"),
        ("reach", "ABORTED", 50, 0, "4", "a1"),  # the robot was stopped: says nothing about the policy
    ]).append_column("human_steps", pa.array([30, 0, 12, 0, 0], pa.int32()))  # human steps, no takeover event
    stats = episode_stats(table, now_s=T0 + 60, elapsed_s=60, window=3)
    (reach,) = stats["per_task"]
    assert reach["success_all"] == 0.75 and reach["autonomous_all"] == 0.25 and reach["takeover_rate"] == 0.5
    assert reach["autonomous_recent"] == 0.0 and reach["success_recent"] == 0.5  # last 3: two counted
    by_version = {r["policy_version"]: r for r in stats["per_version"]}
    assert by_version["3"]["autonomous"] == 0.5 and by_version["3"]["success"] == 1.0
    assert by_version["4"]["autonomous"] == 0.0 and by_version["4"]["takeover_rate"] == 0.5
    assert stats["autonomous_rate"] == 0.25


def test_render_shows_the_gate_and_held_out() -> None:
    from rich.console import Console

    state = LiveState(per_task=[{"task": "reach", "episodes": 4, "success_recent": 1.0, "success_all": 1.0,
                                 "autonomous_recent": 0.5, "autonomous_all": 0.5, "takeover_rate": 0.5,
                                 "takeover_recent": 0.5}],
                      per_version=[{"policy_version": "7", "episodes": 4, "success": 1.0, "autonomous": 0.0,
                                    "takeover_rate": 1.0}],
                      learner={"gate": {"pending": "9", "champion": "5", "candidate_episodes": 3, "min_episodes": 20,
                                        "recent": [{"version": "7", "decision": "reject"},
                                                   {"version": "5", "decision": "promote"}]}},
                      held_out={"version": "5", "mean": 0.62, "t_min": 4.0, "per_task": {"reach": 0.62}})
    console = Console(width=200, record=True)
    console.print(render(state))
    text = console.export_text()
    assert "candidate v9 3/20 episodes" in text and "v7 rejected · v5 promoted" in text
    assert "rejected" in text.split("per policy version")[1]  # v7's role in the version table
    assert "held-out (operator off) v5 0.62" in text


def test_episode_stats_no_rate_in_the_first_half_minute() -> None:
    stats = episode_stats(episodes([("reach", "SUCCESS", 5, 0, "1", "a0")]), now_s=T0 + 20, elapsed_s=20)
    assert stats["episodes_per_hour"] is None
    assert episode_stats(episodes([]), now_s=T0, elapsed_s=100)["per_task"] == []


def test_live_feed_never_makes_the_caller_wait_on_a_stuck_read() -> None:
    release = threading.Event()
    calls = []

    def read() -> LiveState:
        calls.append(1)
        if len(calls) == 1:
            return LiveState(episodes=7)
        release.wait()  # a read stuck in native code
        return LiveState(episodes=8)

    feed = LiveFeed(read, every_s=0.01).start()
    try:
        deadline = time.time() + 5
        while len(calls) < 2 and time.time() < deadline:
            time.sleep(0.01)
        start = time.perf_counter()
        state = feed.latest(elapsed_s=12.0)
        assert time.perf_counter() - start < 0.5
        assert state.episodes == 7 and state.elapsed_s == 12.0
        feed._read_at -= 60  # as if the stuck read had lasted a minute
        assert any("60 s old" in note for note in feed.latest(elapsed_s=0).notes)
    finally:
        release.set()
        feed.close()


def test_live_feed_shows_a_failed_read_and_keeps_reading() -> None:
    healthy = threading.Event()

    def read() -> LiveState:
        if not healthy.is_set():
            raise RuntimeError("table is being created")
        return LiveState(episodes=3)

    def wait_for(predicate) -> LiveState:  # noqa: ANN001
        deadline = time.time() + 5
        while not predicate(state := feed.latest(elapsed_s=0)) and time.time() < deadline:
            time.sleep(0.01)
        return state

    feed = LiveFeed(read, every_s=0.01).start()
    try:
        failing = wait_for(lambda st: st.notes)
        assert failing.notes == ["last read failed: RuntimeError: table is being created"]
        healthy.set()
        recovered = wait_for(lambda st: st.episodes == 3)
        assert recovered.episodes == 3 and recovered.notes == []
    finally:
        feed.close()


def test_live_feed_before_the_first_read_and_render() -> None:
    feed = LiveFeed(lambda: LiveState(), every_s=1.0)  # not started
    state = feed.latest(elapsed_s=3.0)
    assert state.episodes == 0 and state.elapsed_s == 3.0
    render(state)  # an empty state draws
