"""`sop down`: stop what `sop up` started (the data stays under the run directory)."""

from __future__ import annotations

import click

from sop.settings import load_settings
from sop.stack import down


@click.command("down")
def command() -> None:
    """Stop the local Kafka broker and the MLflow UI cleanly."""
    stopped = down(load_settings())
    for name, was_running in stopped.items():
        click.echo(f"{name}: {'stopped' if was_running else 'not running'}")
