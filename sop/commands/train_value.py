"""`sop train-value`: the distributional value model of RECAP, trained offline and registered as `sop-value`.

Targets are the normalised Monte-Carlo returns (``mc_return``) of the demonstrations and of every closed online
episode in the `steps` table. The stream processor loads the champion to compute advantages; the learner never
updates it (frozen during online training).
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sop.learner_settings import (
    load_learner_settings,
    open_lake,
    prepare_registry,
    quiet_mlflow,
    text_encoder,
)
from sop.settings import load_settings


@click.command("train-value")
@click.option("--steps", type=int, default=None, help="Gradient steps (SOP_VALUE_STEPS).")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: every task in the tables).")
@click.option("--no-promote", is_flag=True, help="Register the version without moving the champion alias.")
def command(steps: int | None, tasks: str | None, no_promote: bool) -> None:
    """Train the value model on demonstrations + closed online episodes and register it (`sop-value@champion`)."""
    import torch
    from mlflow.entities import Metric, RunStatus

    from infra.registry import experiment_id, registry_client
    from learner import registry
    from learner.config import to_dict
    from learner.pretrain import NoDemonstrations, pretrain_value
    from learner.promotion import promote

    quiet_mlflow()
    shared = load_settings()
    settings = load_learner_settings(**({"value_steps": steps} if steps is not None else {}))
    if settings.learn_threads is not None:
        torch.set_num_threads(settings.learn_threads)
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else settings.tasks()
    value_cfg = settings.value_config()
    train = settings.train_config(lr=settings.value_lr, ema_decay=0.0)
    console = Console()
    tracking_uri = prepare_registry(shared)
    client = registry_client(tracking_uri)
    run_id = client.create_run(experiment_id(client, "sop"), run_name="train-value",
                               tags={"sop.role": "train-value"}).info.run_id
    client.log_param(run_id, "value_model", json.dumps(to_dict(value_cfg)))
    client.log_param(run_id, "steps", settings.value_steps)
    text = text_encoder(shared)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[loss]}"), console=console, transient=True) as bar:
            job = bar.add_task("value model", total=settings.value_steps, loss="")

            def on_step(step: int, metrics: dict[str, float]) -> None:
                if step % 25 == 0:
                    bar.update(job, completed=step, loss=f"loss {metrics['value_loss']:.4f}")
                    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()])

            result = pretrain_value(open_lake(shared), text, steps=settings.value_steps, value=value_cfg, train=train,
                                    sampler=settings.sampler_config(), tasks=task_list, on_step=on_step)
    except NoDemonstrations as exc:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise click.ClickException(str(exc)) from None
    final = sum(result.losses[-100:]) / len(result.losses[-100:])
    lineage = {"phase": "value", "delta_versions": result.versions, "episodes": result.episodes,
               "rows": result.rows, "steps": settings.value_steps, "run_id": run_id}
    version = registry.register_value(result.model, name=shared.value_model_name, alias=None,
                                      metrics={"value_loss": final}, lineage=lineage, tracking_uri=tracking_uri,
                                      embeddings=text.table(), experiment="sop", run_id=run_id,
                                      step=settings.value_steps)
    if not no_promote:
        promote(version, name=shared.value_model_name, tracking_uri=tracking_uri, alias="champion",
                reason="train-value")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    online = result.episodes.get("steps", 0)
    console.print(f"[green]registered[/] {shared.value_model_name} v{version}"
                  f"{' (champion)' if not no_promote else ''}: loss {final:.4f} on "
                  f"{result.episodes.get('demonstrations', 0)} demonstration and {online} online episode(s)")
