"""Robots and operators from outside SOP: found by module:attr or entry point, built from JSON settings, checked."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producers.plugins import (
    OPERATOR_GROUP,
    ROBOT_GROUP,
    PluginError,
    load_operator,
    load_robot,
    parse_settings,
)

ARM = '''
import numpy as np
from producers.interfaces import Observation, StepResult

class Arm:
    action_dim = 3
    def __init__(self, *, task="lab-pick", port="/dev/null"):
        self.task, self.port = task, port
    def reset(self, *, seed=None, instruction=None):
        return self.observe()
    def observe(self):
        return Observation(images={}, proprio=np.zeros(3, np.float32), instruction="pick", task=self.task)
    def act(self, action):
        return StepResult(observation=self.observe(), success=True, timeout=False)

def make_arm(**settings):
    return Arm(**settings)

class Pedal:
    def __init__(self, *, operator_id="pedal"):
        self.operator_id = operator_id
    def reset(self, robot): ...
    def decide(self, observation, proposed_action): ...

class NoAct:
    task, action_dim = "x", 1
    def reset(self, *, seed=None, instruction=None): ...
    observe = "not callable"
'''


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "lab_arm.py").write_text(ARM)
    dist = tmp_path / "lab_arm-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-arm\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ROBOT_GROUP}]\nlab = lab_arm:make_arm\nbroken = lab_arm:Missing\n"
                                           f"[{OPERATOR_GROUP}]\npedal = lab_arm:Pedal\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("lab_arm", None)


def test_a_class_by_module_path_gets_its_settings(lab: Path) -> None:
    robot = load_robot("lab_arm:Arm", {"port": "/dev/ttyUSB0", "task": "lab-place"})
    assert (robot.task, robot.port, robot.action_dim) == ("lab-place", "/dev/ttyUSB0", 3)


def test_entry_points_name_robots_and_operators(lab: Path) -> None:
    assert load_robot("lab").task == "lab-pick"
    assert load_operator("pedal", {"operator_id": "foot-1"}).operator_id == "foot-1"
    with pytest.raises(PluginError, match="installed: broken, lab"):
        load_robot("nope")
    with pytest.raises(PluginError, match="failed to load"):
        load_robot("broken")


def test_what_is_wrong_is_named(lab: Path) -> None:
    with pytest.raises(PluginError, match="cannot import 'no_such_module'"):
        load_robot("no_such_module:Arm")
    with pytest.raises(PluginError, match="has no 'Nope'"):
        load_robot("lab_arm:Nope")
    with pytest.raises(PluginError, match=r"lacks act, observe\(\)"):
        load_robot("lab_arm:NoAct")
    with pytest.raises(PluginError, match="not a Robot: it lacks act, observe, task, action_dim"):
        load_robot("lab_arm:Pedal")
    with pytest.raises(PluginError, match="unexpected keyword argument 'speed'"):
        load_robot("lab_arm:Arm", {"speed": 3})
    with pytest.raises(PluginError, match="not an Operator: it lacks decide, operator_id"):
        load_operator("lab_arm:Arm")


def test_settings_are_json_text_or_a_file(tmp_path: Path) -> None:
    assert parse_settings(None) == {} and parse_settings('{"a": 1}') == {"a": 1}
    (tmp_path / "s.json").write_text('{"port": "/dev/ttyACM0"}')
    assert parse_settings(f"@{tmp_path / 's.json'}") == {"port": "/dev/ttyACM0"}
    with pytest.raises(PluginError, match="--robot-config: JSON text is not valid JSON"):
        parse_settings("{port: 1}")
    with pytest.raises(PluginError, match="must be a JSON object"):
        parse_settings("[1, 2]", option="--robot-config")
    with pytest.raises(PluginError, match="cannot read"):
        parse_settings(f"@{tmp_path / 'missing.json'}")
