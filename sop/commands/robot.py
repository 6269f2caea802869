"""`sop robot add | revoke | list`: robot principals of the secured stack (SOP_KAFKA_SECURITY=scram-tls).

    sop robot add robot-17                       # SCRAM user + ACLs + signing key; prints the robot's settings
    sop robot add cell-a --actor 'cell-a-*'      # one principal for a group of robots (the actor ids it may claim)
    sop robot revoke robot-17                    # user, ACLs and key gone: its next request is refused
    sop robot list

A robot may only write (idempotently) to the three input topics; its events are signed with its key so that the
processor can tell which robot produced them (docs/security.md).
"""

from __future__ import annotations

import json
import shlex

import click
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.table import Table

from infra.kafka_security import wait_for_login, wait_until_refused
from sop.settings import Settings, SettingsError, load_settings


def _admin(settings: Settings) -> AdminClient:
    if not settings.kafka_secure:
        raise SettingsError("SOP_KAFKA_SECURITY: robots are principals of the secured stack; set "
                            "SOP_KAFKA_SECURITY=scram-tls (and run `sop up` with it)")
    if not settings.kafka_client_config:
        raise SettingsError(f"no admin client settings ({settings.kafka_auth.client_file('sop-admin')}): run `sop up` "
                            "with SOP_KAFKA_SECURITY=scram-tls first, or set SOP_KAFKA_CLIENT_CONFIG")
    return AdminClient({"bootstrap.servers": settings.bootstrap(), **settings.kafka_client_config})


def inputs(settings: Settings) -> list[str]:
    return [settings.topics[k] for k in ("Step", "EpisodeEvent", "InterventionEvent")]


def add_robot(settings: Settings, name: str, actors: tuple[str, ...] = ()):  # noqa: ANN201 - RobotCredentials
    """Create (or renew) robot ``name`` and wait until its credentials work."""
    creds = settings.kafka_auth.add_robot(_admin(settings), name, topics=settings.topics, actors=actors)
    wait_for_login(settings.bootstrap(), creds.client_config, topics=inputs(settings))
    return creds


@click.group("robot")
def command() -> None:
    """Robot principals of the secured stack: add (user, ACLs, signing key), revoke, list."""


@command.command("add")
@click.argument("name")
@click.option("--actor", "actors", multiple=True,
              help="An actor id (or pattern, e.g. 'cell-a-*') this principal may claim; repeatable (default: NAME).")
def add(name: str, actors: tuple[str, ...]) -> None:
    """Create robot NAME (a new password each time; its signing key is kept) and print its settings."""
    settings = load_settings()
    creds = add_robot(settings, name, actors)
    console = Console(stderr=True)
    console.print(f"[green]robot[/] {name}: may write {', '.join(inputs(settings))}"
                  f" as actors {list(settings.kafka_auth.keyring()[name]['actors'])}")
    console.print("settings for the robot's machine (copy the two files and the CA there):")
    click.echo(f"export SOP_KAFKA_SECURITY={settings.kafka_security}")
    click.echo(f"export SOP_KAFKA_CLIENT_CONFIG={shlex.quote(str(creds.client_file))}")
    click.echo(f"export SOP_PUBLISH_IDENTITY_FILE={shlex.quote(str(creds.identity_file))}")


@command.command("revoke")
@click.argument("name")
def revoke(name: str) -> None:
    """Remove robot NAME: its SCRAM user, every ACL and its signing key (the processor then dead-letters what it
    still finds signed by it as identity-mismatch)."""
    settings = load_settings()
    client_file = settings.kafka_auth.client_file(name)
    old = json.loads(client_file.read_text()) if client_file.exists() else None
    result = settings.kafka_auth.revoke_robot(_admin(settings), name)
    if not any(result.values()):
        raise click.ClickException(f"no robot {name!r} (no user, ACL or key)")
    if old is not None:  # return once the brokers refuse it (the deletion reaches them shortly after the controller)
        wait_until_refused(settings.bootstrap(), old)
    click.echo(f"revoked {name}: {result['acls_deleted']} ACLs deleted, user "
               f"{'deleted' if result['user_deleted'] else 'absent'}, key {'removed' if result['key_removed'] else 'absent'}")


@command.command("list")
def list_robots() -> None:
    """The robots of the keyring, with the actor ids each may claim."""
    settings = load_settings()
    table = Table("robot", "actors", "added")
    for name, entry in sorted(settings.kafka_auth.keyring().items()):
        table.add_row(name, ", ".join(entry.get("actors", [])), entry.get("added_at", ""))
    Console().print(table)
