"""`sop import lerobot DIR`: another tool's dataset into the Delta ``demonstrations`` table, exactly once.

    sop import lerobot datasets/their-demos
    sop import lerobot datasets/their-demos --task-map "open the drawer=drawer-open-v3" --task-map tasks.json

Every episode is one Delta commit with its own application transaction, so a second import (or an import
of an export of this lakehouse) adds nothing. ``--task-map`` names SOP's task for a LeRobot task text
(``TEXT=TASK``, or a JSON file ``{"TEXT": "TASK"}``); unmapped texts become the task name as they are.
"""

from __future__ import annotations

import json
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


def parse_task_map(items: tuple[str, ...]) -> dict[str, str]:
    """``TEXT=TASK`` pairs and JSON files of them, later ones winning."""
    out: dict[str, str] = {}
    for item in items:
        path = Path(item)
        if "=" not in item and path.suffix == ".json":
            if not path.exists():
                raise click.BadParameter(f"{item}: no such file", param_hint="--task-map")
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                raise click.BadParameter(f"{item}: needs a JSON object {{\"task text\": \"sop-task\"}}",
                                         param_hint="--task-map")
            out.update({str(k): v for k, v in loaded.items()})
            continue
        text, sep, task = item.rpartition("=")
        if not sep or not text or not task:
            raise click.BadParameter(f"{item!r}: use TEXT=TASK or a .json file", param_hint="--task-map")
        out[text] = task
    return out


@click.group("import")
def command() -> None:
    """Read other tools' datasets into SOP's offline data (the demonstrations table)."""


@command.command("lerobot")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--task-map", "task_map", multiple=True, help="TEXT=TASK or a JSON file (repeatable).")
@click.option("--dataset-id", default=None, help="Names the episodes lerobot:<id>:<index> [default: the folder name].")
@click.option("--image-encoding", type=click.Choice(["jpeg", "png"]), default="jpeg", show_default=True,
              help="How decoded video frames are stored.")
def lerobot_cmd(root: Path, task_map: tuple[str, ...], dataset_id: str | None, image_encoding: str) -> None:
    """A LeRobotDataset v3.0 folder (videos decoded) into demonstrations."""
    from bridges.lerobot import LayoutError, VideoError, import_lerobot
    from lakehouse import Lakehouse, LakehouseError
    from rewards.config import RecapConfig

    mapping = parse_task_map(task_map)
    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    recap = RecapConfig(max_episode_length=settings.max_episode_steps, c_fail=settings.recap_c_fail)
    console = Console()
    try:
        with Progress(TextColumn("[bold]import[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("frames · {task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console) as progress:
            bar = progress.add_task(root.name, total=None, note="")
            seen = {"written": 0, "skipped": 0}

            def planned(_episodes: int, frames: int) -> None:
                progress.update(bar, total=frames)

            def advance(frames: int, written: bool) -> None:
                seen["written" if written else "skipped"] += 1
                progress.update(bar, advance=frames, note=f"{seen['written']} written · {seen['skipped']} skipped")

            report = import_lerobot(lake, root, task_map=mapping, dataset_id=dataset_id, recap=recap,
                                    image_encoding=image_encoding, on_plan=planned, on_episode=advance)
    except (LayoutError, VideoError, LakehouseError) as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"{root} → demonstrations: wrote {report.episodes_written} episode(s) ({report.rows_written:,} rows), "
                  f"skipped {report.episodes_skipped} already there; {report.frames_per_s:,.0f} frames/s decoded "
                  f"and written; at {settings.lake_root}")
