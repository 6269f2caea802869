"""The loop's own rules: how many actors are canaries, when a target success stops a run, held-out checkpoints."""

from __future__ import annotations

import pytest

from sop.checkpoints import checkpoint_from_eval
from sop.loop import LoopConfig, canary_count, target_reached


@pytest.mark.parametrize(("actors", "share", "promotion", "expected"), [
    (4, 0.25, "gated", 1), (8, 0.25, "gated", 2), (2, 0.25, "gated", 1),  # at least one
    (2, 0.9, "gated", 1), (10, 0.5, "gated", 5),  # never all: someone plays the champion
    (4, 0.25, "auto", 0),
])
def test_canary_count(actors: int, share: float, promotion: str, expected: int) -> None:
    assert canary_count(actors, share, promotion) == expected


def test_gated_promotion_needs_a_champion_actor_and_the_learner() -> None:
    with pytest.raises(ValueError, match="at least 2 actors"):
        LoopConfig(actors=1, promotion="gated")
    with pytest.raises(ValueError, match="needs the learner"):
        LoopConfig(actors=2, promotion="gated", learn_online=False)
    with pytest.raises(ValueError, match="canary share"):
        LoopConfig(canary_share=0.0)


def row(task: str, episodes: int, autonomous: float, raw: float = 1.0) -> dict:
    return {"task": task, "episodes": episodes, "autonomous_recent": autonomous, "success_recent": raw}


def test_target_success_is_autonomous_not_raw() -> None:
    rescued = [row("a", 30, 0.5, raw=1.0), row("b", 30, 0.95)]  # the operator's rescues make task a look perfect
    assert target_reached(rescued, None, target=0.9, window=20, measuring_held_out=False) is None
    alone = [row("a", 30, 0.92), row("b", 30, 0.95)]
    assert "autonomous" in target_reached(alone, None, target=0.9, window=20, measuring_held_out=False)
    assert target_reached([row("a", 10, 1.0)], None, target=0.9, window=20, measuring_held_out=False) is None


def test_target_success_is_held_out_when_checkpoints_are_measured() -> None:
    alone = [row("a", 30, 0.99), row("b", 30, 0.99)]
    assert target_reached(alone, None, target=0.9, window=20, measuring_held_out=True) is None  # none measured yet
    cp = checkpoint_from_eval({"version": 12, "episodes_per_task": 10, "canonical": {"a": 0.9, "b": 0.8}},
                              started_s=1_000.0 + 300, run_started_s=1_000.0)
    assert cp == {"t_min": 5.0, "version": "12", "episodes_per_task": 10, "per_task": {"a": 0.9, "b": 0.8},
                  "mean": pytest.approx(0.85)}
    assert target_reached(alone, cp, target=0.9, window=20, measuring_held_out=True) is None
    assert "held-out" in target_reached(alone, cp, target=0.8, window=20, measuring_held_out=True)
