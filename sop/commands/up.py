"""`sop up`: start the local stack (Kafka, topics, MLflow registry; the cluster profile also S3 and PostgreSQL);
harmless to run twice."""

from __future__ import annotations

import shlex

import click
from rich.console import Console

from sop.cli_options import PROFILE_OPTION
from sop.settings import load_settings, site_environment
from sop.stack import up


@click.command("up")
@PROFILE_OPTION
@click.option("--ui", is_flag=True, help="Also serve the MLflow UI on loopback (SOP_MLFLOW_UI_PORT; the cluster "
                                         "profile's MLflow server is its UI).")
@click.option("--print-env", is_flag=True, help="Print the SOP_ settings that point another machine at this stack.")
@click.option("--secure", is_flag=True, help="Both security switches: Kafka with SASL/SCRAM-SHA-512 over TLS and ACLs "
                                             "(SOP_KAFKA_SECURITY=scram-tls) and the registry's basic-auth roles "
                                             "(SOP_SECURITY=true); every other command then needs both too "
                                             "(docs/security.md).")
def command(profile: str | None, ui: bool, print_env: bool, secure: bool) -> None:
    """Start the local stack: the brokers, the topics, the MLflow registry (and, for the cluster profile, the S3
    server and PostgreSQL)."""
    settings = load_settings(profile=profile, **({"kafka_security": "scram-tls", "security": True} if secure else {}))
    console = Console()
    first = ("first run resolves the Kafka jars with Maven" if settings.profile == "embedded"
             else "3 brokers, S3 server, PostgreSQL, MLflow server; the first run builds SeaweedFS")
    with console.status(f"starting the local stack ({settings.profile}; {first})…"):
        info = up(settings, ui=ui)
    if info.profile == "cluster":
        for part, where in info.parts.items():
            console.print(f"[green]{part:<9}[/] {where}")
    else:
        console.print(f"[green]kafka[/]  {info.bootstrap}{' (external)' if info.external_kafka else ''}")
        console.print(f"[green]mlflow[/] {info.tracking_uri}")
    if info.topics_created:
        console.print(f"[green]topics[/] created {', '.join(info.topics_created)}")
    if info.ui_url:
        console.print(f"[green]ui[/]     {info.ui_url}")
    if settings.security:
        console.print(f"[green]registry roles[/] basic-auth; users and passwords (0600): "
                      f"{settings.run_path / 'security' / 'registry' / 'registry-users.json'}; "
                      "`sop registry credentials --role learner` prints a role's MLFLOW_TRACKING_* exports")
    if settings.kafka_secure:
        console.print(f"[green]kafka security[/] SASL/SCRAM-SHA-512 over TLS, ACLs; CA {settings.kafka_auth.ca_file}; "
                      f"principals' client settings in {settings.kafka_auth.client_file('x').parent} "
                      "(`sop robot add NAME` for each robot)")
    if secure:
        console.print("[yellow]set SOP_KAFKA_SECURITY=scram-tls and SOP_SECURITY=true for every other command[/]")
    console.print(f"run directory: {settings.run_path}")
    if print_env and info.settings is not None:
        for name, value in site_environment(info.settings).items():
            click.echo(f"export {name}={shlex.quote(value)}")
