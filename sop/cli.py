"""``sop``: one entry point, one verb per module of :mod:`sop.commands`."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from sop.environment import check_environment
from sop.processes import exit_with_parent
from sop.settings import SettingsError

# verb -> module in sop.commands (each defines a click command called `command`)
VERBS = {
    # stack
    "up": "up", "down": "down", "status": "status", "kafka": "kafka", "robot": "robot",
    # robots
    "loadgen": "loadgen", "actor": "actor", "fleet": "fleet", "demos": "demos",
    # stream processing and lakehouse
    "process": "process", "sql": "sql", "lake": "lake", "replay": "replay",
    # other tools' dataset formats
    "export": "export", "import": "import_data",
    # learner and registry
    "learn": "learn", "pretrain": "pretrain", "train-value": "train_value", "promote": "promote",
    "rollback": "rollback", "registry": "registry",
    # the whole loop
    "run": "run", "eval": "eval",
    # the data in other tools
    "view": "view",
}


class LazyGroup(click.Group):
    """Imports a verb's module only when it runs, so `sop status` does not pay for torch."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(v for v in VERBS if importlib.util.find_spec(f"sop.commands.{VERBS[v]}") is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        try:
            module = importlib.import_module(f"sop.commands.{VERBS[name]}")
        except ModuleNotFoundError as exc:
            if exc.name == f"sop.commands.{VERBS[name]}":
                return None  # verb planned but not built in this checkout
            raise
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """SOP: scalable online post-training of robot policies (Kafka → faust → Delta → learner → MLflow → robots)."""
    check_environment()  # a mistyped SOP_… variable is an error at start, not a setting silently left out


def main() -> None:
    # MLflow's usage telemetry: nothing leaves a site from its robots; and its config thread, failing offline,
    # deletes an environment variable while other threads iterate os.environ (requests reads proxies from it per
    # HTTP call): a learner on an HTTP registry died of that KeyError
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    exit_with_parent()
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
