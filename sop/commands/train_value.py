"""`sop train-value`: the distributional value model of RECAP, trained offline and registered as `sop-value`.

Targets are the normalised Monte-Carlo returns (``mc_return``) of the demonstrations and of every closed online
episode in the `steps` table. The stream processor loads the champion to compute advantages; the learner never
updates it (frozen during online training).
"""

from __future__ import annotations

import json

import click
from rich.console import Console

from sop.learner_settings import (
    load_learner_settings,
    open_lake,
    prepare_registry,
    quiet_mlflow,
    text_encoder,
)
from sop.progress import ProgressFile, progress_bars
from sop.settings import load_settings

BAR = "value model"


@click.command("train-value")
@click.option("--steps", type=int, default=None, help="Gradient steps (SOP_VALUE_STEPS).")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: every task in the tables).")
@click.option("--no-promote", is_flag=True, help="Register the version without moving the champion alias.")
@click.option("--progress-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the progress (step, loss) to this JSON file, for a parent process to show (sop run).")
def command(steps: int | None, tasks: str | None, no_promote: bool, progress_file: str | None) -> None:
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
    progress_out = ProgressFile(progress_file)
    progress_out.update(BAR, completed=0, total=settings.value_steps, note="loading the text encoder")
    tracking_uri = prepare_registry(shared)
    client = registry_client(tracking_uri)
    run_id = client.create_run(experiment_id(client, "sop"), run_name="train-value",
                               tags={"sop.role": "train-value"}).info.run_id
    client.log_param(run_id, "value_model", json.dumps(to_dict(value_cfg)))
    client.log_param(run_id, "steps", settings.value_steps)
    text = text_encoder(shared)
    reading = "reading demonstrations and closed online episodes"
    progress_out.update(BAR, note=reading)
    try:
        with progress_bars(console, transient=True) as bar:
            job = bar.add_task(BAR, total=settings.value_steps, note=reading)

            def on_step(step: int, metrics: dict[str, float]) -> None:
                if step % 25 == 0 or step == settings.value_steps:
                    note = f"loss {metrics['value_loss']:.4f}"
                    bar.update(job, completed=step, note=note)
                    progress_out.update(BAR, completed=step, note=note)
                    client.log_batch(run_id, metrics=[Metric(k, float(v), 0, step) for k, v in metrics.items()])

            result = pretrain_value(open_lake(shared), text, steps=settings.value_steps, value=value_cfg, train=train,
                                    sampler=settings.sampler_config(), tasks=task_list, on_step=on_step)
    except NoDemonstrations as exc:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise click.ClickException(str(exc)) from None
    final = sum(result.losses[-100:]) / len(result.losses[-100:])
    progress_out.update(BAR, completed=settings.value_steps, note=f"loss {final:.4f} (last 100 steps); registering")
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
