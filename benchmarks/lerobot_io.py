"""LeRobotDataset v3.0 export and import speed (frames/s) over demonstrations of the default suite.

    .venv/bin/python -m benchmarks.lerobot_io --episodes 1000                   # synthetic demonstrations
    .venv/bin/python -m benchmarks.lerobot_io --episodes 100 --source sim        # real scripted-expert episodes
    .venv/bin/python -m benchmarks.lerobot_io --episodes 1000 --lake /tmp/bench-lake   # keep / reuse the demos

The ``demonstrations`` table is filled first (not timed): ``synthetic`` writes episodes shaped like the expert's
(the default suite's four tasks, 39-d state, 4-d action, one 64x64 JPEG camera, 45-150 steps) with frames drawn
from a pool of JPEGs, so consecutive frames differ: video coding's worst case; ``sim`` runs the real scripted
experts in MetaWorld with rendering (``sop demos``' writer), whose frames change smoothly. Then, timed:

- ``read``: the floor: every row read from Delta and every JPEG decoded (what an export cannot avoid);
- ``export``: ``sop export lerobot``'s code over the whole table (plan, read, decode, encode AV1, stats, files);
- ``import``: ``sop import lerobot``'s code of that dataset into a fresh lakehouse (decode AV1, encode JPEG,
  one Delta commit per episode).

Prints frames/s of each and export/read, and checks the import wrote every frame once.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bridges.lerobot import ExportOptions, VideoCodec, export_lerobot, import_lerobot
from lakehouse import Lakehouse, snapshot_batches
from learner.synthetic import synthetic_episode, write_rows
from schemas.images import jpeg_pool

SUITE = ("pick-place-v3", "assembly-v3", "drawer-open-v3", "box-close-v3")


def fill_synthetic(lake: Lakehouse, episodes: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    frames = jpeg_pool(64, 64, seed)
    batch: list[dict] = []
    for i in range(episodes):
        task = SUITE[i % len(SUITE)]
        batch += synthetic_episode(task, int(rng.integers(45, 151)), rng, episode_id=f"demo:{task}:{i}", demo=True,
                                   frames=frames)
        if len(batch) > 20_000 or i == episodes - 1:
            write_rows(lake, "demonstrations", batch, app_id_prefix="bench-lerobot")
            batch = []


def fill_sim(lake: Lakehouse, episodes: int) -> None:
    from sim.demos_io import make_demonstrations

    per_task = max(1, episodes // len(SUITE))
    make_demonstrations(lake, episodes_per_task=per_task, tasks=SUITE, progress=True)


def read_floor(lake: Lakehouse) -> tuple[int, float]:
    from PIL import Image

    start = time.perf_counter()
    batches, _ = snapshot_batches(lake.table("demonstrations"), batch_size=1024)
    frames = 0
    for batch in batches:
        for cams in batch.column("images").to_pylist():
            for cam in cams:
                with Image.open(io.BytesIO(cam["data"])) as img:
                    np.asarray(img.convert("RGB"))
            frames += 1
    return frames, time.perf_counter() - start


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--source", choices=("synthetic", "sim"), default="synthetic")
    parser.add_argument("--lake", type=Path, default=None, help="Keep the demonstrations here (reused when present).")
    parser.add_argument("--vcodec", choices=("libsvtav1", "h264", "hevc"), default="libsvtav1")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-lerobot-"))
    try:
        lake = Lakehouse(args.lake or work / "lake")
        if not lake.exists("demonstrations") or lake.table("demonstrations").to_pyarrow_dataset().count_rows() == 0:
            t = time.perf_counter()
            (fill_sim if args.source == "sim" else fill_synthetic)(lake, args.episodes)
            print(f"filled demonstrations ({args.source}) in {time.perf_counter() - t:.0f} s")
        frames, read_s = read_floor(lake)
        print(f"read    {frames:>8,} frames in {read_s:7.1f} s  {frames / read_s:8,.0f} frames/s  (Delta rows + JPEG decode)")
        out = work / "dataset"
        exported = export_lerobot(lake, out, table="demonstrations",
                                  options=ExportOptions(codec=VideoCodec(vcodec=args.vcodec)))
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"export  {exported.frames:>8,} frames in {exported.seconds:7.1f} s  {exported.frames_per_s:8,.0f} frames/s  "
              f"({exported.episodes} episodes, {size / 1e6:.1f} MB, {args.vcodec}); export/read "
              f"{exported.frames_per_s / (frames / read_s):.2f}")
        target = Lakehouse(work / "target")
        imported = import_lerobot(target, out)
        print(f"import  {imported.frames_read:>8,} frames in {imported.seconds:7.1f} s  {imported.frames_per_s:8,.0f} frames/s  "
              f"({imported.episodes_written} episodes, {len(imported.versions)} commits)")
        stored = target.table("demonstrations").to_pyarrow_dataset().count_rows()
        ok = stored == imported.rows_written == exported.frames == frames
        print(f"rows: source {frames:,}, exported {exported.frames:,}, imported {stored:,}: {'ok' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
