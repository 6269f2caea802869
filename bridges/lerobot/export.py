"""Export a Delta table (``steps`` or ``demonstrations``) to a LeRobotDataset v3.0 folder.

    report = export_lerobot(Lakehouse(root), Path("out/my-dataset"), table="demonstrations",
                            where="task = 'pick-place-v3' AND outcome = 'SUCCESS'")

Two passes over one Delta version. The first counts the steps of every matching episode (DuckDB, only the
columns the predicate names are read). The second streams the rows in record batches, keeps an episode's rows
until all of them have arrived (rows of one episode lie together in the files a commit wrote, so few episodes
wait at once), and writes each complete episode at once: its frames to the data Parquet file (one row group),
its camera frames decoded from their JPEG/PNG bytes into each camera's MP4, its row of ``meta/episodes`` with
its statistics. Memory stays bounded by a record batch, the episodes waiting, and the encoders' look-ahead.
The dataset is built in a sibling folder and moved into place when complete, so a failed export leaves none.
The column mapping is in :mod:`bridges.lerobot.layout`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from bridges.lerobot import layout as L
from bridges.lerobot.stats import (
    QUANTILE_KEYS,
    QUANTILES,
    StatsAccumulator,
    episode_columns,
    image_stats,
    sample_indices,
    to_json,
    vector_stats,
)
from bridges.lerobot.video import VideoCodec, VideoFileWriter, video_info
from lakehouse import Lakehouse, upgrade
from lakehouse.sql import register

TABLES = ("steps", "demonstrations")
_NEEDED = ("episode_id", "step_index", "task", "instruction", "proprio", "action", "images")


class ExportError(ValueError):
    """An export that cannot be made as asked (bad predicate, data that does not fit one LeRobot dataset)."""


@dataclass(frozen=True)
class ExportOptions:
    fps: int = 30
    codec: VideoCodec = field(default_factory=VideoCodec)
    chunks_size: int = L.DEFAULT_CHUNK_SIZE
    data_files_size_in_mb: float = L.DEFAULT_DATA_FILE_SIZE_IN_MB
    video_files_size_in_mb: float = L.DEFAULT_VIDEO_FILE_SIZE_IN_MB
    robot_type: str | None = None
    batch_rows: int = 1024  # rows per record batch read from Delta
    episodes_per_meta_write: int = 100  # meta/episodes rows buffered before they are appended to the file

    def __post_init__(self) -> None:
        if not 1 <= self.fps <= 1000:
            raise ExportError(f"fps must be in 1..1000, got {self.fps}")
        if self.chunks_size < 1 or self.data_files_size_in_mb <= 0 or self.video_files_size_in_mb <= 0:
            raise ExportError("chunks_size and the file sizes must be positive")


@dataclass
class ExportReport:
    root: Path
    table: str
    table_version: int
    episodes: int = 0
    frames: int = 0
    tasks: int = 0
    data_files: int = 0
    video_files: int = 0
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else float("nan")


@dataclass(frozen=True)
class Plan:
    """The episodes that match, with their step counts, read at one Delta version."""

    counts: Mapping[str, int]
    version: int

    @property
    def frames(self) -> int:
        return sum(self.counts.values())


def _keep_mask(con: Any, batch: pa.Table, where: str) -> pa.Array:
    con.register("rows", batch)
    try:
        mask = con.sql(f"SELECT coalesce(({where}), false) AS keep FROM rows").to_arrow_table().column("keep")
    finally:
        con.unregister("rows")
    return mask.combine_chunks()


def plan_export(lake: Lakehouse, table: str = "steps", where: str | None = None) -> tuple[Plan, ds.Dataset]:
    """Count the steps of every episode of ``table`` matching ``where`` (a SQL predicate over its columns)."""
    import duckdb

    if table not in TABLES:
        raise ExportError(f"table {table!r}: export steps or demonstrations")
    if not lake.exists(table):
        raise ExportError(f"there is no {table} table under {lake.root} yet")
    dt = lake.table(table, create=False)
    dataset = dt.to_pyarrow_dataset()
    con = duckdb.connect()
    register(con, "t", dataset)  # a table of the old shape reads as the current one (policy_version a number)
    try:
        rows = con.sql(f"SELECT episode_id, count(*) AS n FROM t WHERE {where or 'TRUE'} GROUP BY episode_id "
                       "ORDER BY episode_id").fetchall()
    except duckdb.Error as exc:
        raise ExportError(f"--where {where!r} is not a predicate over {table}'s columns: {exc}") from None
    finally:
        con.close()
    return Plan({str(e): int(n) for e, n in rows}, dt.version()), dataset


def _episodes(dataset: ds.Dataset, plan: Plan, where: str | None, batch_rows: int) -> Iterator[pa.Table]:
    """Each matching episode's rows, in step order, as soon as all of them have been read."""
    import duckdb

    waiting: dict[str, list[pa.Table]] = {}
    have: dict[str, int] = {}
    con = duckdb.connect(config={"threads": 1})
    ids = pa.array(sorted(plan.counts), pa.string())
    try:
        for batch in dataset.to_batches(filter=pc.field("episode_id").isin(ids), batch_size=batch_rows,
                                          batch_readahead=2, fragment_readahead=1):
            rows = upgrade(pa.Table.from_batches([batch]))
            if where:
                rows = rows.filter(_keep_mask(con, rows, where))
            if rows.num_rows == 0:
                continue
            episode_ids = rows.column("episode_id")
            for episode_id in pc.unique(episode_ids).to_pylist():
                part = rows.filter(pc.equal(episode_ids, episode_id))
                waiting.setdefault(episode_id, []).append(part)
                have[episode_id] = have.get(episode_id, 0) + part.num_rows
                if have[episode_id] == plan.counts[episode_id]:
                    episode = pa.concat_tables(waiting.pop(episode_id))
                    yield episode.take(pc.sort_indices(episode.column("step_index")))
    finally:
        con.close()
    if waiting:
        raise ExportError(f"the table changed while it was read: {sorted(waiting)[:3]} … incomplete")


def _rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _vectors(column: pa.ChunkedArray, dim: int, what: str, episode_id: str, *, nullable: bool = False) -> np.ndarray:
    """A list<float> column as (rows, dim) float32; null rows become NaN when ``nullable``."""
    values = column.to_pylist()
    out = np.full((len(values), dim), np.nan, dtype=np.float32)
    for i, v in enumerate(values):
        if v is None:
            if not nullable:
                raise ExportError(f"episode {episode_id}: {what} of step {i} is null")
            continue
        if len(v) != dim:
            raise ExportError(f"episode {episode_id}: {what} has {len(v)} values at step {i}, the export {dim} "
                              f"(a LeRobot feature has one shape: export tasks of one contract, e.g. with --where)")
        out[i] = v
    return out


def _floats(column: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(pc.fill_null(column.cast(pa.float32()), float("nan")).to_numpy(zero_copy_only=False), np.float32)


class _Rolling:
    """The (chunk, file) of one kind of file, moving on when the current one would pass its size limit."""

    def __init__(self, limit_mb: float, chunks_size: int) -> None:
        self.limit = limit_mb * 1024 * 1024
        self.chunks_size = chunks_size
        self.chunk, self.file = 0, 0
        self.frames_in_file = 0
        self.files = 1

    def full(self, size_bytes: int, frames: int) -> bool:
        if self.frames_in_file == 0:
            return False
        per_frame = size_bytes / self.frames_in_file
        return size_bytes + per_frame * frames >= self.limit

    def advance(self) -> None:
        self.chunk, self.file = L.chunk_file_after(self.chunk, self.file, self.chunks_size)
        self.frames_in_file = 0
        self.files += 1


class _DatasetWriter:
    """Writes episodes into one LeRobotDataset folder."""

    def __init__(self, root: Path, options: ExportOptions) -> None:
        self.root = root
        self.options = options
        self.shapes: L.Shapes | None = None
        self.features: dict[str, dict[str, Any]] = {}
        self.schema: pa.Schema | None = None
        self.tasks: dict[str, int] = {}
        self.episodes = 0
        self.frames = 0
        self.stats = StatsAccumulator()
        self._data_roll = _Rolling(options.data_files_size_in_mb, options.chunks_size)
        self._data_sink: pa.OSFile | None = None
        self._data_writer: pq.ParquetWriter | None = None
        self._videos: dict[str, VideoFileWriter] = {}
        self._video_roll: dict[str, _Rolling] = {}
        self._video_first: dict[str, Path] = {}
        self._meta_roll = _Rolling(options.data_files_size_in_mb, options.chunks_size)
        self._meta_rows: list[dict[str, Any]] = []
        self._meta_writer: pq.ParquetWriter | None = None
        self._meta_sink: pa.OSFile | None = None

    # -- shapes ---------------------------------------------------------------------------------------------

    def _fix_shapes(self, rows: pa.Table, images: list[dict[str, tuple[int, int]]]) -> None:
        first = rows.slice(0, 1).to_pylist()[0]
        self.shapes = L.Shapes(state_dim=len(first["proprio"]), action_dim=len(first["action"]),
                               cameras=dict(sorted(images[0].items())))
        if not self.shapes.cameras:
            raise ExportError(f"episode {first['episode_id']} has no camera images")
        self.features = L.features_of(self.shapes)
        self.schema = L.data_schema(self.features)

    # -- one episode ----------------------------------------------------------------------------------------

    def add(self, rows: pa.Table) -> int:
        episode_id = rows.column("episode_id")[0].as_py()
        n = rows.num_rows
        frames_by_camera, sizes = self._camera_frames(rows.column("images").to_pylist(), episode_id)
        if self.shapes is None:
            self._fix_shapes(rows, [sizes])
        assert self.shapes is not None and self.schema is not None
        if sizes != dict(self.shapes.cameras):
            raise ExportError(f"episode {episode_id} has cameras {sizes}, the export {dict(self.shapes.cameras)} "
                              "(a LeRobot dataset has one set of cameras and sizes)")
        state = _vectors(rows.column("proprio"), self.shapes.state_dim, "proprio", episode_id)
        action = _vectors(rows.column("action"), self.shapes.action_dim, "action", episode_id)
        policy_action = _vectors(rows.column("policy_action"), self.shapes.action_dim, "policy_action", episode_id,
                                 nullable=True)
        instructions = rows.column("instruction").to_pylist()
        for text in dict.fromkeys(instructions):
            self.tasks.setdefault(text, len(self.tasks))
        fps = self.options.fps
        frame_index = np.arange(n, dtype=np.int64)
        columns: dict[str, Any] = {
            L.STATE: state, L.ACTION: action,
            "next.reward": _floats(rows.column("reward")),
            "next.done": frame_index == n - 1,
            "next.success": np.asarray(rows.column("success").to_pylist(), bool),
            L.INTERVENTION: np.asarray([c == "HUMAN" for c in rows.column("controller").to_pylist()], bool),
            "advantage": _floats(rows.column("advantage")),
            "value": _floats(rows.column("value")),
            "mc_return": _floats(rows.column("mc_return")),
            "env_reward": _floats(rows.column("env_reward")),
            "policy_version": rows.column("policy_version_text").to_pylist(),  # as the event said it: "12", "expert"
            "advantage_source": [s or "" for s in rows.column("advantage_source").to_pylist()],
            "step_index": np.asarray(rows.column("step_index").to_pylist(), np.int64),
            "event_time_us": np.asarray(rows.column("event_time_us").to_pylist(), np.int64),
            L.POLICY_ACTION: policy_action,
            "timestamp": (frame_index / fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(n, self.episodes, np.int64),
            "index": np.arange(self.frames, self.frames + n, dtype=np.int64),
            "task_index": np.asarray([self.tasks[t] for t in instructions], np.int64),
        }
        data_meta = self._write_data(columns, n)
        video_meta: dict[str, Any] = {}
        for camera, frames in frames_by_camera.items():
            video_meta.update(self._write_video(L.IMAGE_PREFIX + camera, frames))
        stats = self._stats(columns, frames_by_camera)
        self.stats.add(stats)
        first = rows.slice(0, 1).to_pylist()[0]
        self._add_meta({
            "episode_index": self.episodes,
            "tasks": list(dict.fromkeys(instructions)),
            "length": n,
            **data_meta,
            "dataset_from_index": self.frames,
            "dataset_to_index": self.frames + n,
            **video_meta,
            **episode_columns(stats),
            "sop/episode_id": episode_id, "sop/task": first["task"], "sop/actor_id": first["actor_id"],
            "sop/outcome": first["outcome"], "sop/episode_length": int(first["episode_length"]),
        })
        self.episodes += 1
        self.frames += n
        return n

    def _camera_frames(self, images: list[list[dict[str, Any]]], episode_id: str
                       ) -> tuple[dict[str, list[np.ndarray]], dict[str, tuple[int, int]]]:
        frames: dict[str, list[np.ndarray]] = {}
        for step, cams in enumerate(images):
            names = sorted(c["camera"] for c in cams)
            if step and names != sorted(frames):
                raise ExportError(f"episode {episode_id}: step {step} has cameras {names}, step 0 {sorted(frames)}")
            for cam in cams:
                frames.setdefault(cam["camera"], []).append(_rgb(cam["data"]))
        sizes = {}
        for camera, seq in sorted(frames.items()):
            shapes = {f.shape for f in seq}
            if len(shapes) != 1:
                raise ExportError(f"episode {episode_id}: camera {camera} changes size within the episode {shapes}")
            h, w, _ = seq[0].shape
            sizes[camera] = (h, w)
        return dict(sorted(frames.items())), sizes

    def _stats(self, columns: Mapping[str, Any], frames: Mapping[str, list[np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
        stats = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no advantage on demonstrations)
            for key, ft in self.features.items():
                if ft["dtype"] in ("string", "video"):
                    continue
                values = np.asarray(columns[key], np.float64)
                stats[key] = _nan_stats(values)
            for camera, seq in frames.items():
                picked = np.stack([seq[i] for i in sample_indices(len(seq))])
                stats[L.IMAGE_PREFIX + camera] = image_stats(picked)
        return stats

    # -- files ----------------------------------------------------------------------------------------------

    def _write_data(self, columns: Mapping[str, Any], n: int) -> dict[str, Any]:
        assert self.schema is not None
        roll = self._data_roll
        if self._data_writer is not None and roll.full(self._data_sink.tell(), n):  # type: ignore[union-attr]
            self._close_data()
            roll.advance()
        if self._data_writer is None:
            path = self.root / L.DATA_PATH.format(chunk_index=roll.chunk, file_index=roll.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._data_sink = pa.OSFile(str(path), "wb")
            self._data_writer = pq.ParquetWriter(self._data_sink, self.schema, compression="snappy",
                                                 use_dictionary=True)
        arrays = []
        for f in self.schema:
            value = columns[f.name]
            if pa.types.is_fixed_size_list(f.type):
                flat = pa.array(np.ascontiguousarray(value, np.float32).reshape(-1))
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, f.type.list_size))
            else:
                arrays.append(pa.array(value, f.type))
        self._data_writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=max(n, 1))
        roll.frames_in_file += n
        return {"data/chunk_index": roll.chunk, "data/file_index": roll.file}

    def _close_data(self) -> None:
        if self._data_writer is not None:
            self._data_writer.close()
            self._data_sink.close()  # type: ignore[union-attr]
            self._data_writer = self._data_sink = None

    def _write_video(self, key: str, frames: list[np.ndarray]) -> dict[str, Any]:
        roll = self._video_roll.setdefault(key, _Rolling(self.options.video_files_size_in_mb, self.options.chunks_size))
        writer = self._videos.get(key)
        if writer is not None and roll.full(writer.size_bytes, len(frames)):
            writer.close()
            roll.advance()
            writer = None
        if writer is None:
            path = self.root / L.VIDEO_PATH.format(video_key=key, chunk_index=roll.chunk, file_index=roll.file)
            h, w, _ = frames[0].shape
            writer = VideoFileWriter(path, fps=self.options.fps, width=w, height=h, codec=self.options.codec)
            self._videos[key] = writer
            self._video_first.setdefault(key, path)
        start = writer.frames
        for frame in frames:
            writer.add(frame)
        roll.frames_in_file += len(frames)
        fps = self.options.fps
        return {f"videos/{key}/chunk_index": roll.chunk, f"videos/{key}/file_index": roll.file,
                f"videos/{key}/from_timestamp": start / fps, f"videos/{key}/to_timestamp": writer.frames / fps}

    def _add_meta(self, row: dict[str, Any]) -> None:
        self._meta_rows.append(row)
        if len(self._meta_rows) >= self.options.episodes_per_meta_write:
            self._flush_meta()

    def _flush_meta(self) -> None:
        if not self._meta_rows:
            return
        roll = self._meta_roll
        n = len(self._meta_rows)
        if self._meta_writer is not None and roll.full(self._meta_sink.tell(), n):  # type: ignore[union-attr]
            self._meta_writer.close()
            self._meta_sink.close()  # type: ignore[union-attr]
            self._meta_writer = self._meta_sink = None
            roll.advance()
        for row in self._meta_rows:
            row["meta/episodes/chunk_index"], row["meta/episodes/file_index"] = roll.chunk, roll.file
        if self._meta_writer is None:
            table = pa.Table.from_pylist(self._meta_rows)
            path = self.root / L.EPISODES_PATH.format(chunk_index=roll.chunk, file_index=roll.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._meta_sink = pa.OSFile(str(path), "wb")
            self._meta_writer = pq.ParquetWriter(self._meta_sink, table.schema, compression="snappy")
        else:
            table = pa.Table.from_pylist(self._meta_rows, schema=self._meta_writer.schema)
        self._meta_writer.write_table(table)
        roll.frames_in_file += n
        self._meta_rows = []

    def abort(self) -> None:
        """Close whatever is open after a failure (the folder is then removed)."""
        for close in [w.close for w in self._videos.values()] + [self._close_data]:
            with contextlib.suppress(Exception):  # already failing: the first error is the one to report
                close()
        self._videos.clear()

    def finish(self) -> tuple[int, int]:
        """Close every file and write info.json, stats.json and tasks.parquet; returns (data files, video files)."""
        self._close_data()
        self._flush_meta()
        if self._meta_writer is not None:
            self._meta_writer.close()
            self._meta_sink.close()  # type: ignore[union-attr]
        for writer in self._videos.values():
            writer.close()
        infos = {key: video_info(path, self.options.codec) for key, path in self._video_first.items()}
        assert self.shapes is not None
        features = L.features_of(self.shapes, infos)
        info = L.info_json(fps=self.options.fps, features=features, total_episodes=self.episodes,
                           total_frames=self.frames, total_tasks=len(self.tasks), chunks_size=self.options.chunks_size,
                           data_files_size_in_mb=self.options.data_files_size_in_mb,
                           video_files_size_in_mb=self.options.video_files_size_in_mb,
                           robot_type=self.options.robot_type, has_video=bool(infos))
        (self.root / L.INFO_PATH).parent.mkdir(parents=True, exist_ok=True)
        (self.root / L.INFO_PATH).write_text(json.dumps(info, indent=4))
        (self.root / L.STATS_PATH).write_text(json.dumps(to_json(self.stats.result()), indent=4))
        L.write_tasks(self.root, list(self.tasks))
        return self._data_roll.files, sum(r.files for r in self._video_roll.values())


def _nan_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`vector_stats` ignoring NaN (SOP's nulls); an all-NaN column gets NaN statistics."""
    if not np.isnan(values).any():
        return vector_stats(values)
    array = values[:, None] if values.ndim == 1 else values
    quantiles = np.nanquantile(array, QUANTILES, axis=0)
    out = {"min": np.nanmin(array, axis=0), "max": np.nanmax(array, axis=0), "mean": np.nanmean(array, axis=0),
           "std": np.nanstd(array, axis=0), "count": np.array([array.shape[0]])}
    out.update({k: quantiles[i] for i, k in enumerate(QUANTILE_KEYS)})
    return out


def export_lerobot(lake: Lakehouse, out: Path, *, table: str = "steps", where: str | None = None,
                   options: ExportOptions | None = None, overwrite: bool = False,
                   on_plan: Callable[[Plan], None] | None = None,
                   on_episode: Callable[[int], None] | None = None) -> ExportReport:
    """Write the episodes of ``table`` matching ``where`` as a LeRobotDataset v3.0 at ``out``.

    ``on_plan(plan)`` is called once the episodes are counted, ``on_episode(frames)`` after each one (progress).
    """
    options = options or ExportOptions()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: pick another folder or overwrite it")
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its whole configuration per file otherwise
    started = time.perf_counter()
    plan, dataset = plan_export(lake, table, where)
    if not plan.counts:
        raise ExportError(f"no rows of {table} match {where!r}" if where else f"{table} is empty")
    if on_plan is not None:
        on_plan(plan)
    missing = [c for c in _NEEDED if c not in dataset.schema.names]
    if missing:
        raise ExportError(f"{table} lacks column(s) {missing}")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    writer: _DatasetWriter | None = None
    try:
        writer = _DatasetWriter(work, options)
        for episode in _episodes(dataset, plan, where, options.batch_rows):
            frames = writer.add(episode)
            if on_episode is not None:
                on_episode(frames)
        data_files, video_files = writer.finish()
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    except BaseException:
        if writer is not None:
            writer.abort()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ExportReport(root=out, table=table, table_version=plan.version, episodes=writer.episodes,
                        frames=writer.frames, tasks=len(writer.tasks), data_files=data_files,
                        video_files=video_files, seconds=time.perf_counter() - started)
