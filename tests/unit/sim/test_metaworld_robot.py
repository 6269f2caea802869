"""MetaWorldRobot: configuration, seeded placements, termination, rendering."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from producers.interfaces import Robot
from sim.expert import expert_action
from sim.metaworld_robot import (
    MetaWorldRobot,
    MetaWorldRobotConfig,
    make_env,
)
from sim.tasks import EVAL_SEEDS, TASKS


@pytest.fixture(scope="module")
def state_robot() -> Iterator[MetaWorldRobot]:
    with MetaWorldRobot(MetaWorldRobotConfig(task="pick-place-v3", render=False)) as robot:
        yield robot


@pytest.fixture(scope="module")
def camera_robot() -> Iterator[MetaWorldRobot]:
    config = MetaWorldRobotConfig(task="drawer-open-v3", cameras=("corner", "topview"), image_size=(48, 40))
    with MetaWorldRobot(config) as robot:
        yield robot


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"task": "pick-place-v2"}, "task"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (64, -1)}, "image_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": 501}, "max_steps"),
        ({"cameras": ("nosuchcam",)}, "cameras"),
        ({"cameras": "corner"}, "cameras"),
        ({"cameras": ()}, "render"),
        ({"control_hz": 0.0}, "control_hz"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MetaWorldRobotConfig(**overrides)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    config = MetaWorldRobotConfig()
    assert config.image_hw == (64, 64) and config.max_steps == 150 and config.render and config.control_hz is None
    assert MetaWorldRobotConfig(cameras=(), render=False).cameras == ()


def test_is_a_robot(state_robot: MetaWorldRobot) -> None:
    assert isinstance(state_robot, Robot)
    assert state_robot.action_dim == 4


def test_same_seed_same_placement_other_seed_other_placement(state_robot: MetaWorldRobot) -> None:
    a = state_robot.reset(seed=EVAL_SEEDS.start).proprio
    b = state_robot.reset(seed=EVAL_SEEDS.start + 1).proprio
    a_again = state_robot.reset(seed=EVAL_SEEDS.start).proprio
    assert a.dtype == np.float32 and a.shape == (39,)
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a[4:7], b[4:7]) and not np.allclose(a[36:39], b[36:39])  # object and goal move


def test_observation_carries_task_and_instruction(state_robot: MetaWorldRobot) -> None:
    obs = state_robot.reset(seed=3)
    assert obs.task == "pick-place-v3" and obs.instruction == TASKS["pick-place-v3"].instruction
    assert obs.images == {}
    assert state_robot.reset(seed=3, instruction="put the puck on the goal").instruction == "put the puck on the goal"
    assert state_robot.observe() is state_robot.observe()


def test_episode_times_out_at_max_steps_and_refuses_to_go_on() -> None:
    with MetaWorldRobot(MetaWorldRobotConfig(task="reach-v3", render=False, max_steps=7)) as robot:
        robot.reset(seed=0)
        results = [robot.act(np.zeros(4)) for _ in range(7)]
        assert [r.timeout for r in results] == [False] * 6 + [True]
        assert not any(r.success for r in results)
        with pytest.raises(RuntimeError, match="reset"):
            robot.act(np.zeros(4))


def test_episode_ends_at_first_success(state_robot: MetaWorldRobot) -> None:
    obs = state_robot.reset(seed=EVAL_SEEDS.start)
    for _ in range(150):
        result = state_robot.act(expert_action(obs.task, obs.proprio))
        if result.success or result.timeout:
            break
        obs = result.observation
    assert result.success and not result.timeout
    assert state_robot.steps < 150
    with pytest.raises(RuntimeError):
        state_robot.act(np.zeros(4))


def test_actions_are_clipped(state_robot: MetaWorldRobot) -> None:
    state_robot.reset(seed=5)
    result = state_robot.act(np.array([50.0, 0, 0, 0]))  # would teleport the hand if not clipped
    assert np.isfinite(result.observation.proprio).all()


def test_rendered_images_have_the_configured_size_and_content(camera_robot: MetaWorldRobot) -> None:
    obs = camera_robot.reset(seed=1)
    assert set(obs.images) == {"corner", "topview"}
    for image in obs.images.values():
        assert image.shape == (48, 40, 3) and image.dtype == np.uint8
        assert image.std() > 5, "a constant frame means the renderer produced nothing"
    after = camera_robot.act(np.array([1.0, 0.0, 0.0, 0.0])).observation
    assert not np.array_equal(after.images["corner"], obs.images["corner"])


def test_corner_camera_is_turned_upright(camera_robot: MetaWorldRobot) -> None:
    import mujoco

    obs = camera_robot.reset(seed=2)
    renderer = mujoco.Renderer(camera_robot._env.model, 48, 40)
    try:
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        renderer.update_scene(camera_robot._env.data, camera="corner")
        raw = renderer.render()
        renderer.update_scene(camera_robot._env.data, camera="topview")
        raw_top = renderer.render()
    finally:
        renderer.close()
    np.testing.assert_array_equal(obs.images["corner"], raw[::-1, ::-1])
    np.testing.assert_array_equal(obs.images["topview"], raw_top)  # only the corner cameras are turned


def test_make_env_uses_the_observable_goal() -> None:
    env = make_env("reach-v3")
    env.seed(0)
    state, _ = env.reset()
    assert np.abs(state[36:39]).sum() > 0  # a hidden goal would be zeros
    env.close()


def test_a_robot_warmed_up_in_one_thread_renders_in_another(camera_robot: MetaWorldRobot) -> None:
    first = camera_robot.reset(seed=4).images["corner"]
    seen: dict[str, object] = {}

    def in_actor_thread() -> None:
        try:
            seen["image"] = camera_robot.reset(seed=4).images["corner"]
        except Exception as exc:  # reported below; an assertion here would be lost in the thread
            seen["error"] = exc

    thread = threading.Thread(target=in_actor_thread)
    thread.start()
    thread.join(timeout=30)
    assert "error" not in seen, seen.get("error")
    np.testing.assert_array_equal(seen["image"], first)
    np.testing.assert_array_equal(camera_robot.reset(seed=4).images["corner"], first)  # and back in this thread
