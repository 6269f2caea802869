"""``MetaWorldRobot``: one simulated Sawyer arm running one MetaWorld v3 task, behind the ``Robot`` seam.

Importing it runs ``sim/__init__.py`` first, which picks the headless GL backend before
``mujoco`` is imported. Owns the environment's life cycle (seeded placements, termination at the first success or at
``max_steps``), the fast headless camera rendering and the optional real-time pacing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from producers.actor import RatePacer
from producers.interfaces import Observation, StepResult
from sim.tasks import TASKS, task_spec

# MetaWorld raises if stepped past this many steps in one episode.
METAWORLD_MAX_STEPS = 500
ACTION_DIM = 4
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
# These cameras' up axis points down in MetaWorld's XML (e.g. corner: xyaxes="-1 1 0 -0.2 -0.2 -1"),
# so their frames come out rotated by 180°; rotating back (rows and columns reversed) gives the
# upright, unmirrored view.
_UPSIDE_DOWN = frozenset({"corner", "corner2", "corner3", "corner4"})


@dataclass(frozen=True, kw_only=True)
class MetaWorldRobotConfig:
    task: str = "pick-place-v3"
    cameras: tuple[str, ...] = ("corner",)
    image_size: int | tuple[int, int] = 64  # square side, or (height, width)
    render: bool = True  # False: observations carry no images (fast state-only runs)
    max_steps: int = 150  # the episode times out after this many steps
    control_hz: float | None = None  # None: as fast as possible; else act() paces to this rate
    instruction: str | None = None  # default: the task's canonical instruction

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"MetaWorldRobotConfig.task={self.task!r} is unknown; use one of {sorted(TASKS)}")
        if isinstance(self.cameras, str):
            raise ValueError(f"MetaWorldRobotConfig.cameras must be a tuple of names, e.g. ({self.cameras!r},)")
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"MetaWorldRobotConfig.cameras has unknown cameras {unknown}; known: {list(CAMERAS)}")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"MetaWorldRobotConfig.cameras lists a camera twice: {list(self.cameras)}")
        if self.render and not self.cameras:
            raise ValueError("MetaWorldRobotConfig.render=True needs at least one camera (or set render=False)")
        height, width = self.image_hw
        if height <= 0 or width <= 0:
            raise ValueError(f"MetaWorldRobotConfig.image_size must be positive, got {self.image_size!r}")
        if not 0 < self.max_steps <= METAWORLD_MAX_STEPS:
            raise ValueError(
                f"MetaWorldRobotConfig.max_steps must be in 1..{METAWORLD_MAX_STEPS} (MetaWorld's cap), got {self.max_steps}"
            )
        if self.control_hz is not None and not self.control_hz > 0:
            raise ValueError(
                f"MetaWorldRobotConfig.control_hz must be > 0, or None to run free, got {self.control_hz}"
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        if isinstance(self.image_size, int):
            return self.image_size, self.image_size
        height, width = self.image_size
        return int(height), int(width)


class CameraRenderer:
    """Renders named cameras of one MuJoCo model with the cheap settings (no shadows, no
    multisampling, no reflections): ~100× faster than MuJoCo's defaults on a software GL.

    The GL context is created on the first render and released after every frame: an EGL
    context still current in one thread cannot be made current in another (EGL_BAD_ACCESS), so
    releasing it lets any thread render (a robot warmed up in the main thread, then run by an
    actor thread) and lets ``close()`` run anywhere without freeing another context's objects.
    """

    def __init__(self, model: Any, cameras: tuple[str, ...], height: int, width: int) -> None:
        self._model = model
        self._cameras = cameras
        self._height = height
        self._width = width
        self._renderer: mujoco.Renderer | None = None

    def render(self, data: Any) -> dict[str, np.ndarray]:
        renderer = self._renderer or self._open()
        images = {}
        try:
            for camera in self._cameras:
                renderer.update_scene(data, camera=camera)
                frame = renderer.render()
                images[camera] = np.ascontiguousarray(frame[::-1, ::-1]) if camera in _UPSIDE_DOWN else frame
        finally:
            release_gl_context()
        return images

    def _open(self) -> mujoco.Renderer:
        model = self._model
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        # Coarser tessellation of spheres, capsules and planes: ~12% less CPU per frame on Mesa's software
        # renderer, and at 64×64 only 0.3% of the pixels change (mean |difference| 0.03 of 255).
        model.vis.quality.numslices = 8
        model.vis.quality.numstacks = 4
        model.vis.quality.numquads = 1
        model.vis.global_.offheight = max(model.vis.global_.offheight, self._height)
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self._width)
        renderer = mujoco.Renderer(model, self._height, self._width)
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self._renderer = renderer
        return renderer

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def release_gl_context() -> None:
    """Make no GL context current in the calling thread (EGL and OSMesa backends)."""
    backend = os.environ.get("MUJOCO_GL", "").lower()
    if backend == "egl":
        from mujoco import egl

        egl.EGL.eglMakeCurrent(egl.EGL_DISPLAY, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_SURFACE, egl.EGL.EGL_NO_CONTEXT)
    elif backend == "osmesa":
        from mujoco import osmesa

        osmesa.osmesa.OSMesaMakeCurrent(None, None, osmesa.GL.GL_FLOAT, 0, 0)


def make_env(task: str) -> Any:
    """A MetaWorld v3 env with the goal in the observation and per-episode placements drawn from
    the env's own seeded generator (``env.seed(s)`` then ``reset()`` gives placement ``s``)."""
    env = ALL_V3_ENVIRONMENTS[task]()
    env._partially_observable = False  # the experts read the goal from the last 3 state values
    del env.sawyer_observation_space  # cached property: recompute for the new observability
    # Draw placements from env.np_random (seeded) rather than a frozen vector: some tasks re-draw
    # until object and goal are apart, which would loop forever on a frozen vector.
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    return env


class MetaWorldRobot:
    """A simulated robot: implements :class:`producers.interfaces.Robot`."""

    action_dim: int = ACTION_DIM

    def __init__(self, config: MetaWorldRobotConfig | None = None) -> None:
        self.config = config or MetaWorldRobotConfig()
        self.task = self.config.task
        self._spec = task_spec(self.task)
        self._env = make_env(self.task)
        height, width = self.config.image_hw
        self._camera = (
            CameraRenderer(self._env.model, self.config.cameras, height, width) if self.config.render else None
        )
        self._pacer = RatePacer(self.config.control_hz) if self.config.control_hz else None
        self._seed_rng = np.random.default_rng()  # for reset(seed=None)
        self._instruction = self.config.instruction or self._spec.instruction
        self._observation: Observation | None = None
        self._steps = 0
        self._done = False
        self.seed: int | None = None  # placement seed of the current episode

    @property
    def steps(self) -> int:
        """Steps taken in the current episode."""
        return self._steps

    def reset(self, *, seed: int | None = None, instruction: str | None = None) -> Observation:
        if seed is None:
            seed = int(self._seed_rng.integers(0, 2**31 - 1))
        self.seed = seed
        self._instruction = instruction or self.config.instruction or self._spec.instruction
        self._env.seed(seed)
        state, _ = self._env.reset()
        self._steps = 0
        self._done = False
        if self._pacer is not None:
            self._pacer.restart()
        self._observation = self._make_observation(state)
        return self._observation

    def observe(self) -> Observation:
        if self._observation is None:
            raise RuntimeError("MetaWorldRobot.observe() before reset(): call reset(seed=...) first")
        return self._observation

    def act(self, action: np.ndarray) -> StepResult:
        if self._observation is None or self._done:
            raise RuntimeError("MetaWorldRobot.act() outside an episode: call reset(seed=...) first")
        command = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), -1.0, 1.0)
        if self._pacer is not None:
            self._pacer.wait()
        state, reward, _, _, info = self._env.step(command)
        self._steps += 1
        success = bool(info["success"])
        timeout = not success and self._steps >= self.config.max_steps
        self._done = success or timeout
        self._observation = self._make_observation(state)
        return StepResult(observation=self._observation, success=success, timeout=timeout, env_reward=float(reward))

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()
        self._env.close()

    def __enter__(self) -> MetaWorldRobot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_observation(self, state: np.ndarray) -> Observation:
        images = self._camera.render(self._env.data) if self._camera is not None else {}
        return Observation(
            images=images,
            proprio=np.asarray(state, dtype=np.float32),
            instruction=self._instruction,
            task=self.task,
        )
