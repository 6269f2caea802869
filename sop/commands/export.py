"""`sop export FORMAT …`: stored episodes written in other tools' formats, one sub-verb per format.

    sop export mcap EPISODE_ID --out episode.mcap          # Foxglove (sop/commands/export_mcap.py)
    sop export lerobot --out datasets/sop-demos            # LeRobotDataset v3.0 (sop/commands/export_lerobot.py)

Each format is its own module in :mod:`sop.commands` defining a click command called ``command``; add a
format by adding its module to ``FORMATS``.
"""

from __future__ import annotations

import importlib

import click

# sub-verb -> module in sop.commands (imported only when that format runs)
FORMATS = {
    "lerobot": "export_lerobot",
    "mcap": "export_mcap",
}


class LazyFormats(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(FORMATS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in FORMATS:
            return None
        return importlib.import_module(f"sop.commands.{FORMATS[name]}").command


@click.group("export", cls=LazyFormats)
def command() -> None:
    """Write stored episodes for other tools (LeRobot, Foxglove …)."""
