"""`sop rollback`: point the alias the fleet follows back at the previous champion."""

from __future__ import annotations

import click
from rich.console import Console

from sop.learner_settings import prepare_registry
from sop.settings import load_settings


@click.command("rollback")
@click.option("--model", "model_name", default=None, help="Registered model (default SOP_POLICY_MODEL_NAME).")
@click.option("--alias", default=None, help="Alias to move (default SOP_POLICY_ALIAS, i.e. champion).")
@click.option("--pin/--no-pin", default=True,
              help="Pin the champion so an auto-mode learner does not move it straight on (default: pin; "
                   "`sop promote` unpins).")
def command(model_name: str | None, alias: str | None, pin: bool) -> None:
    """Move the champion back to the version it replaced last (history kept on the registered model)."""
    from learner.promotion import PromotionError, rollback

    shared = load_settings()
    name = model_name or shared.policy_model_name
    target_alias = alias or shared.policy_alias
    try:
        before, after = rollback(name=name, tracking_uri=prepare_registry(shared), alias=target_alias, pin=pin)
    except PromotionError as exc:
        raise click.ClickException(str(exc)) from None
    Console().print(f"[green]{name}@{target_alias}[/] rolled back v{before} → v{after}" + ("; pinned" if pin else ""))
