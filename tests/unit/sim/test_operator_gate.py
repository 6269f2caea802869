"""The takeover / hand-back rule, driven with constructed sequences (no simulator)."""

from __future__ import annotations

import numpy as np
import pytest

from producers.interfaces import Observation
from sim.operator import (
    DIVERGENCE,
    MAX_DRIVE,
    ON_TRACK,
    STALLED,
    GatedExpertOperator,
    InterventionGate,
    OperatorConfig,
    action_divergence,
)

FAR, NEAR = 1.0, 0.1  # divergences above / below the default threshold 0.5


def no_stall(**overrides: object) -> OperatorConfig:
    return OperatorConfig(stall_steps=None, **overrides)  # type: ignore[arg-type]


def run(gate: InterventionGate, divergences: list[float]) -> list[bool]:
    return [gate.update(d).in_control for d in divergences]


def first_human_step(controls: list[bool]) -> int | None:
    return controls.index(True) if True in controls else None


@pytest.mark.parametrize(("k", "delay"), [(1, 0), (3, 0), (3, 2), (5, 4)])
def test_takes_over_after_k_divergent_steps_plus_reaction_delay(k: int, delay: int) -> None:
    gate = InterventionGate(no_stall(takeover_after=k, reaction_delay=delay))
    controls = run(gate, [FAR] * 20)
    assert first_human_step(controls) == k - 1 + delay


def test_k_minus_one_divergent_steps_then_on_track_never_take_over() -> None:
    gate = InterventionGate(no_stall(takeover_after=3, reaction_delay=0))
    controls = run(gate, [FAR, FAR, NEAR] * 10)
    assert not any(controls)


def test_takeover_step_reports_change_and_reason() -> None:
    gate = InterventionGate(no_stall(takeover_after=2, reaction_delay=1))
    steps = [gate.update(FAR) for _ in range(3)]
    assert [s.changed for s in steps] == [False, False, True]
    assert steps[2].in_control and steps[2].reason == DIVERGENCE


def test_a_decided_takeover_happens_even_if_the_policy_recovers_during_the_reaction_delay() -> None:
    gate = InterventionGate(no_stall(takeover_after=2, reaction_delay=3))
    controls = run(gate, [FAR, FAR, NEAR, NEAR, NEAR])
    assert controls == [False, False, False, False, True]


def test_hands_back_after_m_on_track_steps() -> None:
    gate = InterventionGate(no_stall(takeover_after=1, reaction_delay=0, handback_after=4, max_drive_steps=100))
    assert gate.update(FAR).changed  # takeover at step 0
    steps = [gate.update(NEAR) for _ in range(6)]
    assert [s.in_control for s in steps] == [True, True, True, False, False, False]
    assert steps[3].changed and steps[3].reason == ON_TRACK


def test_an_off_track_proposal_restarts_the_on_track_count() -> None:
    gate = InterventionGate(no_stall(takeover_after=1, reaction_delay=0, handback_after=3, max_drive_steps=100))
    gate.update(FAR)
    controls = run(gate, [NEAR, NEAR, FAR, NEAR, NEAR, NEAR])
    assert controls == [True, True, True, True, True, False]


def test_hands_back_after_max_drive_steps() -> None:
    gate = InterventionGate(no_stall(takeover_after=1, reaction_delay=0, handback_after=5, max_drive_steps=10))
    controls = run(gate, [FAR] * 30)
    assert controls[:10] == [True] * 10
    assert controls[10] is False
    gate2 = InterventionGate(no_stall(takeover_after=1, reaction_delay=0, handback_after=5, max_drive_steps=10))
    reasons = [s.reason for s in (gate2.update(FAR) for _ in range(11)) if s.changed]
    assert reasons == [DIVERGENCE, MAX_DRIVE]


def test_after_hand_back_k_new_divergent_steps_are_needed() -> None:
    gate = InterventionGate(no_stall(takeover_after=3, reaction_delay=0, handback_after=1))
    controls = run(gate, [FAR, FAR, FAR, NEAR, FAR, FAR, FAR])
    assert controls == [False, False, True, False, False, False, True]


def test_stall_fires_when_neither_progress_nor_motion_for_s_steps() -> None:
    gate = InterventionGate(OperatorConfig(stall_steps=5, reaction_delay=0, stall_min_progress=0.01, stall_min_motion=0.02))
    here = np.zeros(3)
    steps = [gate.update(NEAR, progress=0.5, position=here) for _ in range(8)]
    assert [s.in_control for s in steps] == [False] * 5 + [True] * 3
    assert steps[5].changed and steps[5].reason == STALLED


def test_progress_or_motion_prevents_the_stall() -> None:
    progressing = InterventionGate(OperatorConfig(stall_steps=5, reaction_delay=0))
    assert not any(progressing.update(NEAR, progress=1.0 - 0.02 * t, position=np.zeros(3)).in_control for t in range(40))
    # moving away from the goal (as the experts do at first) is not a stall either
    moving = InterventionGate(OperatorConfig(stall_steps=5, reaction_delay=0))
    assert not any(
        moving.update(NEAR, progress=0.5 + 0.01 * t, position=np.array([0.01 * t, 0, 0])).in_control for t in range(40)
    )


def test_stall_detection_respects_the_reaction_delay_and_can_be_disabled() -> None:
    delayed = InterventionGate(OperatorConfig(stall_steps=5, reaction_delay=2))
    controls = [delayed.update(NEAR, progress=0.5, position=np.zeros(3)).in_control for _ in range(10)]
    assert first_human_step(controls) == 7
    disabled = InterventionGate(OperatorConfig(stall_steps=None))
    assert not any(disabled.update(NEAR, progress=0.5, position=np.zeros(3)).in_control for _ in range(50))


def test_gripper_disagreement_alone_never_reaches_the_threshold() -> None:
    expert = np.array([0.3, -0.2, 0.1, 1.0])
    policy = np.array([0.3, -0.2, 0.1, -1.0])  # gripper fully opposite, arm identical
    config = OperatorConfig()
    assert action_divergence(policy, expert, config.gripper_weight) < config.divergence_threshold
    gate = InterventionGate(no_stall(takeover_after=1, reaction_delay=0))
    divergence = action_divergence(policy, expert, config.gripper_weight)
    assert not any(gate.update(divergence).in_control for _ in range(20))


def test_arm_divergence_counts_fully() -> None:
    expert = np.array([1.0, 0.0, 0.0, 1.0])
    policy = np.array([0.0, 0.0, 0.0, 1.0])
    assert action_divergence(policy, expert, 0.25) == pytest.approx(1.0)
    assert action_divergence(policy, expert, 0.25) > OperatorConfig().divergence_threshold


@pytest.mark.parametrize(
    "overrides",
    [
        {"gripper_weight": 0.5},  # equal to the threshold: the gripper alone could trigger
        {"takeover_after": 0},
        {"reaction_delay": -1},
        {"handback_after": 0},
        {"max_drive_steps": 0},
        {"stall_steps": 0},
        {"divergence_threshold": 0.0},
    ],
)
def test_config_rejects_bad_settings_with_the_field_name(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        OperatorConfig(**overrides)  # type: ignore[arg-type]


def _obs(proprio: np.ndarray) -> Observation:
    return Observation(images={}, proprio=proprio.astype(np.float32), instruction="", task="reach-v3")


def test_gated_operator_drives_with_the_expert_action_and_decides_with_the_gate() -> None:
    expert_out = np.array([0.0, 1.0, 0.0, -1.0], dtype=np.float32)
    operator = GatedExpertOperator(
        no_stall(takeover_after=2, reaction_delay=1, handback_after=2),
        expert=lambda task, state: expert_out,
        progress=lambda task, state: 0.0,
    )
    operator.reset(robot=None)  # type: ignore[arg-type]
    obs = _obs(np.zeros(39))
    bad, good = np.array([0, -1, 0, -1], np.float32), np.array([0, 0.9, 0, -1], np.float32)
    decisions = [operator.decide(obs, a) for a in (bad, bad, bad, good, good, good)]
    assert [d.in_control for d in decisions] == [False, False, True, True, False, False]
    assert all(d.action is None for d in decisions if not d.in_control)
    assert all(np.array_equal(d.action, expert_out) for d in decisions if d.in_control)
    assert [d.reason for d in decisions if d.changed] == [DIVERGENCE, ON_TRACK]


def test_reset_forgets_the_previous_episode() -> None:
    gate = InterventionGate(no_stall(takeover_after=3, reaction_delay=0))
    run(gate, [FAR, FAR])
    gate.reset()
    assert run(gate, [FAR, FAR]) == [False, False]
