"""`sop pretrain`: the base policy, by behaviour cloning on the Delta `demonstrations` table only.

Registers it as a new `sop-policy` version and moves `champion` to it; `--eval` then measures its success per
task on held-out seeded episodes (the same `evaluate_policy` that `sop eval` uses) and records it on the version.

`--algorithm recap` is RECAP's pretraining: the demonstrations are valued by the registered value model (`sop
train-value` first; the version `SOP_VALUE_MODEL_VERSION` pins, else `sop-value@champion`, else the newest) and
the policy is trained conditioned on each step's advantage indicator (``learner.pretrain.pretrain_policy``).
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from sop.learner_settings import (
    load_learner_settings,
    open_lake,
    prepare_registry,
    quiet_mlflow,
    text_encoder,
    value_version,
)
from sop.progress import ProgressFile, progress_bars
from sop.settings import load_settings

BAR = "behaviour cloning"


@click.command("pretrain")
@click.option("--steps", type=int, default=None, help="Behaviour-cloning steps (SOP_PRETRAIN_STEPS).")
@click.option("--algorithm", type=click.Choice(["hg-dagger", "recap"]), default=None,
              help="recap: condition on the value model's advantage indicator, as RECAP does (needs a registered "
                   "sop-value: `sop train-value`); default SOP_LEARN_ALGORITHM.")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: every task in the table).")
@click.option("--eval/--no-eval", "evaluate", default=False, help="Evaluate the base policy on held-out seeds.")
@click.option("--eval-episodes", type=int, default=None, help="Episodes per task of --eval (SOP_EVAL_EPISODES).")
@click.option("--no-promote", is_flag=True, help="Register the version without moving the champion alias.")
@click.option("--progress-file", type=click.Path(dir_okay=False), default=None,
              help="Also write the progress (step, loss) to this JSON file, for a parent process to show (sop run).")
def command(steps: int | None, algorithm: str | None, tasks: str | None, evaluate: bool, eval_episodes: int | None,
            no_promote: bool, progress_file: str | None) -> None:
    """Train the base policy from the demonstrations and register it as the champion."""
    import torch
    from mlflow.entities import Metric, RunStatus

    from infra.registry import experiment_id, registry_client
    from learner import registry
    from learner.algorithms import make_algorithm
    from learner.config import to_dict
    from learner.pretrain import NoDemonstrations, pretrain_policy
    from learner.promotion import promote

    quiet_mlflow()
    shared = load_settings()
    progress_out = ProgressFile(progress_file)
    settings = load_learner_settings(**({"pretrain_steps": steps} if steps is not None else {}),
                                     **({"eval_episodes": eval_episodes} if eval_episodes is not None else {}))
    if settings.learn_threads is not None:
        torch.set_num_threads(settings.learn_threads)
    task_list = tuple(t.strip() for t in tasks.split(",") if t.strip()) if tasks else settings.tasks()
    train = settings.train_config(algorithm=algorithm, lr=settings.pretrain_lr, ema_decay=settings.pretrain_ema_decay)
    model_cfg = settings.policy_config()
    recap = settings.recap_config(shared)
    console = Console()
    progress_out.update(BAR, completed=0, total=settings.pretrain_steps, note="loading the text encoder")
    tracking_uri = prepare_registry(shared)
    lake = open_lake(shared)
    text = text_encoder(shared)
    client = registry_client(tracking_uri)
    value = None
    if train.algorithm == "recap":
        from learner.loading import load_version

        found = value_version(shared, tracking_uri)
        if found is None:
            raise click.ClickException(f"RECAP's pretraining conditions on the advantages of a value model, and "
                                       f"{shared.value_model_name} has no version: run `sop train-value` first")
        progress_out.update(BAR, note=f"loading {shared.value_model_name} v{found}")
        value = load_version(shared.value_model_name, found, tracking_uri=tracking_uri).runtime
    exp_id = experiment_id(client, "sop")
    run_id = client.create_run(exp_id, run_name="pretrain", tags={"sop.role": "pretrain"}).info.run_id
    client.log_param(run_id, "model", json.dumps(to_dict(model_cfg)))
    client.log_param(run_id, "train", json.dumps(to_dict(train)))
    client.log_param(run_id, "steps", settings.pretrain_steps)
    reading = "reading the demonstrations" + (f" (valued by {shared.value_model_name} v{value.version})"
                                              if value is not None else "")
    progress_out.update(BAR, note=reading)
    try:
        with progress_bars(console, transient=True) as bar:
            job = bar.add_task(BAR, total=settings.pretrain_steps, note=reading)

            def on_step(step: int, metrics: dict[str, float]) -> None:
                if step % 25 == 0 or step == settings.pretrain_steps:
                    note = f"loss {metrics['loss']:.4f}"
                    bar.update(job, completed=step, note=note)
                    progress_out.update(BAR, completed=step, note=note)
                    client.log_batch(run_id, metrics=[Metric("loss", float(metrics["loss"]), 0, step)])

            result = pretrain_policy(lake, text, steps=settings.pretrain_steps, model=model_cfg, train=train,
                                     sampler=settings.sampler_config(), recap=recap, tasks=task_list,
                                     value=value, value_name=shared.value_model_name, on_step=on_step)
    except NoDemonstrations as exc:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise click.ClickException(str(exc)) from None
    condition = make_algorithm(train.algorithm, recap).condition
    final_loss = sum(result.losses[-100:]) / len(result.losses[-100:])
    progress_out.update(BAR, completed=settings.pretrain_steps, note=f"loss {final_loss:.4f} (last 100 steps); registering")
    lineage = {"phase": "pretrain", "algorithm": train.algorithm, "learner_step": settings.pretrain_steps,
               "delta_versions": result.versions, "demonstration_episodes": result.episodes.get("demonstrations", 0),
               "demonstration_rows": {t: s["offline"] for t, s in result.rows.items()}, "run_id": run_id}
    if value is not None:  # RECAP: which value model labelled the demonstrations, and how
        lineage.update(value_model=f"{shared.value_model_name}/{value.version}", epsilons=result.epsilons,
                       positive_share=result.positive_share)
    version = registry.register_policy(result.model, alias=None, metrics={"loss": final_loss}, lineage=lineage,
                                       tracking_uri=tracking_uri, embeddings=text.table(), condition=condition,
                                       cfg_beta=recap.cfg_beta, experiment="sop", run_id=run_id,
                                       step=settings.pretrain_steps)
    if not no_promote:
        promote(version, name=shared.policy_model_name, tracking_uri=tracking_uri, alias=shared.policy_alias,
                reason="pretrain")
    if value is not None:
        shares = ", ".join(f"{t} {p:.2f}" for t, p in sorted(result.positive_share.items()))
        console.print(f"[green]RECAP[/] demonstrations valued by {shared.value_model_name} v{value.version}; "
                      f"positive share per task: {shares}")
    console.print(f"[green]registered[/] {shared.policy_model_name} v{version} "
                  f"({'champion' if not no_promote else 'alias unchanged'}); loss {final_loss:.4f}, "
                  f"{sum(s['offline'] for s in result.rows.values())} demonstration steps over "
                  f"{len(result.rows)} task(s), Delta demonstrations v{result.versions.get('demonstrations')}")
    if evaluate:
        from learner.model import PolicyRuntime
        from sim.evaluation import evaluate_policy

        policy = PolicyRuntime(result.model, text, version=version, condition=condition, cfg_beta=recap.cfg_beta)
        success = evaluate_policy(policy, sorted(result.rows), settings.eval_episodes, progress=True)
        table = Table(title=f"{shared.policy_model_name} v{version}: success over {settings.eval_episodes} "
                            "held-out episodes per task")
        table.add_column("task")
        table.add_column("success", justify="right")
        for task, rate in success.items():
            table.add_row(task, f"{rate:.2f}")
            client.log_metric(run_id, f"eval_success/{task}", rate)
        mean = sum(success.values()) / len(success)
        table.add_row("mean", f"{mean:.2f}")
        console.print(table)
        client.set_model_version_tag(shared.policy_model_name, version, "sop.eval",
                                     json.dumps({"episodes_per_task": settings.eval_episodes, "success": success}))
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

