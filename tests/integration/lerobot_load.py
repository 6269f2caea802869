"""Run by test_lerobot_io.py with LeRobot's own environment ($VENV/lerobot): load a dataset folder with lerobot's
``LeRobotDataset`` (offline) and write down what it hands a training loop, for the test to check against Delta.

    python lerobot_load.py ROOT OUT INDEX...     # OUT/result.json, OUT/image-<index>.npy (C, H, W float in [0, 1])
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset


def main(root: Path, out: Path, indices: list[int]) -> None:
    ds = LeRobotDataset("sop/export-test", root=root)
    camera = ds.meta.video_keys[0]
    items = []
    for i in indices:
        item = ds[i]
        episode = int(item["episode_index"])
        np.save(out / f"image-{i}.npy", item[camera].numpy())
        items.append({
            "index": int(item["index"]), "episode_index": episode, "frame_index": int(item["frame_index"]),
            "timestamp": float(item["timestamp"]), "task": item["task"],
            "sop_episode_id": ds.meta.episodes[episode]["sop/episode_id"],
            "state": item["observation.state"].tolist(), "action": item["action"].tolist(),
            "reward": float(item["next.reward"]), "done": bool(item["next.done"]),
            "intervention": bool(item["complementary_info.is_intervention"]),
            "policy_version": item["policy_version"], "image_shape": list(item[camera].shape),
        })
    result = {"len": len(ds), "num_episodes": ds.num_episodes, "fps": ds.fps, "video_keys": ds.meta.video_keys,
              "codebase_version": ds.meta.info["codebase_version"], "tasks": list(ds.meta.tasks.index),
              "state_mean": np.asarray(ds.meta.stats["observation.state"]["mean"]).tolist(), "items": items}
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), [int(a) for a in sys.argv[3:]])
