"""The simulated world behind the robot interfaces of ``producers``: MetaWorld v3 robots
(``metaworld_robot``), the task table with instructions and seed ranges (``tasks``), scripted experts
(``expert``, and ``expert_version`` to register one as a stand-in policy version), the simulated HG-DAgger operator
(``operator``), demonstrations generated and written to Delta exactly once (``demos``, ``demos_io``) and
seeded evaluation rollouts (``evaluation``). It imports ``producers``, ``schemas``, ``lakehouse`` and
``rewards``; nothing but the CLI and tests imports it.

Importing this package picks a headless OpenGL backend for MuJoCo (EGL unless ``MUJOCO_GL`` is
already set, e.g. to ``osmesa``). It must happen before the first ``import mujoco``, which is why
it lives here and why the submodules (which import MetaWorld) are not imported eagerly.
"""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("MUJOCO_GL", "egl")

# Mesa's software EGL and triton each load their own LLVM: importing triton (transformers does, when a
# robot falls back to the MiniLM encoder) after MuJoCo rendered a frame segfaults. Loaded first, both coexist.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401
