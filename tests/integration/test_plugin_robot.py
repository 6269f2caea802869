"""Bring your own robot: `sop actor` runs a robot, a teleoperation device and a policy defined outside SOP (a
file in a temporary directory on PYTHONPATH), end to end through the real broker and processor into Delta."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lakehouse import Lakehouse, query
from producers.fleet import ActorStatus
from producers.policies import register_policy_config
from tests.integration.processing import ProcessorProcess, count, wait_for
from tests.integration.test_actor_commands import sop, stack_env

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]

PLUGIN = Path(__file__).parent / "plugin_robot" / "toy_arm.py"
CONTRACTS = {"toy-reach": {"action_dim": 2, "proprio_dim": 4, "cameras": {"overhead": [24, 24]}}}


def test_a_robot_from_outside_sop_streams_episodes_into_delta(kafka, topics, mlflow_uri, tmp_path,  # noqa: ANN001
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    plugins = tmp_path / "lab_code"
    plugins.mkdir()
    shutil.copy(PLUGIN, plugins / "toy_arm.py")
    monkeypatch.syspath_prepend(str(plugins))
    version = register_policy_config("toy-mirror", {"gain": 1.0}, mlflow_uri)
    env = {**stack_env(kafka, topics, mlflow_uri, tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")]))}
    status_file, log, marker = tmp_path / "actor.json", tmp_path / "actor.log", tmp_path / "closed"
    actor = sop("actor", "--robot", "toy_arm:ToyArm",
                "--robot-config", json.dumps({"image_size": 24, "max_steps": 40, "closed_marker": str(marker)}),
                "--operator", "toy_arm:Teleop", "--operator-config", '{"operator_id": "joystick-7"}',
                "--architecture", "toy-mirror=toy_arm:MirroredPolicy",
                "--episodes", "3", "--hz", "0", "--actor-id", "lab-arm", "--status-file", str(status_file),
                env=env, log=log)
    assert actor.wait(180) == 0, log.read_text()[-3000:]
    final = ActorStatus.read(status_file)
    assert final is not None and final.episodes == 3 and final.failed == 0 and final.versions == {version: final.steps}
    assert marker.read_text() == "closed"  # the robot's close() ran at exit

    lake = tmp_path / "lake"
    proc = ProcessorProcess(bootstrap=kafka.bootstrap, topics=topics, run_dir=tmp_path, lake=lake,
                            processor_task_contracts=json.dumps(CONTRACTS)).start()
    try:
        wait_for(lambda: count(lake, "SELECT count(*) FROM episodes") >= 3
                 and count(lake, "SELECT count(*) FROM steps") >= final.steps, timeout_s=180, processor=proc)
    finally:
        proc.stop()
    lh = Lakehouse(str(lake))
    episodes = query(lh, "SELECT * FROM episodes ORDER BY start_time").to_pylist()
    assert [e["actor_id"] for e in episodes] == ["lab-arm"] * 3 and {e["task"] for e in episodes} == {"toy-reach"}
    assert sum(e["num_steps"] for e in episodes) == final.steps
    steps = query(lh, "SELECT proprio, action, policy_action, controller, images, policy_version FROM steps").to_pylist()
    assert len(steps) == final.steps
    assert all(len(s["proprio"]) == 4 and len(s["action"]) == 2 and s["policy_version"] == int(version) for s in steps)
    assert {(i["camera"], i["width"], i["height"]) for s in steps for i in s["images"]} == {("overhead", 24, 24)}
    human = [s for s in steps if s["controller"] == "HUMAN"]
    assert human and len(human) == sum(e["human_steps"] for e in episodes)
    assert all(s["action"] != s["policy_action"] for s in human)  # the device drove, the proposal is kept
    takeovers = query(lh, "SELECT operator_id, reason FROM interventions WHERE kind = 'STARTED'").to_pylist()
    assert len(takeovers) == sum(e["num_interventions"] for e in episodes) > 0
    assert {(t["operator_id"], t["reason"]) for t in takeovers} == {("joystick-7", "divergence")}
    assert count(lake, "SELECT count(*) FROM steps WHERE policy_action IS NULL") == 0


def test_a_robot_that_is_not_one_is_refused_naming_what_it_lacks(kafka, topics, mlflow_uri, tmp_path) -> None:  # noqa: ANN001
    plugins = tmp_path / "lab_code"
    plugins.mkdir()
    (plugins / "half_arm.py").write_text("class HalfArm:\n    task = 'x'\n    action_dim = 2\n"
                                         "    def reset(self, *, seed=None, instruction=None): ...\n")
    env = {**stack_env(kafka, topics, mlflow_uri, tmp_path), "PYTHONPATH": str(plugins)}
    log = tmp_path / "actor.log"
    actor = sop("actor", "--robot", "half_arm:HalfArm", "--episodes", "1", "--no-status", env=env, log=log)
    assert actor.wait(120) != 0
    text = " ".join(log.read_text().split())
    assert "half_arm:HalfArm built a HalfArm, which is not a Robot: it lacks act, observe" in text, text[-2000:]
