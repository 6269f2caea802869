"""`sop down`: stop what `sop up` started (the data stays under the run directory)."""

from __future__ import annotations

import click

from sop.cli_options import PROFILE_OPTION
from sop.settings import load_settings
from sop.stack import down


@click.command("down")
@PROFILE_OPTION
def command(profile: str | None) -> None:
    """Stop the local stack cleanly (the brokers, the MLflow UI or server; the cluster's S3 server and PostgreSQL)."""
    stopped = down(load_settings(profile=profile))
    for name, was_running in stopped.items():
        click.echo(f"{name}: {'stopped' if was_running else 'not running'}")
