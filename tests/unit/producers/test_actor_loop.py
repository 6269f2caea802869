"""The actor loop: records of an episode, interventions, stopping, policy switching between episodes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from producer_fakes import ConstantPolicy, LineRobot, ScriptedOperator, check_episode_records

from producers.actor import Actor, ActorConfig, ListSink, RatePacer, StaticPolicySource, run_episode
from producers.images import decode_image
from producers.interfaces import Observation, OperatorDecision, Policy, Robot
from sim.expert import ExpertPolicy, expert_action
from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
from sim.operator import GatedExpertOperator, OperatorConfig

pytestmark = pytest.mark.filterwarnings("ignore:Constant")

TOWARD = (0.5, 0.0, 0.0, 0.0)  # LineRobot reaches its target in 20 steps of this


def test_policy_alone_success_episode_records() -> None:
    sink, robot = ListSink(), LineRobot(max_steps=50)
    stats = run_episode(robot, ConstantPolicy(TOWARD, "v7"), None, sink, actor_id="r1", episode_id="ep-1", seed=42)
    check_episode_records(sink.records)
    steps = sink.of("Step")
    started, ended = sink.of("EpisodeEvent")
    assert stats.outcome == ended["outcome"] == "SUCCESS" and stats.num_steps == len(steps) == 20
    assert started["seed"] == 42 and started["policy_version"] == "v7" and robot.resets == [42]
    assert all(s["controller"] == "POLICY" and s["policy_version"] == "v7" for s in steps)
    assert all(s["action"] == s["policy_action"] == pytest.approx(list(TOWARD)) for s in steps)
    assert [s["success"] for s in steps] == [False] * 19 + [True]
    assert all(s["images"][0]["encoding"] == "jpeg" for s in steps)
    assert decode_image(steps[0]["images"][0]["data"]).shape == (8, 8, 3)
    assert stats.interventions == stats.human_steps == 0 and not sink.of("InterventionEvent")


def test_timeout_episode() -> None:
    sink = ListSink()
    stats = run_episode(LineRobot(max_steps=5), ConstantPolicy(), None, sink, actor_id="r1", episode_id="e", seed=0)
    check_episode_records(sink.records)
    assert stats.outcome == "TIMEOUT" and stats.num_steps == 5


def test_human_steps_are_marked_and_execute_the_operator_action() -> None:
    sink = ListSink()
    operator = ScriptedOperator(drives=[range(2, 5), range(8, 100)])
    policy = ConstantPolicy((0.1, 0.0, 0.0, -1.0), "v2")
    stats = run_episode(LineRobot(max_steps=12), policy, operator, sink, actor_id="r1", episode_id="e", seed=1)
    check_episode_records(sink.records)
    steps = sink.of("Step")
    human = [s["step_index"] for s in steps if s["controller"] == "HUMAN"]
    assert human == [2, 3, 4, 8, 9, 10, 11]
    for step, decision in zip(steps, operator.decisions, strict=True):
        assert step["policy_action"] == pytest.approx(policy.action.tolist())  # the proposal, always
        expected = decision.action if decision.in_control else policy.action
        assert step["action"] == pytest.approx(expected.tolist())
        assert step["policy_version"] == "v2"
    events = [(e["kind"], e["step_index"], e["reason"]) for e in sink.of("InterventionEvent")]
    assert events == [
        ("STARTED", 2, "scripted-takeover"),
        ("ENDED", 5, "scripted-handback"),
        ("STARTED", 8, "scripted-takeover"),
        ("ENDED", 12, "episode-end"),
    ]
    assert all(e["operator_id"] == "scripted-human" for e in sink.of("InterventionEvent"))
    assert stats.interventions == 2 and stats.human_steps == 7


class RecordingOperator:
    """Wraps an operator and keeps its decisions, to compare with what the loop executed."""

    def __init__(self, inner: GatedExpertOperator) -> None:
        self.inner = inner
        self.operator_id = inner.operator_id
        self.decisions: list[OperatorDecision] = []

    def reset(self, robot: Robot) -> None:
        self.inner.reset(robot)

    def decide(self, observation: Observation, proposed_action: np.ndarray) -> OperatorDecision:
        decision = self.inner.decide(observation, proposed_action)
        self.decisions.append(decision)
        return decision


def test_metaworld_episode_with_the_gated_expert_operator() -> None:
    config = MetaWorldRobotConfig(task="pick-place-v3", image_size=(24, 32))
    operator = RecordingOperator(GatedExpertOperator(OperatorConfig(reaction_delay=1)))
    sink = ListSink()
    with MetaWorldRobot(config) as robot:
        stats = run_episode(
            robot, ExpertPolicy(noise_sigma=1.0, seed=3), operator, sink, actor_id="sim-0", episode_id="mw-1", seed=10_003
        )
    check_episode_records(sink.records)
    steps = sink.of("Step")
    assert stats.interventions >= 1, "a policy this noisy must be taken over"
    assert len(steps) == len(operator.decisions)
    for step, decision in zip(steps, operator.decisions, strict=True):
        assert step["controller"] == ("HUMAN" if decision.in_control else "POLICY")
        if decision.in_control:
            assert step["action"] == pytest.approx(decision.action.tolist())
            state = np.asarray(step["proprio"], dtype=np.float32)
            assert step["action"] == pytest.approx(expert_action("pick-place-v3", state).tolist(), abs=1e-5)
        assert step["policy_version"] == "expert"
        assert len(step["proprio"]) == 39
        assert decode_image(step["images"][0]["data"]).shape == (24, 32, 3)
    starts = [e["step_index"] for e in sink.of("InterventionEvent") if e["kind"] == "STARTED"]
    assert all(steps[i]["controller"] == "HUMAN" for i in starts)
    assert all(steps[i - 1]["controller"] == "POLICY" for i in starts if i > 0)


class StoppingPolicy(ConstantPolicy):
    def __init__(self, stop: threading.Event, after: int) -> None:
        super().__init__(TOWARD)
        self.stop, self.after = stop, after

    def act(self, observation: Observation) -> np.ndarray:
        if self.calls + 1 >= self.after:
            self.stop.set()
        return super().act(observation)


def test_stop_mid_episode_aborts_and_closes_the_open_intervention() -> None:
    stop, sink = threading.Event(), ListSink()
    operator = ScriptedOperator(drives=[range(1, 100)])
    stats = run_episode(
        LineRobot(max_steps=50), StoppingPolicy(stop, after=4), operator, sink,
        actor_id="r", episode_id="e", seed=0, stop=stop,
    )
    check_episode_records(sink.records)
    assert stats.outcome == "ABORTED" and stats.num_steps == 4
    assert sink.of("InterventionEvent")[-1]["reason"] == "episode-end"


class BrokenRobot(LineRobot):
    def act(self, action: np.ndarray):  # type: ignore[no-untyped-def]
        if self.steps == 3:
            raise RuntimeError("arm fault")
        return super().act(action)


def test_a_failing_robot_still_closes_the_episode() -> None:
    sink = ListSink()
    with pytest.raises(RuntimeError, match="arm fault"):
        run_episode(
            BrokenRobot(), ConstantPolicy(TOWARD), ScriptedOperator([range(0, 100)]), sink,
            actor_id="r", episode_id="e", seed=0,
        )
    check_episode_records(sink.records)
    assert sink.of("EpisodeEvent")[-1]["outcome"] == "ABORTED"
    assert sink.of("EpisodeEvent")[-1]["num_steps"] == 3


class SwitchingSource:
    """Answers version vN; any policy it hands out asks it to move to v(N+1) on its 2nd act():
    a source that changes its answer in the middle of every episode."""

    def __init__(self) -> None:
        self.n = 1
        self.handed: list[str] = []

    def current(self) -> Policy:
        source, version = self, f"v{self.n}"
        self.handed.append(version)

        class Bumping(ConstantPolicy):
            def act(self, observation: Observation) -> np.ndarray:
                if self.calls == 1:
                    source.n += 1
                return super().act(observation)

        return Bumping(TOWARD, version)


def test_actor_switches_policy_only_between_episodes() -> None:
    source, sink = SwitchingSource(), ListSink()
    robots = [LineRobot("reach-v3"), LineRobot("drawer-open-v3")]
    actor = Actor(robots, source, None, sink, ActorConfig(actor_id="a1", max_episodes=4, seed_start=500, seed_stride=3))
    history = actor.run()
    assert [s.policy_version for s in history] == ["v1", "v2", "v3", "v4"] == source.handed
    by_episode: dict[str, set[str]] = {}
    for step in sink.of("Step"):
        by_episode.setdefault(step["episode_id"], set()).add(step["policy_version"])
    assert [by_episode[s.episode_id] for s in history] == [{"v1"}, {"v2"}, {"v3"}, {"v4"}]
    assert [s.task for s in history] == ["reach-v3", "drawer-open-v3"] * 2
    assert robots[0].resets == [500, 506] and robots[1].resets == [503, 509]
    assert len({s.episode_id for s in history}) == 4
    for episode_id in by_episode:
        check_episode_records([r for r in sink.records if r[2] == episode_id])


def test_actor_stops_on_the_event_and_can_run_in_a_thread() -> None:
    sink = ListSink()
    actor = Actor([LineRobot()], StaticPolicySource(ConstantPolicy(TOWARD)), None, sink, ActorConfig(actor_id="a"))
    actor.on_episode = lambda stats: actor.stop() if len(actor.history) == 2 else None
    thread = actor.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(actor.history) == 2 and all(s.outcome == "SUCCESS" for s in actor.history)


def test_actor_config_is_validated() -> None:
    with pytest.raises(ValueError, match="actor_id"):
        ActorConfig(actor_id="")
    with pytest.raises(ValueError, match="control_hz"):
        ActorConfig(actor_id="a", control_hz=-1)
    with pytest.raises(ValueError, match="robot"):
        Actor([], StaticPolicySource(ConstantPolicy()), None, ListSink(), ActorConfig(actor_id="a"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_pacer_sleeps_to_the_period_and_does_not_burst_after_a_stall() -> None:
    clock = FakeClock()
    pacer = RatePacer(10.0, clock=clock, sleep=clock.sleep)
    pacer.wait()  # first tick: no wait
    clock.now += 0.03  # 30 ms of work
    pacer.wait()
    assert clock.slept == [pytest.approx(0.07)]
    clock.now += 1.0  # a long stall: many periods missed
    pacer.wait()
    clock.now += 0.01
    pacer.wait()
    assert clock.slept[1:] == [pytest.approx(0.09)]  # restarted from the late tick, no catch-up burst
    with pytest.raises(ValueError):
        RatePacer(0)
