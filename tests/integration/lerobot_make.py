"""Run by test_lerobot_io.py with LeRobot's own environment: write a small dataset with lerobot's own recorder
(``LeRobotDataset.create`` / ``add_frame`` / ``save_episode``), as another team would hand theirs over.

    python lerobot_make.py ROOT FRAMES.npz      # FRAMES.npz: what was recorded, for the test to compare
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

TASKS = ("open the drawer", "close the box")
LENGTHS = (7, 9, 5)


def main(root: Path, record: Path) -> None:
    features = {
        "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"joint_{i}" for i in range(6)]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "observation.images.wrist": {"dtype": "video", "shape": (48, 64, 3), "names": ["height", "width", "channels"]},
    }
    ds = LeRobotDataset.create("team/demos", fps=10, features=features, root=root, use_videos=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]
    saved: dict[str, np.ndarray] = {}
    for e, length in enumerate(LENGTHS):
        states, actions, images = [], [], []
        for t in range(length):
            # a smooth scene with a moving blob: every frame differs clearly from its neighbours
            img = np.stack([(xx * 3 + t * 20) % 256, (yy * 4 + e * 60) % 256, np.full_like(xx, 128)], -1)
            img[(yy - 10 - 3 * t) ** 2 + (xx - 12 - 4 * t) ** 2 < 64] = (250, 20, 20)
            img = img.astype(np.uint8)
            state, action = rng.normal(size=6).astype(np.float32), rng.uniform(-1, 1, 4).astype(np.float32)
            ds.add_frame({"observation.state": state, "action": action, "observation.images.wrist": img,
                          "task": TASKS[e % 2]})
            states.append(state)
            actions.append(action)
            images.append(img)
        ds.save_episode()
        saved.update({f"state-{e}": np.stack(states), f"action-{e}": np.stack(actions), f"image-{e}": np.stack(images)})
    ds.finalize()
    np.savez(record, **saved)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
