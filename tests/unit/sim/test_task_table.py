"""The task table and the seed ranges (no simulator needed)."""

from __future__ import annotations

import pytest

from sim.tasks import (
    DEFAULT_SUITE,
    DEMO_SEEDS,
    EVAL_SEEDS,
    ONLINE_SEEDS,
    TASKS,
    instruction_for,
    seed_range_of,
    task_spec,
)


def test_table_has_at_least_six_tasks_with_distinct_instructions_and_three_paraphrases() -> None:
    assert len(TASKS) >= 6
    every = [text for spec in TASKS.values() for text in spec.instructions]
    assert len(every) == len(set(every)), "an instruction or paraphrase is shared between tasks"
    for spec in TASKS.values():
        assert len(spec.paraphrases) >= 3
        assert spec.instructions[0] == spec.instruction
        assert 0 < spec.expert_success <= 1


def test_default_suite_is_known_and_has_two_pick_and_place_style_tasks() -> None:
    assert set(DEFAULT_SUITE) <= set(TASKS)
    assert len(set(DEFAULT_SUITE) & {"pick-place-v3", "shelf-place-v3", "box-close-v3", "assembly-v3"}) >= 2


def test_seed_ranges_are_disjoint() -> None:
    ranges = [DEMO_SEEDS, ONLINE_SEEDS, EVAL_SEEDS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start
    assert seed_range_of(0) == "demo"
    assert seed_range_of(ONLINE_SEEDS.start) == "online"
    assert seed_range_of(EVAL_SEEDS.start + 5) == "eval"
    with pytest.raises(ValueError):
        seed_range_of(-1)


def test_lookups_name_what_is_known() -> None:
    with pytest.raises(ValueError, match="pick-place-v3"):
        task_spec("pick-place-v2")
    assert instruction_for("drawer-open-v3") == TASKS["drawer-open-v3"].instruction
    assert instruction_for("drawer-open-v3", 1) == TASKS["drawer-open-v3"].paraphrases[1]
    with pytest.raises(ValueError, match="paraphrases"):
        instruction_for("drawer-open-v3", 3)


def test_expert_classes_resolve() -> None:
    for spec in TASKS.values():
        assert callable(getattr(spec.expert_class(), "get_action", None))
