"""`sop export lerobot --out DIR`: a table's episodes as a LeRobotDataset v3.0 (lerobot's own layout; load it with
``LeRobotDataset(repo_id, root=DIR)``); the column mapping is in ``bridges/lerobot/layout.py``.

    sop export lerobot --out datasets/sop-demos --table demonstrations
    sop export lerobot --out datasets/successes --where "outcome = 'SUCCESS' AND task = 'drawer-open-v3'" --fps 30
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sop.settings import load_settings


@click.command("lerobot")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The dataset folder to write (new or empty; --overwrite replaces one).")
@click.option("--table", type=click.Choice(["steps", "demonstrations"]), default="steps", show_default=True)
@click.option("--where", default=None, help="SQL predicate over the table's columns, e.g. \"outcome = 'SUCCESS'\".")
@click.option("--fps", default=30, show_default=True, help="Frame rate: frame k of an episode is at k / fps.")
@click.option("--vcodec", type=click.Choice(["libsvtav1", "h264", "hevc"]), default="libsvtav1", show_default=True,
              help="Video codec (LeRobot's default is libsvtav1).")
@click.option("--crf", default=30, show_default=True, help="Video quality (lower = better, larger).")
@click.option("--robot-type", default=None, help="robot_type in meta/info.json.")
@click.option("--data-file-mb", default=100.0, show_default=True, help="A data Parquet file's size limit.")
@click.option("--video-file-mb", default=200.0, show_default=True, help="A video file's size limit.")
@click.option("--overwrite", is_flag=True, help="Replace an existing dataset at --out.")
def command(out: Path, table: str, where: str | None, fps: int, vcodec: str, crf: int, robot_type: str | None,
                data_file_mb: float, video_file_mb: float, overwrite: bool) -> None:
    """A LeRobotDataset v3.0: meta/, data/ Parquet, one MP4 per camera."""
    from bridges.lerobot import ExportError, ExportOptions, VideoCodec, VideoError, export_lerobot
    from bridges.lerobot.export import Plan
    from lakehouse import Lakehouse, LakehouseError

    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    console = Console()
    try:
        options = ExportOptions(fps=fps, codec=VideoCodec(vcodec=vcodec, crf=crf), robot_type=robot_type,
                                data_files_size_in_mb=data_file_mb, video_files_size_in_mb=video_file_mb)
        with Progress(TextColumn("[bold]export[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("frames · {task.fields[episodes]} episodes"), TimeElapsedColumn(),
                      TimeRemainingColumn(), console=console) as progress:
            bar = progress.add_task(table, total=None, episodes=0)
            done = {"episodes": 0}

            def planned(plan: Plan) -> None:
                progress.update(bar, total=plan.frames)

            def advance(frames: int) -> None:
                done["episodes"] += 1
                progress.update(bar, advance=frames, episodes=done["episodes"])

            report = export_lerobot(lake, out, table=table, where=where, options=options, overwrite=overwrite,
                                    on_plan=planned, on_episode=advance)
    except (ExportError, VideoError, LakehouseError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"{report.table} (Delta version {report.table_version}) → {report.root}: {report.episodes} episodes, "
                  f"{report.frames:,} frames, {report.tasks} tasks, {report.data_files} data file(s), "
                  f"{report.video_files} video file(s); {report.frames_per_s:,.0f} frames/s")
