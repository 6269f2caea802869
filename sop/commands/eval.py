"""`sop eval --version V --episodes-per-task M`: fixed held-out seeds, operator off, canonical and paraphrased."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from sop.settings import load_settings


@click.command("eval")
@click.option("--version", "version", default=None, help="Registered sop-policy version (default: the champion).")
@click.option("--episodes-per-task", default=20, show_default=True)
@click.option("--tasks", default=None, help="Comma-separated tasks (default: the actors' default suite).")
@click.option("--paraphrases/--no-paraphrases", default=True, show_default=True,
              help="Also evaluate with a held-out paraphrase of each instruction.")
@click.option("--paraphrase-index", default=0, show_default=True, help="Which paraphrase of each task.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Also write the results as JSON here.")
def command(version: str | None, episodes_per_task: int, tasks: str | None, paraphrases: bool,
            paraphrase_index: int, output: str | None) -> None:
    """Success rate per task of one registered version on held-out seeds (no human, nothing published)."""
    from producers.policies import load_policy_from_registry
    from sim.evaluation import evaluate_policy
    from sim.tasks import DEFAULT_SUITE, EVAL_SEEDS
    from sop.architectures import policy_architectures

    settings = load_settings()
    ref = f"v{version}" if version is not None else f"@{settings.policy_alias}"
    uri = f"models:/{settings.policy_model_name}/{version}" if version else \
        f"models:/{settings.policy_model_name}@{settings.policy_alias}"
    try:
        policy = load_policy_from_registry(uri, architectures=policy_architectures(),
                                           tracking_uri=settings.tracking_uri)
    except Exception as exc:
        raise click.ClickException(f"cannot load {uri} from {settings.tracking_uri}: {exc}") from None
    task_list = tasks.split(",") if tasks else list(DEFAULT_SUITE)
    console = Console()
    results = {"version": policy.version, "episodes_per_task": episodes_per_task, "seeds": "EVAL_SEEDS",
               "canonical": evaluate_policy(policy, task_list, episodes_per_task, EVAL_SEEDS, progress=True)}
    if paraphrases:
        results["paraphrased"] = evaluate_policy(policy, task_list, episodes_per_task, EVAL_SEEDS,
                                                 paraphrase=paraphrase_index, progress=True)
    table = Table(title=f"sop-policy v{policy.version} ({ref}), {episodes_per_task} held-out episodes per task")
    table.add_column("task")
    table.add_column("success")
    if paraphrases:
        table.add_column("success (paraphrased)")
    for task in task_list:
        row = [task, f"{results['canonical'][task]:.2f}"]
        if paraphrases:
            row.append(f"{results['paraphrased'][task]:.2f}")
        table.add_row(*row)
    mean = sum(results["canonical"].values()) / len(task_list)
    table.add_row("mean", f"{mean:.2f}", *([f"{sum(results['paraphrased'].values()) / len(task_list):.2f}"]
                                             if paraphrases else []))
    console.print(table)
    if output:
        with open(output, "w") as fh:
            json.dump(results, fh, indent=2)
