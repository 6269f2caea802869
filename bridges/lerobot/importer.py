"""Import a LeRobotDataset v3.0 folder into the Delta ``demonstrations`` table, each episode exactly once.

    report = import_lerobot(Lakehouse(root), Path("their-dataset"), task_map={"open the drawer": "drawer-open-v3"})

Episodes are read in ``episode_index`` order, streaming: the data Parquet files batch by batch, each camera's
MP4 decoded forward once (frame of row ``k`` = the frame shown at ``from_timestamp + timestamp``), each frame
stored as JPEG (or PNG) bytes as a robot would send it. Every episode is committed to Delta with the
application transaction ``sop-lerobot-import.<episode id>`` (several whole episodes share a commit, up to
``rows_per_commit`` rows); an episode whose id the table already holds is skipped, so importing twice (or an
export of the same table) adds nothing.

Episode ids: ``sop/episode_id`` of ``meta/episodes`` when the dataset came from ``sop export lerobot``, else
``lerobot:<dataset id>:<episode_index>`` (dataset id: the folder name unless given). Columns come from the
features of :mod:`bridges.lerobot.layout` where present (an SOP export round-trips exactly, images up to the
video codec's loss); for another team's dataset: ``task`` = ``task_map`` of the LeRobot task text (default: the
text itself), ``instruction`` = the text, ``controller`` = HUMAN unless ``complementary_info.is_intervention``
says a policy drove, ``env_reward`` = ``next.reward``, ``outcome`` = SUCCESS unless ``next.success`` exists and
never holds, and the RECAP ``reward`` / ``mc_return`` computed as for SOP's own demonstrations.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bridges.lerobot import layout as L
from bridges.lerobot.video import FrameReader
from lakehouse import DEMONSTRATIONS, Lakehouse
from rewards.config import RecapConfig
from rewards.recap import episode_targets
from schemas.images import image_dimensions

IMPORT_APP_PREFIX = "sop-lerobot-import"
DEFAULT_JPEG_QUALITY = 90  # the fleet's (producers.images)


@dataclass
class ImportReport:
    root: Path
    episodes_written: int = 0
    episodes_skipped: int = 0
    rows_written: int = 0
    frames_read: int = 0
    versions: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames_read / self.seconds if self.seconds else float("nan")


def import_app_id(episode_id: str, *, prefix: str = IMPORT_APP_PREFIX) -> str:
    return f"{prefix}.{episode_id}"


def _episodes_meta(root: Path) -> list[dict[str, Any]]:
    """Every row of ``meta/episodes`` (without the statistics), in episode_index order."""
    files = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not files:
        raise L.LayoutError(f"{root} has no meta/episodes/*/*.parquet")
    rows: list[dict[str, Any]] = []
    for path in files:
        names = [n for n in pq.read_schema(path).names if not n.startswith("stats/")]
        rows += pq.read_table(path, columns=names).to_pylist()
    rows.sort(key=lambda r: r["episode_index"])
    if [r["episode_index"] for r in rows] != list(range(len(rows))):
        raise L.LayoutError(f"{root}: meta/episodes does not hold episodes 0..{len(rows) - 1}")
    return rows


def _frames_by_episode(root: Path, info: Mapping[str, Any], episodes: list[dict[str, Any]],
                       columns: list[str]) -> Iterator[tuple[dict[str, Any], pa.Table]]:
    """(episode meta, its frames in frame order), reading each data file once, batch by batch."""
    by_file: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for ep in episodes:
        by_file.setdefault((ep["data/chunk_index"], ep["data/file_index"]), []).append(ep)
    for (chunk, file), eps in sorted(by_file.items(), key=lambda kv: kv[1][0]["episode_index"]):
        path = root / info["data_path"].format(chunk_index=chunk, file_index=file)
        if not path.exists():
            raise L.LayoutError(f"{path} is missing (episodes {eps[0]['episode_index']}…)")
        wanted = {ep["episode_index"]: ep for ep in eps}
        waiting: dict[int, list[pa.Table]] = {}
        have: dict[int, int] = {}
        order = [ep["episode_index"] for ep in eps]
        done: dict[int, pa.Table] = {}
        for batch in pq.ParquetFile(path).iter_batches(batch_size=2048, columns=columns):
            rows = pa.Table.from_batches([batch])
            index = rows.column("episode_index")
            for e in pc.unique(index).to_pylist():
                if e not in wanted:
                    continue
                part = rows.filter(pc.equal(index, e))
                waiting.setdefault(e, []).append(part)
                have[e] = have.get(e, 0) + part.num_rows
                if have[e] == wanted[e]["length"]:
                    table = pa.concat_tables(waiting.pop(e))
                    done[e] = table.take(pc.sort_indices(table.column("frame_index")))
            while order and order[0] in done:  # hand them out in episode order
                e = order.pop(0)
                yield wanted[e], done.pop(e)
        if order:
            raise L.LayoutError(f"{path}: episode {order[0]} has fewer frames than meta/episodes says "
                                f"({have.get(order[0], 0)} of {wanted[order[0]]['length']})")


class _Videos:
    """Forward readers over each camera's current video file."""

    def __init__(self, root: Path, info: Mapping[str, Any], keys: list[str]) -> None:
        self.root, self.info, self.keys = root, info, keys
        self.fps = int(info["fps"])
        self._open: dict[str, tuple[tuple[int, int], FrameReader, float]] = {}

    def frames(self, key: str, ep: Mapping[str, Any], timestamps: list[float]) -> list[np.ndarray]:
        where = (ep[f"videos/{key}/chunk_index"], ep[f"videos/{key}/file_index"])
        start = float(ep[f"videos/{key}/from_timestamp"])
        current = self._open.get(key)
        if current is None or current[0] != where or start + timestamps[0] < current[2]:
            if current is not None:
                current[1].close()
            path = self.root / self.info["video_path"].format(video_key=key, chunk_index=where[0], file_index=where[1])
            current = (where, FrameReader(path, fps=self.fps), 0.0)
        reader = current[1]
        out = [reader.at(start + t) for t in timestamps]
        self._open[key] = (where, reader, start + timestamps[-1])
        return out

    def close(self) -> None:
        for _, reader, _ in self._open.values():
            reader.close()
        self._open.clear()


def _encode(rgb: np.ndarray, encoding: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if encoding == "png":
        Image.fromarray(rgb).save(buf, format="PNG")
    else:
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _camera(key: str) -> str:
    return key[len(L.IMAGE_PREFIX):] if key.startswith(L.IMAGE_PREFIX) else key.rsplit(".", 1)[-1]


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list) and value and all(isinstance(v, float) and math.isnan(v) for v in value):
        return None
    return value


class _Importer:
    def __init__(self, lake: Lakehouse, root: Path, *, task_map: Mapping[str, str], dataset_id: str,
                 recap: RecapConfig, image_encoding: str, jpeg_quality: int, app_id_prefix: str) -> None:
        self.root = root
        self.info = L.read_info(root)
        self.tasks = L.read_tasks(root)
        self.features: dict[str, dict[str, Any]] = self.info["features"]
        for needed in (L.STATE, L.ACTION):
            if needed not in self.features:
                raise L.LayoutError(f"{root} has no {needed!r} feature: SOP's steps need proprio and the action")
        self.video_keys = [k for k, ft in self.features.items() if ft["dtype"] == "video"]
        self.image_keys = [k for k, ft in self.features.items() if ft["dtype"] == "image"]
        if not self.video_keys and not self.image_keys:
            raise L.LayoutError(f"{root} has no camera (video or image) features")
        self.fps = int(self.info["fps"])
        self.task_map = dict(task_map)
        self.dataset_id = dataset_id
        self.recap = recap
        self.image_encoding = image_encoding
        self.jpeg_quality = jpeg_quality
        self.prefix = app_id_prefix
        self.writer = lake.writer(DEMONSTRATIONS.name, app_id_prefix=app_id_prefix)
        self.writer.table.update_incremental()
        ids = self.writer.table.to_pyarrow_dataset().to_table(columns=["episode_id"]).column("episode_id")
        self.present = set(pc.unique(ids).to_pylist())
        self.base_us = time.time_ns() // 1000

    def columns(self) -> list[str]:
        return [k for k, ft in self.features.items() if ft["dtype"] != "video"]

    def episode_id(self, ep: Mapping[str, Any]) -> str:
        return str(ep.get("sop/episode_id") or f"lerobot:{self.dataset_id}:{ep['episode_index']}")

    def is_written(self, episode_id: str) -> bool:
        """Whether the table holds the episode (read once at the start, then kept up to date by this import).

        An episode's rows and its application transaction are one commit, so a recorded transaction always
        comes with rows. Against an importer of the same dataset running at the same time, the writer re-checks
        the transactions when it commits and drops a commit whose episodes are all recorded already (both form
        the same commits from the same folder and table); commits that overlap only in part are not guarded."""
        return episode_id in self.present

    def rows(self, ep: Mapping[str, Any], frames: pa.Table, videos: _Videos) -> list[dict[str, Any]]:
        data = frames.to_pydict()
        n = frames.num_rows
        episode_id = self.episode_id(ep)
        timestamps = [float(t) for t in data["timestamp"]]
        images: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for key in self.video_keys:
            for i, rgb in enumerate(videos.frames(key, ep, timestamps)):
                h, w, _ = rgb.shape
                images[i].append({"camera": _camera(key), "encoding": self.image_encoding, "width": w, "height": h,
                                  "data": _encode(rgb, self.image_encoding, self.jpeg_quality),
                                  "capture_time_us": None})
        for key in self.image_keys:
            for i, cell in enumerate(data[key]):
                raw = cell["bytes"] if isinstance(cell, dict) else cell
                size = image_dimensions(raw)
                if size is None:
                    raise L.LayoutError(f"episode {ep['episode_index']}, frame {i}: {key} is not JPEG/PNG bytes")
                images[i].append({"camera": _camera(key), "encoding": "png" if raw[:4] == b"\x89PNG" else "jpeg",
                                  "width": size[0], "height": size[1], "data": raw, "capture_time_us": None})
        texts = [self.tasks[int(t)] for t in data["task_index"]]
        has = self.features.__contains__
        outcome = ep.get("sop/outcome")
        if outcome is None:
            outcome = "TIMEOUT" if has("next.success") and not any(data["next.success"]) else "SUCCESS"
        success = (data["next.success"] if has("next.success")
                   else [outcome == "SUCCESS" and i == n - 1 for i in range(n)])
        sop_rewards = has("mc_return") and has("next.reward")
        if not sop_rewards:
            task = self.task_map.get(texts[0], texts[0])
            targets = episode_targets(outcome, n, max_episode_length=self.recap.max_steps(task),
                                      c_fail=self.recap.failure_penalty(task), n_step=self.recap.n_step,
                                      timeout_is_failure=self.recap.timeout_is_failure)
        rows = []
        for i in range(n):
            text = texts[i]
            row: dict[str, Any] = {
                "episode_id": episode_id,
                "actor_id": str(ep.get("sop/actor_id") or f"lerobot:{self.dataset_id}"),
                "task": str(ep.get("sop/task") or self.task_map.get(text, text)),
                "instruction": text,
                "step_index": int(data["step_index"][i]) if has("step_index") else int(data["frame_index"][i]),
                "event_time_us": (int(data["event_time_us"][i]) if has("event_time_us")
                                  else self.base_us + round(int(data["index"][i]) * 1_000_000 / self.fps)),
                "policy_version": str(data["policy_version"][i]) if has("policy_version") else "lerobot",
                "images": images[i],
                "proprio": [float(v) for v in np.atleast_1d(data[L.STATE][i])],
                "action": [float(v) for v in np.atleast_1d(data[L.ACTION][i])],
                "policy_action": _nan_to_none(data[L.POLICY_ACTION][i]) if has(L.POLICY_ACTION) else None,
                "controller": ("HUMAN" if not has(L.INTERVENTION) or data[L.INTERVENTION][i] else "POLICY"),
                "env_reward": (_nan_to_none(data["env_reward"][i]) if has("env_reward")
                               else (float(data["next.reward"][i]) if has("next.reward") else None)),
                "success": bool(success[i]),
                "reward": float(data["next.reward"][i]) if sop_rewards else float(targets.rewards[i]),
                "mc_return": float(data["mc_return"][i]) if sop_rewards else float(targets.normalised_returns[i]),
                "value": _nan_to_none(data["value"][i]) if has("value") else None,
                "advantage": _nan_to_none(data["advantage"][i]) if has("advantage") else None,
                "advantage_source": (data["advantage_source"][i] or None) if has("advantage_source") else None,
                "outcome": str(outcome),
                "episode_length": int(ep.get("sop/episode_length") or n),
            }
            rows.append(row)
        return rows


def import_lerobot(lake: Lakehouse, root: Path, *, task_map: Mapping[str, str] | None = None,
                   dataset_id: str | None = None, recap: RecapConfig | None = None, image_encoding: str = "jpeg",
                   jpeg_quality: int = DEFAULT_JPEG_QUALITY, app_id_prefix: str = IMPORT_APP_PREFIX,
                   rows_per_commit: int = 2048, on_plan: Callable[[int, int], None] | None = None,
                   on_episode: Callable[[int, bool], None] | None = None) -> ImportReport:
    """Append the episodes of the LeRobotDataset at ``root`` to ``demonstrations``, each exactly once.

    Episodes are committed together until a commit holds ``rows_per_commit`` rows (whole episodes); each
    carries its own application transaction in that commit.

    ``on_plan(episodes, frames)`` is called with the dataset's totals, ``on_episode(frames, written)`` after
    each episode (a progress bar).
    """
    if image_encoding not in ("jpeg", "png"):
        raise ValueError(f"image_encoding must be jpeg or png, got {image_encoding!r}")
    started = time.perf_counter()
    root = Path(root)
    imp = _Importer(lake, root, task_map=task_map or {}, dataset_id=dataset_id or root.resolve().name,
                    recap=recap or RecapConfig(), image_encoding=image_encoding, jpeg_quality=jpeg_quality,
                    app_id_prefix=app_id_prefix)
    episodes = _episodes_meta(root)
    if on_plan is not None:
        on_plan(len(episodes), int(imp.info.get("total_frames", sum(e["length"] for e in episodes))))
    report = ImportReport(root=root)
    videos = _Videos(root, imp.info, imp.video_keys)
    pending: list[tuple[str, list[dict[str, Any]]]] = []

    def commit() -> None:
        rows = [r for _, episode_rows in pending for r in episode_rows]
        result = imp.writer.write(rows, app_transactions={import_app_id(e, prefix=app_id_prefix): 1 for e, _ in pending},
                                  metadata={"sop.import.lerobot": str(root),
                                            "sop.import.episodes": f"{pending[0][0]} … {pending[-1][0]}"})
        written = result.rows_written > 0  # 0: another importer committed these episodes meanwhile
        if written:
            report.rows_written += result.rows_written
            if result.version is not None:
                report.versions.append(result.version)
        for episode_id, episode_rows in pending:
            imp.present.add(episode_id)
            report.episodes_written += written
            report.episodes_skipped += not written
            if on_episode is not None:
                on_episode(len(episode_rows), written)
        pending.clear()

    try:
        for ep, frames in _frames_by_episode(root, imp.info, episodes, imp.columns()):
            episode_id = imp.episode_id(ep)
            if imp.is_written(episode_id):
                report.episodes_skipped += 1
                if on_episode is not None:
                    on_episode(frames.num_rows, False)
                continue
            pending.append((episode_id, imp.rows(ep, frames, videos)))
            report.frames_read += frames.num_rows
            if sum(len(r) for _, r in pending) >= rows_per_commit:
                commit()
        if pending:
            commit()
    finally:
        videos.close()
    report.seconds = time.perf_counter() - started
    return report
