"""Options several `sop` verbs share."""

from __future__ import annotations

import click

from sop.settings import PROFILES

PROFILE_OPTION = click.option(
    "--profile", type=click.Choice(PROFILES), default=None,
    help="embedded: one broker, SQLite MLflow, local lake; cluster: 3 brokers, an S3 server, MLflow server on "
         "PostgreSQL (default: SOP_PROFILE, else embedded).")
