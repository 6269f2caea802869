"""`sop registry`: the model registry's versions and its users.

    sop registry convert [--name sop-policy] [--version V]     # first-format (pickled) versions -> data, once
    sop registry gc --keep-last 50 [--dry-run]                 # delete versions nobody needs (learner.promotion.RegistryGC)
    sop registry history                                       # moves, roll-backs and gate decisions
    sop registry user add robot-17 --role actor                # a registry user with a role's permissions
    sop registry user remove robot-17                          # revoke it (a lost or retired robot)
    eval "$(sop registry credentials --role learner)"          # this shell acts as the stack's learner

``convert`` re-registers each first-format version (a pickled MLflow pyfunc beside its data files) as data:
the weights read with ``torch.load(weights_only=True)``, the pickle never opened; aliases pointing at the old
version move to the new one. ``user`` needs the authenticated registry (``SOP_SECURITY=true``) and runs with the
admin's credentials from the local stack (``<run dir>/security/registry-users.json``).
"""

from __future__ import annotations

import click
from rich.console import Console

from sop.settings import load_settings


@click.group("registry")
def command() -> None:
    """Model registry maintenance: convert old versions, garbage collection, history, users (security on)."""


@command.command("convert")
@click.option("--name", "names", multiple=True, help="Registered model(s) [default: the policy and value models].")
@click.option("--version", "version", default=None, help="One version [default: every first-format version].")
def convert(names: tuple[str, ...], version: str | None) -> None:
    """Re-register first-format (pickled pyfunc) versions as weights + declared architecture."""
    from infra.registry import registry_client
    from learner.convert import convert_legacy
    from sop.learner_settings import prepare_registry

    settings = load_settings()
    uri = prepare_registry(settings)
    console = Console()
    client = registry_client(uri)
    for name in names or (settings.policy_model_name, settings.value_model_name):
        try:
            versions = [version] if version else sorted((v.version for v in client.search_model_versions(
                f"name='{name}'")), key=int)
        except Exception as exc:  # noqa: BLE001 - no such model
            console.print(f"{name}: nothing registered ({exc})")
            continue
        for v in versions:
            try:
                new = convert_legacy(name, str(v), tracking_uri=uri)
            except Exception as exc:  # noqa: BLE001 - e.g. the expert's first-format version has no weights
                console.print(f"[yellow]{name} v{v}: not converted: {exc}")
                continue
            console.print(f"{name} v{v}: already data" if new is None else f"[green]{name} v{v} → v{new}")


@command.command("gc")
@click.option("--keep-last", type=int, default=None,
              help="Newest versions kept besides every champion, aliased and running one [default: "
                   "SOP_REGISTRY_GC_KEEP_LAST, or 50 when that is 0].")
@click.option("--active-minutes", type=float, default=None,
              help="A version that played an episode (Delta `episodes`) or that an alias moved to this recently counts "
                   "as running [default: SOP_REGISTRY_GC_ACTIVE_S].")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
def gc(keep_last: int | None, active_minutes: float | None, dry_run: bool) -> None:
    """Delete sop-policy versions that are not among the newest, never were champion, no alias points at and no
    actor runs (see GC_DOC in learner/promotion.py)."""
    from learner.promotion import GCConfig, LiveSuccess, RegistryGC
    from sop.learner_settings import load_learner_settings, open_lake, prepare_registry

    settings = load_settings()
    learner = load_learner_settings()
    config = GCConfig(keep_last=keep_last or learner.registry_gc_keep_last or 50,
                      active_s=active_minutes * 60 if active_minutes is not None else learner.registry_gc_active_s)
    collector = RegistryGC(config, name=settings.policy_model_name, tracking_uri=prepare_registry(settings),
                           live=LiveSuccess(open_lake(settings)))
    console = Console()
    if dry_run:
        doomed, total = collector.plan()
        console.print(f"{settings.policy_model_name}: {len(doomed)} of {total} versions would be deleted"
                      + (f": {', '.join(map(str, doomed))}" if doomed else ""))
        return
    result = collector.collect()
    console.print(f"{settings.policy_model_name}: deleted {len(result.deleted)} version(s)"
                  + (f" ({', '.join(map(str, result.deleted))})" if result.deleted else "") + f", kept {result.kept}")
    for version, error in result.failed.items():
        console.print(f"[yellow]v{version} not deleted: {error}")


@command.command("history")
@click.option("--limit", type=int, default=20, show_default=True, help="Newest entries shown.")
def history(limit: int) -> None:
    """The registry's history log: alias moves, roll-backs, restores and gate decisions, oldest first."""
    from datetime import UTC, datetime

    from learner.promotion import history_log
    from sop.learner_settings import prepare_registry

    settings = load_settings()
    console = Console()
    for e in history_log(name=settings.policy_model_name, tracking_uri=prepare_registry(settings))[-limit:]:
        when = datetime.fromtimestamp(float(e.get("at") or 0), UTC).strftime("%Y-%m-%d %H:%M:%S")
        if e.get("event") == "gate":
            what = f"gate {e.get('decision')} v{e.get('version')} (champion v{e.get('champion')}): {e.get('why')}"
        else:
            what = f"{e.get('event')} {e.get('alias')} v{e.get('from')} → v{e.get('to')} ({e.get('reason')})"
        console.print(f"{when}  {what}", highlight=False)


def _admin_context():  # noqa: ANN202 - (settings, tracking URI, admin credentials)
    from sop.stack import registry_auth

    settings = load_settings()
    if not settings.security:
        raise click.ClickException("the registry has no users: set SOP_SECURITY=true (and run `sop up`)")
    return settings, settings.tracking_uri, registry_auth(settings).admin


@command.command("credentials")
@click.option("--role", type=click.Choice(["learner", "processor", "actor", "admin"]), required=True)
def credentials(role: str) -> None:
    """Print `export MLFLOW_TRACKING_USERNAME=… MLFLOW_TRACKING_PASSWORD=…` of the local stack's ROLE user."""
    import shlex

    from sop.stack import role_env

    settings = load_settings()
    if not settings.security:
        raise click.ClickException("no registry roles: set SOP_SECURITY=true (and run `sop up`)")
    for name, value in role_env(settings, role).items():
        click.echo(f"export {name}={shlex.quote(value)}")


@command.group("user")
def user() -> None:
    """Registry users (one per robot, or per group of robots, when their credentials must be revocable alone)."""


@user.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["learner", "processor", "actor"]), required=True)
def user_add(username: str, role: str) -> None:
    """Create USERNAME with ROLE's permissions (or reset its password); prints its credentials once."""
    import shlex

    from infra.registry_auth import add_user

    settings, uri, admin = _admin_context()
    creds = add_user(uri, admin, username, role=role, policy_model=settings.policy_model_name,
                     value_model=settings.value_model_name)
    for name, value in creds.env().items():
        click.echo(f"export {name}={shlex.quote(value)}")


@user.command("remove")
@click.argument("username")
def user_remove(username: str) -> None:
    """Delete USERNAME: its credentials stop working at once (a lost or compromised robot)."""
    from infra.registry_auth import remove_user

    _, uri, admin = _admin_context()
    click.echo(f"{username}: {'removed' if remove_user(uri, admin, username) else 'no such user'}")
