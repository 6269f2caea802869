"""`sop view EPISODE_ID… [--where COND] [--save out.rrd | --spawn | --connect URL]`: stored episodes in Rerun.

    sop view actor-01-3f2a1b9c-000004                       # opens a Rerun viewer with the episode
    sop view --where "task = 'drawer-open-v3' AND outcome = 'TIMEOUT'" --limit 5 --save timeouts.rrd
    rerun timeouts.rrd                                      # one recording per episode

Every camera image, the state, the executed action against the policy's proposal, who was in control, the
takeover spans, reward / return / value / advantage and the policy version, on the ``frame`` (step index)
and ``time`` timelines (:mod:`views.rerun_log`).
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from lakehouse import Lakehouse, LakehouseError
from sop.settings import load_settings
from views import EpisodeNotFoundError, load_episodes


def open_episodes(episode_ids: tuple[str, ...], where: str | None, table: str | None, limit: int) -> list:
    """The episodes asked for on the command line, from the lake of the settings (errors as click errors)."""
    if not episode_ids and not where:
        raise click.UsageError("name one or more EPISODE_IDs, or select them with --where")
    settings = load_settings()
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    try:
        return load_episodes(lake, episode_ids, where=where, table=table, limit=limit)
    except (EpisodeNotFoundError, LakehouseError) as exc:
        raise click.ClickException(str(exc)) from None


def episode_options(command: click.Command) -> click.Command:
    for option in reversed([
        click.option("--where", default=None, help="SQL condition on the step table, e.g. \"task = 'reach-v3'\"."),
        click.option("--table", type=click.Choice(["steps", "demonstrations"]), default=None,
                     help="Step table to read [default: steps, then demonstrations]."),
        click.option("--limit", default=20, show_default=True, help="At most this many episodes (with --where)."),
    ]):
        command = option(command)
    return command


@click.command("view")
@click.argument("episode_ids", nargs=-1)
@episode_options
@click.option("--save", "save", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write an .rrd file (one recording per episode) instead of opening a viewer.")
@click.option("--spawn", is_flag=True, help="Start a Rerun viewer and stream to it (the default; needs a display).")
@click.option("--connect", "url", default=None,
              help="Stream to a running viewer or Rerun gRPC server (`rerun --serve-grpc`), e.g. "
                   "rerun+http://127.0.0.1:9876/proxy.")
def command(episode_ids: tuple[str, ...], where: str | None, table: str | None, limit: int, save: Path | None,
            spawn: bool, url: str | None) -> None:
    """Show stored episodes in Rerun: cameras, state, executed vs proposed action, takeovers, rewards."""
    if sum(bool(x) for x in (save, spawn, url)) > 1:
        raise click.UsageError("give one of --save, --spawn, --connect")
    from views.rerun_log import ViewerUnavailableError, spawn_problem, stream_to_viewer, write_rrd

    if not episode_ids and not where:
        raise click.UsageError("name one or more EPISODE_IDs, or select them with --where")
    if save is None and url is None:  # --spawn, or no choice (the same)
        problem = spawn_problem()
        if problem:
            raise click.ClickException(f"cannot open a Rerun viewer here: {problem}. Instead: --save FILE.rrd "
                                       "(then `rerun FILE.rrd` where there is a display), or --connect URL to a viewer "
                                       "or `rerun --serve-grpc` running elsewhere")
    episodes = open_episodes(episode_ids, where, table, limit)
    console = Console(stderr=True)
    with Progress(TextColumn("[bold]rerun"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  console=console, transient=True) as progress:
        bar = progress.add_task("", total=len(episodes))

        def done(episode) -> None:  # noqa: ANN001
            progress.update(bar, advance=1, description=episode.episode_id)

        if save is not None:
            write_rrd(episodes, save, progress=done)
        else:
            try:
                stream_to_viewer(episodes, spawn=url is None, url=url, progress=done)
            except ViewerUnavailableError as exc:
                raise click.ClickException(f"{exc}. Is a viewer (`rerun`) or a server (`rerun --serve-grpc`) "
                                           "listening there?") from None
    steps = sum(e.num_steps for e in episodes)
    where_to = f"wrote {save} ({save.stat().st_size / 2**20:,.1f} MiB); open it with `rerun {save}`" if save else \
        f"sent to the viewer at {url}" if url else "sent to the spawned viewer"
    console.print(f"{len(episodes)} episode(s), {steps:,} steps: {where_to}")
