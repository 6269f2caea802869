"""`sop registry`: the model registry's versions and its users.

    sop registry convert [--name sop-policy] [--version V]     # first-format (pickled) versions -> data, once
    sop registry user add robot-17 --role actor                # a registry user with a role's permissions
    sop registry user remove robot-17                          # revoke it (a lost or retired robot)

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
    """Model registry maintenance: convert old versions, manage users (security on)."""


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
