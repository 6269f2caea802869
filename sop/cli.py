"""``sop``: one entry point, one verb per module of :mod:`sop.commands`."""

from __future__ import annotations

import importlib
import sys

import click

from sop.settings import SettingsError

# verb -> module in sop.commands (each defines a click command called `command`)
VERBS = {
    "up": "up", "down": "down", "status": "status", "loadgen": "loadgen", "run": "run", "process": "process",
}


class LazyGroup(click.Group):
    """Imports a verb's module only when it runs, so `sop status` does not pay for torch."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        return importlib.import_module(f"sop.commands.{VERBS[name]}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """SOP: scalable online post-training of robot policies (Kafka → faust → Delta → learner → MLflow → robots)."""


def main() -> None:
    try:
        cli(standalone_mode=False)
    except SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
