"""Episodes saved as .rrd and read back with rerun's own dataframe API (RrdReader → ChunkStore.reader, DataFusion)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import rerun.chunk as rc
from view_samples import DEMO, ONLINE, SECOND, STEP_US, T0_US, TAKEOVER

from lakehouse import Lakehouse
from views import load_episodes, write_rrd


def frame_table(path: Path, recording_id: str | None = None, index: str | None = "frame",
                contents: str | None = None) -> pa.Table:
    reader = rc.RrdReader(path)
    (store,) = [s for s in reader.recordings() if recording_id is None or s.recording_id == recording_id]
    table = reader.stream(store=store).collect().reader(index=index, contents=contents).to_arrow_table()
    return table.sort_by(index) if index else table


def column(table: pa.Table, entity: str, component: str) -> list:
    return table.column(f"/{entity}:{component}").to_pylist()


def texts(table: pa.Table) -> list[tuple[int, str]]:
    """Every event logged, as (frame, text)."""
    return sorted((f, text) for f, v in zip(table.column("frame").to_pylist(), column(table, "events", "TextLog:text"),
                                            strict=True) for text in v or ())


def per_frame(table: pa.Table, entity: str, component: str = "Scalars:scalars") -> dict[int, list]:
    return {f: v for f, v in zip(table.column("frame").to_pylist(), column(table, entity, component), strict=True)
            if v is not None}


def test_an_episode_reads_back_step_for_step(sample_lake: Lakehouse, tmp_path: Path) -> None:
    (episode,) = load_episodes(sample_lake, [ONLINE])
    path = write_rrd([episode], tmp_path / "one.rrd")
    table = frame_table(path)
    assert table.column("frame").to_pylist() == list(range(30))
    # the time timeline: when each step executed (images: when the frame was exposed, 5 ms earlier)
    times_us = [t // 1000 for t in pa.compute.cast(table.column("time"), pa.int64()).to_pylist()]  # ns
    assert times_us[1] in (T0_US + STEP_US, T0_US + STEP_US - 5_000)

    for camera in ("corner", "wrist"):
        blobs = per_frame(table, f"cameras/{camera}", "EncodedImage:blob")
        assert sorted(blobs) == list(range(30))
        stored = next(i["data"] for i in episode.steps[4]["images"] if i["camera"] == camera)
        assert bytes(blobs[4][0]) == stored  # the JPEG as stored, not re-encoded
        assert per_frame(table, f"cameras/{camera}", "EncodedImage:media_type")[4] == ["image/jpeg"]

    executed, proposed = per_frame(table, "action/0/executed"), per_frame(table, "action/0/proposed")
    assert len(executed) == len(proposed) == 30
    human_steps = range(*TAKEOVER)
    for i in range(30):
        assert np.isclose(proposed[i][0], 0.1 * i)
        assert np.isclose(executed[i][0], 0.5 if i in human_steps else 0.1 * i)
    assert [v[0] for v in per_frame(table, "control/human").values()] == [float(i in human_steps) for i in range(30)]
    assert [v[0] for v in per_frame(table, "control/takeover").values()] == [float(i in human_steps) for i in range(30)]
    assert np.allclose([v[0] for v in per_frame(table, "rewards/reward").values()], episode.scalars("reward"))
    assert np.allclose([v[0] for v in per_frame(table, "rewards/return/advantage").values()],
                       episode.scalars("advantage"))
    assert np.allclose([v[0] for v in per_frame(table, "rewards/return/value").values()], episode.scalars("value"))
    assert len(per_frame(table, "state/proprio")[3]) == 6

    assert texts(table) == [(0, "policy version 3"), (TAKEOVER[0], "takeover by teleop-anna: divergence"),
                            (TAKEOVER[1], "handed back: on-track"), (29, "episode ended: SUCCESS (closed by end_event)")]

    static = frame_table(path, index=None, contents="/__properties/**")
    props = {name.split(":")[-1]: static.column(name).to_pylist()[0] for name in static.column_names
             if name.startswith("property:episode:")}
    assert static.column("property:RecordingInfo:name").to_pylist()[0] == [f"drawer-open-v3 · {ONLINE}"]
    assert props["task"] == ["drawer-open-v3"] and props["outcome"] == ["SUCCESS"]
    assert props["policy_versions"] == ["3"] and props["table"] == ["steps"]


def test_several_episodes_are_one_recording_each_in_one_file(sample_lake: Lakehouse, tmp_path: Path) -> None:
    episodes = load_episodes(sample_lake, [SECOND, DEMO])
    path = write_rrd(episodes, tmp_path / "many.rrd")
    assert sorted(s.recording_id for s in rc.RrdReader(path).recordings()) == sorted([SECOND, DEMO])
    demo = frame_table(path, DEMO)
    assert demo.num_rows == 10 and "/control/takeover:Scalars:scalars" not in demo.column_names
    assert [v[0] for v in per_frame(demo, "control/human").values()] == [1.0] * 10
    assert texts(demo) == [(0, "policy version 3 · human drives"), (9, "episode ended: SUCCESS")]
    second = frame_table(path, SECOND)
    assert sorted(per_frame(second, "cameras/corner", "EncodedImage:blob")) == list(range(12))
    assert "/cameras/wrist:EncodedImage:blob" not in second.column_names
