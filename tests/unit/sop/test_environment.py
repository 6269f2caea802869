"""A mistyped ``SOP_…`` variable stops a command at start, naming the closest known one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sop.environment import DIRECT, check_environment, known_variables, unknown_variables
from sop.settings import SettingsError

ROOT = Path(__file__).resolve().parents[3]


def test_a_typo_is_an_error_that_names_the_closest_setting() -> None:
    with pytest.raises(SettingsError, match=r"SOP_ACTOR_TASK: no such setting \(did you mean SOP_ACTOR_TASKS\?\)"):
        check_environment({"SOP_ACTOR_TASK": "reach-v3", "SOP_RUN_DIR": "/tmp/x", "HOME": "/root"})


def test_every_problem_is_listed_and_a_far_name_gets_no_guess() -> None:
    found = unknown_variables({"SOP_LAKE_URL": "/lake", "SOP_ZZZ": "1", "SOP_KAFKA_BOOTSTRAP": "h:9092"})
    assert found == {"SOP_LAKE_URL": "SOP_LAKE_URI", "SOP_ZZZ": None}


def test_known_names_cover_the_settings_classes_and_the_direct_readers() -> None:
    check_environment({"SOP_RUN_DIR": "x", "SOP_ACTOR_CAMERAS": "corner", "SOP_LEARN_ALGORITHM": "recap",
                       **{name: "1" for name in DIRECT}})


def test_every_sop_variable_named_in_the_code_is_known() -> None:
    # A new os.environ["SOP_X"] reader must be added to DIRECT, or a user setting it would be refused.
    known = known_variables()
    named: set[str] = set()
    for folder in ("schemas", "producers", "sim", "consumers", "lakehouse", "learner", "rewards", "infra", "sop",
                   "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in (Path(__file__).name, "environment.py"):  # their typos are on purpose
                continue
            named |= set(re.findall(r"\bSOP_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    named |= set(re.findall(r"\bSOP_[A-Z0-9_]*[A-Z0-9]\b", (ROOT / "infra" / "setup.sh").read_text()))
    assert sorted(named - known) == []


def test_sop_refuses_to_start_with_a_typo() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOP_")}
    env["SOP_MAX_EPISODE_STEP"] = "60"
    result = subprocess.run([sys.executable, "-m", "sop", "status"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "SOP_MAX_EPISODE_STEP: no such setting (did you mean SOP_MAX_EPISODE_STEPS?)" in result.stderr
