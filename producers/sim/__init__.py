"""The simulated fleet: MetaWorld v3 robots, their task table and scripted experts.

Importing this package picks a headless OpenGL backend for MuJoCo (EGL unless ``MUJOCO_GL`` is
already set, e.g. to ``osmesa``). It must happen before the first ``import mujoco``, which is why
it lives here and why the submodules (which import MetaWorld) are not imported eagerly.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")
