"""The LeRobot v3.0 pieces on their own: statistics as lerobot aggregates them, file roll-over, the data schema
``datasets`` reads, MP4 frames found again at k / fps, and the CLI's task map."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pytest

from bridges.lerobot import layout as L
from bridges.lerobot.stats import StatsAccumulator, image_stats, sample_indices, vector_stats
from bridges.lerobot.video import FrameReader, VideoCodec, VideoError, VideoFileWriter, video_info
from sop.commands.import_data import parse_task_map


def test_aggregated_statistics_equal_those_of_all_frames_together() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(i, 1 + i, (n, 3)) for i, n in enumerate((5, 40, 17))]
    acc = StatsAccumulator()
    for p in parts:
        acc.add({"x": vector_stats(p)})
    got, whole = acc.result()["x"], vector_stats(np.concatenate(parts))
    for key in ("min", "max", "mean", "std"):
        assert np.allclose(got[key], whole[key]), key
    assert got["count"].tolist() == [62]
    weights = np.array([5, 40, 17]) / 62  # quantiles: count-weighted, as lerobot's aggregate_stats
    assert np.allclose(got["q50"], sum(w * np.quantile(p, 0.5, axis=0) for w, p in zip(weights, parts, strict=True)))


def test_image_statistics_are_per_channel_in_unit_range() -> None:
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[..., 0] = 255
    frames[..., 2] = np.arange(8, dtype=np.uint8)[None, :, None] * 10
    stats = image_stats(frames)
    assert stats["mean"].shape == (3, 1, 1) and stats["count"].tolist() == [4]
    assert stats["mean"][:, 0, 0].tolist() == pytest.approx([1.0, 0.0, 35 / 255])
    assert stats["max"][2, 0, 0] == pytest.approx(70 / 255)
    assert sample_indices(50) == list(range(50)) and len(sample_indices(1000)) == 177  # lerobot's heuristic


def test_files_roll_to_the_next_chunk_after_chunks_size_files() -> None:
    assert L.chunk_file_after(0, 0, 3) == (0, 1)
    assert L.chunk_file_after(0, 2, 3) == (1, 0)
    assert L.DATA_PATH.format(chunk_index=1, file_index=12) == "data/chunk-001/file-012.parquet"
    assert L.VIDEO_PATH.format(video_key="observation.images.corner", chunk_index=0, file_index=0) == \
        "videos/observation.images.corner/chunk-000/file-000.mp4"


def test_the_data_schema_is_what_datasets_writes() -> None:
    features = L.features_of(L.Shapes(state_dim=3, action_dim=2, cameras={"corner": (4, 6)}))
    assert features["observation.images.corner"]["shape"] == [4, 6, 3]
    assert list(features)[-5:] == ["timestamp", "frame_index", "episode_index", "index", "task_index"]
    schema = L.data_schema(features)
    assert "observation.images.corner" not in schema.names
    assert schema.field("observation.state").type == pa.list_(pa.field("element", pa.float32()), 3)
    hf = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert hf["action"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 2, "_type": "List"}
    assert hf["next.done"] == {"dtype": "bool", "_type": "Value"} and hf["policy_version"]["dtype"] == "string"


def test_video_frames_are_found_again_at_k_over_fps(tmp_path: Path) -> None:
    frames = [np.full((16, 24, 3), 12 * k, np.uint8) for k in range(20)]
    path = tmp_path / "v.mp4"
    with VideoFileWriter(path, fps=10, width=24, height=16, codec=VideoCodec(vcodec="h264", crf=18)) as video:
        for f in frames:
            video.add(f)
    reader = FrameReader(path, fps=10)
    got = [reader.at(k / 10).astype(int) for k in range(20)]
    assert all(np.abs(g - f).mean() < 3 for g, f in zip(got, frames, strict=True))
    with pytest.raises(VideoError, match="no frame at"):
        reader.at(2.5)
    info = video_info(path, VideoCodec(vcodec="h264"))
    assert (info["video.codec"], info["video.fps"], info["video.width"], info["is_depth_map"]) == ("h264", 10, 24, False)
    with pytest.raises(VideoError, match="even"):
        VideoFileWriter(tmp_path / "odd.mp4", fps=10, width=15, height=16, codec=VideoCodec())


def test_task_maps_come_as_pairs_or_json(tmp_path: Path) -> None:
    file = tmp_path / "tasks.json"
    file.write_text(json.dumps({"close the box": "box-close-v3", "a=b": "c"}))
    got = parse_task_map(("open the drawer=drawer-open-v3", str(file), "a=b=d"))
    assert got == {"open the drawer": "drawer-open-v3", "close the box": "box-close-v3", "a=b": "d"}
    with pytest.raises(click.BadParameter):
        parse_task_map(("no separator",))


def test_image_statistics_from_histograms_equal_those_of_the_pixels() -> None:
    frames = np.random.default_rng(1).integers(0, 256, (7, 10, 12, 3)).astype(np.uint8)
    frames[..., 1] //= 3
    fast = image_stats(frames)
    plain = vector_stats(frames.reshape(-1, 3).astype(np.float64) / 255.0)
    for key, value in plain.items():
        if key != "count":
            assert np.allclose(fast[key][:, 0, 0], value), key
