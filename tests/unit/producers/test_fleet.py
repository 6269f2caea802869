"""Fleet pieces: seed/task plans, the actor monitor and its status files, and process supervision."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from producer_fakes import ConstantPolicy, LineRobot, ScriptedOperator

from producers.actor import Actor, ActorConfig, ListSink, StaticPolicySource
from producers.fleet import ActorMonitor, ActorStatus, ProcessFleet, aggregate, log_tail, plan_fleet
from sim.tasks import ONLINE_SEEDS


def test_plan_gives_distinct_ids_interleaved_seeds_and_rotated_tasks() -> None:
    tasks = ("a-v3", "b-v3", "c-v3")
    plan = plan_fleet(4, tasks, seeds=ONLINE_SEEDS, id_prefix="r")
    assert [m.actor_id for m in plan] == ["r-00", "r-01", "r-02", "r-03"]
    assert [m.tasks[0] for m in plan] == ["a-v3", "b-v3", "c-v3", "a-v3"]
    assert all(sorted(m.tasks) == sorted(tasks) for m in plan)
    seeds = [ActorConfig(actor_id=m.actor_id, seed_start=m.seed_start, seed_stride=m.seed_stride) for m in plan]
    used = [cfg.seed_start + k * cfg.seed_stride for cfg in seeds for k in range(500)]
    assert len(set(used)) == len(used) and min(used) == ONLINE_SEEDS.start  # no placement twice in the fleet
    with pytest.raises(ValueError, match="at least 1 actor"):
        plan_fleet(0, tasks, seeds=ONLINE_SEEDS)
    with pytest.raises(ValueError, match="fleet's seeds 10000"):
        plan_fleet(2, tasks, seeds=ONLINE_SEEDS, seed_start=5)


def test_monitor_counts_what_the_actor_did() -> None:
    monitor = ActorMonitor("r1")
    sink = ListSink()
    policy = ConstantPolicy((0.5, 0.0, 0.0, 0.0), "v3")  # LineRobot succeeds after 20 such steps
    actor = Actor([LineRobot(max_steps=50), LineRobot(max_steps=5)], StaticPolicySource(policy),
                  ScriptedOperator(drives=[range(1, 3)]), monitor.sink(sink),
                  ActorConfig(actor_id="r1", max_episodes=4), on_episode=monitor.on_episode)
    history = actor.run()
    status = monitor.status(delivered=7)
    assert status.steps == len(sink.of("Step")) == sum(h.num_steps for h in history)
    assert status.human_steps == sum(h.human_steps for h in history) == 8
    assert status.episodes == 4 and status.successes == sum(h.outcome == "SUCCESS" for h in history) == 2
    assert status.success_rate == 0.5 and status.intervention_rate == 1.0
    assert status.version == "v3" and status.versions == {"v3": status.steps}
    first_step = min(s["event_time_us"] for s in sink.of("Step")) / 1e6
    assert status.first_step_of == {"v3": pytest.approx(first_step)}
    assert status.delivered == 7


def test_aborted_episodes_are_left_out_of_the_rates() -> None:
    st = ActorStatus(actor_id="a", episodes=3, successes=1, aborted=1, episodes_with_takeover=1)
    assert st.success_rate == 0.5 and st.intervention_rate == 0.5
    assert ActorStatus(actor_id="b").success_rate is None


def test_status_file_round_trip_and_aggregate(tmp_path: Path) -> None:
    a = ActorStatus(actor_id="a", steps=10, episodes=2, successes=2, version="3", steps_per_s=50.0,
                    delivered=12, switches=[{"version": "3", "previous": None}])
    b = ActorStatus(actor_id="b", steps=5, episodes=1, successes=0, version="2", steps_per_s=40.0,
                    delivered=6, failed=1)
    a.write(tmp_path / "a.json")
    assert ActorStatus.read(tmp_path / "a.json") == a
    assert ActorStatus.read(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert ActorStatus.read(tmp_path / "bad.json") is None
    assert ActorStatus.from_json('{"actor_id": "c", "a_field_from_a_newer_actor": 1}').actor_id == "c"
    totals = aggregate([a, b])
    assert (totals.steps, totals.episodes, totals.successes, totals.delivered, totals.failed) == (15, 3, 2, 18, 1)
    assert totals.steps_per_s == 90.0 and totals.versions == {"3": 1, "2": 1}
    assert totals.success_rate == pytest.approx(2 / 3)


SLEEPER = "import time; print('up', flush=True); time.sleep(60)"
STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
            "time.sleep(60)")
GRACEFUL = ("import signal, sys, time\n"
            "def bye(*_): print('bye', flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, bye); print('up', flush=True); time.sleep(60)")


def _wait_for(path: Path, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{path} never said {text!r}"
        time.sleep(0.02)


def test_process_fleet_stops_with_sigterm_then_sigkill(tmp_path: Path) -> None:
    fleet = ProcessFleet()
    graceful = fleet.start("graceful", [sys.executable, "-c", GRACEFUL], log_path=tmp_path / "g.log")
    stubborn = fleet.start("stubborn", [sys.executable, "-c", STUBBORN], log_path=tmp_path / "s.log")
    done = fleet.start("done", [sys.executable, "-c", "print('done')"], log_path=tmp_path / "d.log")
    for m in (graceful, stubborn):
        _wait_for(m.log_path, "up")
    done.process.wait(timeout=30)  # it must have ended on its own before the stop (a loaded machine starts slowly)
    assert fleet.wait(timeout_s=0.1) is False
    fleet.stop(grace_s=1.0)
    assert fleet.poll() == []
    assert (graceful.returncode, graceful.killed) == (0, False) and "bye" in log_tail(graceful.log_path)
    assert stubborn.killed and stubborn.returncode == -9
    assert done.returncode == 0 and not done.killed


def test_process_fleet_children_do_not_get_the_terminals_ctrl_c(tmp_path: Path) -> None:
    fleet = ProcessFleet()
    child = fleet.start("child", [sys.executable, "-c", SLEEPER], log_path=tmp_path / "c.log")
    _wait_for(child.log_path, "up")
    assert os.getsid(child.process.pid) == child.process.pid  # its own session: SIGINT to our group misses it
    fleet.stop(grace_s=5.0)
    assert child.returncode == -15 and not child.killed
