"""`sop promote --version V`: point the alias the fleet follows at a chosen version, by hand."""

from __future__ import annotations

import click
from rich.console import Console

from sop.learner_settings import prepare_registry
from sop.settings import load_settings


@click.command("promote")
@click.option("--version", "version", required=True, help="The version number to promote.")
@click.option("--model", "model_name", default=None, help="Registered model (default SOP_POLICY_MODEL_NAME).")
@click.option("--alias", default=None, help="Alias to move (default SOP_POLICY_ALIAS, i.e. champion).")
@click.option("--pin/--no-pin", default=False,
              help="Pin the champion so an auto-mode learner stops moving it (default: unpin).")
def command(version: str, model_name: str | None, alias: str | None, pin: bool) -> None:
    """Move the champion alias to VERSION; the version it replaces goes onto the roll-back history."""
    from learner.promotion import PromotionError, promote

    shared = load_settings()
    name = model_name or shared.policy_model_name
    target_alias = alias or shared.policy_alias
    try:
        previous = promote(version, name=name, tracking_uri=prepare_registry(shared), alias=target_alias,
                           reason="manual", pin=pin)
    except PromotionError as exc:
        raise click.ClickException(str(exc)) from None
    Console().print(f"[green]{name}@{target_alias}[/] → v{version} (was {previous or 'unset'})"
                    + ("; pinned" if pin else ""))
