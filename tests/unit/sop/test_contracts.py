"""The processor's contracts for the simulated fleet match what a MetaWorld robot publishes; settings parse at start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from consumers.deadletter import Reason, Rejected
from consumers.validation import Contracts, SkewWindow, UnknownTasks, validate_step
from producers.actor import now_us, step_record
from producers.interfaces import StepResult
from schemas import codec
from sim.tasks import TASKS
from sop.contracts import SIM_ACTION_DIM, SIM_PROPRIO_DIM, processor_validation, sim_contracts
from sop.settings import SettingsError, load_settings


def test_the_sim_shapes_are_the_robots() -> None:
    from sim.expert import STATE_DIM
    from sim.metaworld_robot import ACTION_DIM

    assert (SIM_ACTION_DIM, SIM_PROPRIO_DIM) == (ACTION_DIM, STATE_DIM)


def test_sim_contracts_cover_the_task_table_with_width_and_height() -> None:
    contracts = sim_contracts((48, 40), ("corner", "topview"))  # (height, width), as MetaWorldRobotConfig takes it
    assert set(contracts) == set(TASKS)
    assert dict(contracts["reach-v3"].cameras) == {"corner": (40, 48), "topview": (40, 48)}
    assert set(sim_contracts(64, ("corner",), tasks=["reach-v3"])) == {"reach-v3"}
    with pytest.raises(ValueError, match="unknown tasks"):
        sim_contracts(64, ("corner",), tasks=["reach-v2"])


def test_a_rendered_metaworld_step_passes_its_contract_after_the_codec() -> None:
    from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

    config = MetaWorldRobotConfig(task="drawer-open-v3", cameras=("corner", "topview"), image_size=(48, 40))
    with MetaWorldRobot(config) as robot:
        observation = robot.reset(seed=1)
        action = np.zeros(SIM_ACTION_DIM, dtype=np.float32)
        result: StepResult = robot.act(action)
    record = step_record(episode_id="a-1-ep-0", actor_id="a-1", step_index=0, observation=observation, action=action,
                         policy_action=action, human=False, policy_version="1", result=result, event_time_us=now_us())
    _, decoded = codec.decode(codec.encode("Step", record))
    key, now = b"a-1-ep-0", now_us()
    validate_step(decoded, key=key, contracts=Contracts(tasks=sim_contracts((48, 40), ("corner", "topview"))),
                  now_us=now, skew=SkewWindow())
    # The same step against the default actor image size (64x64, corner only) is refused.
    contracts, skew = processor_validation(load_settings())
    with pytest.raises(Rejected) as info:
        validate_step(decoded, key=key, contracts=contracts, now_us=now, skew=skew)
    assert info.value.reason is Reason.INVALID_VALUE


def test_settings_build_the_processors_contracts_and_window(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    contracts, skew = processor_validation(load_settings())
    assert set(contracts.tasks) == set(TASKS) and contracts.unknown_tasks is UnknownTasks.ACCEPT
    assert dict(contracts.tasks["pick-place-v3"].cameras) == {"corner": (64, 64)}
    assert skew == SkewWindow(future_us=60_000_000, past_us=7 * 86_400_000_000)
    assert (contracts.max_steps, contracts.full_image_decode) == (10_000, False)

    path = tmp_path / "contracts.json"
    path.write_text(json.dumps({"arm-v1": {"action_dim": 7, "proprio_dim": 14, "cameras": {"wrist": [96, 72]}}}))
    monkeypatch.setenv("SOP_PROCESSOR_TASK_CONTRACTS", str(path))
    monkeypatch.setenv("SOP_PROCESSOR_UNKNOWN_TASKS", "reject")
    monkeypatch.setenv("SOP_PROCESSOR_CLOCK_SKEW_PAST_S", "0")
    monkeypatch.setenv("SOP_PROCESSOR_FULL_IMAGE_DECODE", "true")
    contracts, skew = processor_validation(load_settings())
    assert list(contracts.tasks) == ["arm-v1"] and contracts.tasks["arm-v1"].cameras["wrist"] == (96, 72)
    assert contracts.unknown_tasks is UnknownTasks.REJECT and contracts.full_image_decode
    assert skew.past_us is None


@pytest.mark.parametrize(("name", "value"), [
    ("SOP_PROCESSOR_TASK_CONTRACTS", "{broken"),
    ("SOP_PROCESSOR_TASK_CONTRACTS", '{"t": {"action_dim": 4}}'),
    ("SOP_PROCESSOR_TASK_CONTRACTS", "/no/such/file.json"),
    ("SOP_PROCESSOR_UNKNOWN_TASKS", "maybe"),
    ("SOP_PROCESSOR_MAX_STEPS", "0"),
    ("SOP_PROCESSOR_CLOCK_SKEW_FUTURE_S", "-1"),
])
def test_a_bad_validation_setting_fails_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                     value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()
