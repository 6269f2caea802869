"""The LeRobotDataset v3.0 layout (lerobot's ``src/lerobot/datasets/utils.py`` and ``dataset_metadata.py``, 0.4-0.6)
and how SOP's step columns map onto its features.

A dataset root holds::

    meta/info.json                                   codebase_version "v3.0", fps, features, totals, chunk settings
    meta/stats.json                                  feature statistics over the dataset
    meta/tasks.parquet                               task (the instruction text, the index) -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: indices, lengths, file and video offsets,
                                                     per-episode statistics (stats/<feature>/<stat>)
    data/chunk-000/file-000.parquet                  one row per frame, one row group per episode
    videos/observation.images.<camera>/chunk-000/file-000.mp4

Files roll over to the next ``file-NNN`` when they reach ``data_files_size_in_mb`` / ``video_files_size_in_mb``,
and to the next ``chunk-NNN`` after ``chunks_size`` files. An episode never spans two files.

SOP column -> LeRobot feature (frame ``k`` of an episode is shown at ``timestamp = k / fps``):

==========================  ====================================  =========================================
feature                     from                                  notes
==========================  ====================================  =========================================
observation.state           proprio
action                      action                                the executed action
observation.images.<cam>    images[camera = cam]                  video (mp4), decoded from the JPEG/PNG bytes
timestamp, frame_index,     the frame's position                  LeRobot's own columns
episode_index, index
task_index                  instruction                           meta/tasks.parquet maps it back to the text
next.reward                 reward                                RECAP's reward of the step
next.done                   last frame of the episode
next.success                success
complementary_info.         controller == HUMAN                   LeRobot's RL buffer reads complementary_info.*
is_intervention
advantage, value            advantage, value                      NaN where SOP has none
mc_return                   mc_return
env_reward                  env_reward                            NaN where SOP has none
policy_action               policy_action                         the clean label; NaN where SOP has none
policy_version              policy_version_text                   string: the version as the event said it ("12", "expert")
advantage_source            advantage_source                      string, "" where SOP has none
step_index, event_time_us   step_index, event_time_us             SOP's own step number and clock
==========================  ====================================  =========================================

Episode columns SOP adds to ``meta/episodes`` (LeRobot reads the columns it knows and ignores the rest):
``sop/episode_id``, ``sop/task``, ``sop/actor_id``, ``sop/outcome``, ``sop/episode_length``.
Not carried: the Kafka origin columns and the cameras' ``capture_time_us``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

CODEBASE_VERSION = "v3.0"
DEFAULT_CHUNK_SIZE = 1000  # files per chunk folder
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 200

INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"

STATE = "observation.state"
ACTION = "action"
IMAGE_PREFIX = "observation.images."
INTERVENTION = "complementary_info.is_intervention"
SOP_EPISODE_COLUMNS = ("sop/episode_id", "sop/task", "sop/actor_id", "sop/outcome", "sop/episode_length")

# LeRobot's DEFAULT_FEATURES: every dataset has them.
INDEX_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}
# SOP's per-step extras: feature -> (dtype, SOP column).
SCALAR_EXTRAS: dict[str, tuple[str, str]] = {
    "next.reward": ("float32", "reward"),
    "next.done": ("bool", ""),
    "next.success": ("bool", "success"),
    INTERVENTION: ("bool", "controller"),
    "advantage": ("float32", "advantage"),
    "value": ("float32", "value"),
    "mc_return": ("float32", "mc_return"),
    "env_reward": ("float32", "env_reward"),
    "policy_version": ("string", "policy_version_text"),
    "advantage_source": ("string", "advantage_source"),
    "step_index": ("int64", "step_index"),
    "event_time_us": ("int64", "event_time_us"),
}
POLICY_ACTION = "policy_action"

_ARROW = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(),
          "bool": pa.bool_(), "string": pa.string()}
_HF_DTYPE = {"float32": "float32", "float64": "float64", "int64": "int64", "int32": "int32", "bool": "bool",
             "string": "string"}


class LayoutError(ValueError):
    """A folder that is not a LeRobotDataset v3.0 this bridge can read, or data that does not fit one."""


def chunk_file_after(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) after ``(chunk_index, file_index)`` (lerobot's ``update_chunk_file_indices``)."""
    if file_index == chunks_size - 1:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


@dataclass(frozen=True)
class Shapes:
    """What every frame of an export has: vector sizes and cameras with their (height, width)."""

    state_dim: int
    action_dim: int
    cameras: Mapping[str, tuple[int, int]]


def vector_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}_{i}" for i in range(n)]


def features_of(shapes: Shapes, video_info: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``info.json``'s ``features``: the cameras' videos, state, action, SOP's extras, LeRobot's index columns."""
    feats: dict[str, dict[str, Any]] = {
        STATE: {"dtype": "float32", "shape": [shapes.state_dim], "names": vector_names("proprio", shapes.state_dim)},
        ACTION: {"dtype": "float32", "shape": [shapes.action_dim], "names": vector_names("action", shapes.action_dim)},
    }
    for camera, (height, width) in shapes.cameras.items():
        key = IMAGE_PREFIX + camera
        feats[key] = {"dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"]}
        if video_info and key in video_info:
            feats[key]["info"] = dict(video_info[key])
    for name, (dtype, _) in SCALAR_EXTRAS.items():
        feats[name] = {"dtype": dtype, "shape": [1], "names": None}
    feats[POLICY_ACTION] = {"dtype": "float32", "shape": [shapes.action_dim],
                            "names": vector_names("action", shapes.action_dim)}
    return {**feats, **INDEX_FEATURES}


def hf_feature(ft: Mapping[str, Any]) -> dict[str, Any]:
    """The ``datasets`` feature (as serialised in the parquet ``huggingface`` metadata) of a LeRobot feature."""
    value = {"dtype": _HF_DTYPE[ft["dtype"]], "_type": "Value"}
    if list(ft["shape"]) == [1]:
        return value
    if len(ft["shape"]) == 1:
        return {"feature": value, "length": int(ft["shape"][0]), "_type": "List"}
    raise LayoutError(f"feature shape {ft['shape']} is not one this bridge writes")


def arrow_type(ft: Mapping[str, Any]) -> pa.DataType:
    scalar = _ARROW[ft["dtype"]]
    if list(ft["shape"]) == [1]:
        return scalar
    return pa.list_(pa.field("element", scalar), int(ft["shape"][0]))


def data_schema(features: Mapping[str, Mapping[str, Any]]) -> pa.Schema:
    """The schema of ``data/…parquet``: every non-video feature, as ``datasets`` writes it (fixed-size lists,
    the ``huggingface`` schema metadata that tells ``datasets`` the feature types)."""
    cols = {k: ft for k, ft in features.items() if ft["dtype"] not in ("video", "image")}
    meta = {"info": {"features": {k: hf_feature(ft) for k, ft in cols.items()}}}
    return pa.schema([pa.field(k, arrow_type(ft)) for k, ft in cols.items()],
                     metadata={b"huggingface": json.dumps(meta).encode()})


def info_json(*, fps: int, features: Mapping[str, Any], total_episodes: int, total_frames: int, total_tasks: int,
              chunks_size: int, data_files_size_in_mb: float, video_files_size_in_mb: float,
              robot_type: str | None, has_video: bool) -> dict[str, Any]:
    """``meta/info.json``, in the key order lerobot writes."""
    return {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": total_episodes,
        "total_frames": total_frames,
        "total_tasks": total_tasks,
        "chunks_size": chunks_size,
        "data_files_size_in_mb": data_files_size_in_mb,
        "video_files_size_in_mb": video_files_size_in_mb,
        "fps": fps,
        "splits": {"train": f"0:{total_episodes}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH if has_video else None,
        "features": dict(features),
    }


def write_tasks(root: Path, tasks: Sequence[str]) -> None:
    """``meta/tasks.parquet`` as lerobot 0.6 writes it: pandas, the task text is the index (named ``task``)."""
    import pandas as pd

    path = root / TASKS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(list(tasks), name="task")).to_parquet(path)


# -- reading ----------------------------------------------------------------------------------------------------

def read_info(root: Path) -> dict[str, Any]:
    path = root / INFO_PATH
    if not path.exists():
        raise LayoutError(f"{root} is not a LeRobot dataset: {INFO_PATH} is missing")
    info = json.loads(path.read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise LayoutError(f"{root} is a LeRobot dataset of format {version or 'unknown'}; this reads v3.x "
                          "(convert older ones with lerobot's convert_dataset_v21_to_v30)")
    return info


def read_tasks(root: Path) -> list[str]:
    """Task texts in task_index order."""
    import pyarrow.parquet as pq

    table = pq.read_table(root / TASKS_PATH)
    names = table.schema.pandas_metadata or {}
    index_cols = [c for c in names.get("index_columns", []) if isinstance(c, str)]
    text_col = next((c for c in ("task", *index_cols) if c in table.column_names), None)
    if text_col is None:
        raise LayoutError(f"{root / TASKS_PATH} has no task column (columns {table.column_names})")
    rows = sorted(zip(table.column("task_index").to_pylist(), table.column(text_col).to_pylist(), strict=True))
    if [i for i, _ in rows] != list(range(len(rows))):
        raise LayoutError(f"{root / TASKS_PATH}: task indices are not 0..{len(rows) - 1}")
    return [str(t) for _, t in rows]
