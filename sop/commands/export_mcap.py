"""`sop export mcap EPISODE_ID… --out FILE.mcap | DIR`: stored episodes as MCAP files for Foxglove.

    sop export mcap actor-01-3f2a1b9c-000004 --out episode.mcap
    sop export mcap --where "outcome = 'TIMEOUT'" --limit 10 --out timeouts/     # one file per episode

Topics and schemas: :mod:`views.mcap_export` (``foxglove.CompressedImage`` per camera, state / action / rewards
and the interventions as JSON, a ``foxglove.Log`` of the takeovers).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from sop.commands.view import episode_options, open_episodes


def file_name(episode_id: str) -> str:
    """An episode id as a file name (``demo:reach-v3:0`` -> ``demo_reach-v3_0.mcap``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", episode_id) + ".mcap"


@click.command("mcap")
@click.argument("episode_ids", nargs=-1)
@episode_options
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="The .mcap file (one episode) or a directory (one file per episode).")
@click.option("--compression", type=click.Choice(["zstd", "lz4", "none"]), default="zstd", show_default=True)
def command(episode_ids: tuple[str, ...], where: str | None, table: str | None, limit: int, out: Path,
            compression: str) -> None:
    """Write episodes as MCAP: camera images, state, action vs proposal, rewards, interventions."""
    from views.mcap_export import write_mcap

    episodes = open_episodes(episode_ids, where, table, limit)
    to_dir = out.is_dir() or out.suffix != ".mcap"
    if len(episodes) > 1 and not to_dir:
        raise click.UsageError(f"{len(episodes)} episodes: give --out a directory (one .mcap per episode)")
    console = Console(stderr=True)
    written = []
    with Progress(TextColumn("[bold]mcap"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=console, transient=True) as progress:
        for episode in episodes:
            bar = progress.add_task(episode.episode_id, total=episode.num_steps)
            path = out / file_name(episode.episode_id) if to_dir else out
            written.append(write_mcap(episode, path, compression=compression,
                                      progress=lambda n, bar=bar: progress.update(bar, completed=n)))
    for path in written:
        console.print(f"wrote {path} ({path.stat().st_size / 2**20:,.2f} MiB)")
