"""LeRobotDataset v3.0 out of and into real Delta tables, checked by LeRobot itself.

- LeRobot's own ``LeRobotDataset(repo_id, root=DIR)`` (lerobot 0.4.4 in its own environment, offline) loads
  an export spread over several data files, video files and chunk folders: frame count, a row of state/action
  and camera frames are checked against the Delta source.
- Round trip: export ``steps`` and ``demonstrations`` → import into a fresh lakehouse → the same rows (images
  within the video codec's loss); importing again, or into the source lakehouse, adds nothing.
- A dataset recorded with lerobot's own recorder (``LeRobotDataset.create`` / ``add_frame``) imports with its
  frames, task texts mapped to SOP tasks and the RECAP columns computed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bridges.lerobot import ExportOptions, export_lerobot, import_lerobot
from lakehouse import Lakehouse, snapshot
from learner.synthetic import synthetic_episode, write_rows
from schemas.images import jpeg_pool

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
LEROBOT_PYTHON = Path(sys.prefix) / "lerobot" / "bin" / "python"
TASKS = ("pick-place-v3", "drawer-open-v3", "box-close-v3")
# Columns that are the lakehouse's own bookkeeping (re-derived on import), not the step's content.
BOOKKEEPING = {"images", "event_time", "event_date", "ingest_time", "kafka_topic", "kafka_partition", "kafka_offset"}
MAX_PIXEL_ERROR = 12.0  # mean |difference| (0-255) after AV1 at CRF 30; neighbouring frames differ by ~40


def _source(root: Path) -> Lakehouse:
    """Demonstrations and online episodes (takeovers, values, advantages) in real Delta tables."""
    lake = Lakehouse(root)
    rng = np.random.default_rng(3)
    frames = jpeg_pool(48, 64, seed=3)
    demos, online = [], []
    for k, task in enumerate(TASKS):
        for i in range(2):
            demos += synthetic_episode(task, 20 + 7 * i + k, rng, episode_id=f"demo:{task}:{i}", demo=True,
                                       frames=frames)
            online += synthetic_episode(task, 25 + 5 * i, rng, episode_id=f"online:{task}:{i}", demo=False,
                                        frames=frames, human_steps=range(5, 12), outcome="TIMEOUT" if i else "SUCCESS")
    write_rows(lake, "demonstrations", demos)
    write_rows(lake, "steps", online)
    return lake


def _rows(lake: Lakehouse, table: str) -> list[dict[str, Any]]:
    rows, _ = snapshot(lake.table(table, create=False))
    return sorted(rows.to_pylist(), key=lambda r: (r["episode_id"], r["step_index"]))


def _rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def _lerobot(script: str, *args: str | Path, home: Path) -> None:
    assert LEROBOT_PYTHON.exists(), f"{LEROBOT_PYTHON} is missing: run `make setup` (infra/setup.sh makes it)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOP_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(home / "hf"), HF_LEROBOT_HOME=str(home / "lerobot"), SVT_LOG="1")
    done = subprocess.run([str(LEROBOT_PYTHON), str(HERE / script), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=home)
    assert done.returncode == 0, f"lerobot {script} failed:\n{done.stderr[-4000:]}"


def test_lerobot_itself_loads_the_export(tmp_path: Path) -> None:
    lake = _source(tmp_path / "lake")
    source = {(r["episode_id"], r["step_index"]): r for r in _rows(lake, "steps")}
    out = tmp_path / "dataset"
    # Tiny file limits, so the dataset spans several data files, video files and chunk folders.
    report = export_lerobot(lake, out, table="steps",
                            options=ExportOptions(data_files_size_in_mb=0.02, video_files_size_in_mb=0.012, chunks_size=2,
                                                  episodes_per_meta_write=2))
    assert report.frames == len(source) and report.episodes == 6
    assert report.data_files >= 3 and report.video_files >= 3
    assert (out / "data" / "chunk-001").is_dir() and (out / "videos" / "observation.images.corner" / "chunk-001").is_dir()
    total = report.frames
    indices = sorted({0, 1, 24, 25, 26, total // 2, total - 2, total - 1})
    dump = tmp_path / "dump"
    dump.mkdir()
    _lerobot("lerobot_load.py", out, dump, *map(str, indices), home=tmp_path)
    result = json.loads((dump / "result.json").read_text())

    assert result["codebase_version"] == "v3.0" and result["fps"] == 30
    assert result["len"] == len(source) and result["num_episodes"] == 6
    assert result["video_keys"] == ["observation.images.corner"]
    assert sorted(result["tasks"]) == sorted({r["instruction"] for r in source.values()})
    proprio = np.asarray([r["proprio"] for r in source.values()], np.float64)
    assert np.allclose(result["state_mean"], proprio.mean(axis=0), atol=1e-5)
    for item in result["items"]:
        row = source[(item["sop_episode_id"], item["frame_index"])]  # synthetic steps are numbered from 0
        assert item["index"] in indices and item["timestamp"] == pytest.approx(item["frame_index"] / 30, abs=1e-6)
        assert item["state"] == list(np.float32(row["proprio"])) and item["action"] == list(np.float32(row["action"]))
        assert item["task"] == row["instruction"] and item["policy_version"] == row["policy_version_text"]  # text
        assert item["reward"] == pytest.approx(row["reward"]) and item["done"] == (item["frame_index"] == row["episode_length"] - 1)
        assert item["intervention"] == (row["controller"] == "HUMAN")
        assert item["image_shape"] == [3, 64, 64]
        frame = np.load(dump / f"image-{item['index']}.npy").transpose(1, 2, 0) * 255.0  # LeRobot: (C, H, W) in [0, 1]
        assert np.abs(frame - _rgb(row["images"][0]["data"])).mean() < MAX_PIXEL_ERROR


def _same_steps(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    assert [(r["episode_id"], r["step_index"]) for r in after] == [(r["episode_id"], r["step_index"]) for r in before]
    for a, b in zip(before, after, strict=True):
        differ = {k: (a[k], b[k]) for k in a if k not in BOOKKEEPING and a[k] != b[k]}
        assert not differ, f"{a['episode_id']} step {a['step_index']}: {differ}"
        assert [(i["camera"], i["width"], i["height"]) for i in a["images"]] == \
               [(i["camera"], i["width"], i["height"]) for i in b["images"]]
        error = np.abs(_rgb(a["images"][0]["data"]) - _rgb(b["images"][0]["data"])).mean()
        assert error < MAX_PIXEL_ERROR, f"{a['episode_id']} step {a['step_index']}: image differs by {error:.1f}"


def test_export_then_import_gives_the_same_steps_once(tmp_path: Path) -> None:
    lake = _source(tmp_path / "lake")
    target = Lakehouse(tmp_path / "target")
    before = []
    for table in ("demonstrations", "steps"):
        export_lerobot(lake, tmp_path / table, table=table, options=ExportOptions(episodes_per_meta_write=2))
        report = import_lerobot(target, tmp_path / table, rows_per_commit=60)  # a few episodes per commit
        assert (report.episodes_written, report.episodes_skipped) == (6, 0) and 1 < len(report.versions) < 6
        before += _rows(lake, table)
    before.sort(key=lambda r: (r["episode_id"], r["step_index"]))
    _same_steps(before, _rows(target, "demonstrations"))

    version = target.table("demonstrations").version()
    again = import_lerobot(target, tmp_path / "steps")
    assert (again.episodes_written, again.episodes_skipped, again.rows_written) == (0, 6, 0)
    assert target.table("demonstrations").version() == version
    into_source = import_lerobot(lake, tmp_path / "demonstrations")  # those episodes are the source's own
    assert (into_source.episodes_written, into_source.episodes_skipped) == (0, 6)
    assert len(_rows(lake, "demonstrations")) == len([r for r in before if r["episode_id"].startswith("demo:")])


def test_a_predicate_selects_what_is_exported(tmp_path: Path) -> None:
    lake = _source(tmp_path / "lake")
    report = export_lerobot(lake, tmp_path / "out", table="steps",
                            where="outcome = 'SUCCESS' AND task <> 'box-close-v3'")
    expected = [r for r in _rows(lake, "steps") if r["outcome"] == "SUCCESS" and r["task"] != "box-close-v3"]
    assert (report.episodes, report.frames) == (2, len(expected))
    episodes = pq.read_table(tmp_path / "out" / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    assert sorted(episodes.column("sop/episode_id").to_pylist()) == sorted({r["episode_id"] for r in expected})
    info = json.loads((tmp_path / "out" / "meta" / "info.json").read_text())
    assert (info["total_frames"], info["total_episodes"], info["total_tasks"]) == (len(expected), 2, 2)


def test_a_dataset_recorded_by_lerobot_imports_once(tmp_path: Path) -> None:
    root, record = tmp_path / "team-demos", tmp_path / "recorded.npz"
    _lerobot("lerobot_make.py", root, record, home=tmp_path)
    recorded = np.load(record)
    lake = Lakehouse(tmp_path / "lake")
    report = import_lerobot(lake, root, task_map={"open the drawer": "drawer-open-v3"})
    assert (report.episodes_written, report.rows_written, len(report.versions)) == (3, 7 + 9 + 5, 1)
    rows = _rows(lake, "demonstrations")
    assert {r["episode_id"] for r in rows} == {"lerobot:team-demos:0", "lerobot:team-demos:1", "lerobot:team-demos:2"}
    for row in rows:
        e, t = int(row["episode_id"].rsplit(":", 1)[1]), row["step_index"]
        assert row["task"] == ("drawer-open-v3" if e % 2 == 0 else "close the box")
        assert row["instruction"] == ("open the drawer" if e % 2 == 0 else "close the box")
        assert np.array_equal(np.float32(row["proprio"]), recorded[f"state-{e}"][t])
        assert np.array_equal(np.float32(row["action"]), recorded[f"action-{e}"][t])
        assert row["controller"] == "HUMAN" and row["outcome"] == "SUCCESS" and row["policy_action"] is None
        assert row["episode_length"] == len(recorded[f"state-{e}"])
        assert row["reward"] == (0.0 if t == row["episode_length"] - 1 else -1.0)
        image = row["images"][0]
        assert (image["camera"], image["width"], image["height"], image["encoding"]) == ("wrist", 64, 48, "jpeg")
        assert np.abs(_rgb(image["data"]) - recorded[f"image-{e}"][t]).mean() < MAX_PIXEL_ERROR
    again = import_lerobot(lake, root, task_map={"open the drawer": "drawer-open-v3"})
    assert (again.episodes_written, again.episodes_skipped) == (0, 3)
