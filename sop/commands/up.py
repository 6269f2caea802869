"""`sop up`: start the local stack (Kafka broker, topics, MLflow registry); harmless to run twice."""

from __future__ import annotations

import click
from rich.console import Console

from sop.settings import load_settings
from sop.stack import up


@click.command("up")
@click.option("--ui", is_flag=True, help="Also serve the MLflow UI on loopback (SOP_MLFLOW_UI_PORT).")
def command(ui: bool) -> None:
    """Start the local stack: one KRaft Kafka broker, the topics, the MLflow registry."""
    settings = load_settings()
    console = Console()
    with console.status("starting the local stack (first run resolves the Kafka jars with Maven)…"):
        info = up(settings, ui=ui)
    console.print(f"[green]kafka[/]  {info.bootstrap}{' (external)' if info.external_kafka else ''}")
    if info.topics_created:
        console.print(f"[green]topics[/] created {', '.join(info.topics_created)}")
    console.print(f"[green]mlflow[/] {info.tracking_uri}")
    if info.ui_url:
        console.print(f"[green]ui[/]     {info.ui_url}")
    console.print(f"run directory: {settings.run_path}")
