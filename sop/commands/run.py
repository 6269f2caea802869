"""`sop run`: the whole closed loop on this machine, with a live view and a report at the end."""

from __future__ import annotations

import click
from rich.console import Console

from sop.cli_options import PROFILE_OPTION
from sop.loop import ClosedLoop, LoopConfig
from sop.report import describe_versions
from sop.settings import load_settings


@click.command("run")
@PROFILE_OPTION
@click.option("--processors", type=int, default=None,
              help="Stream processor workers in one consumer group (default: 2 under the cluster profile, else 1).")
@click.option("--actors", default=2, show_default=True, help="Robots in the simulated fleet.")
@click.option("--minutes", default=30.0, show_default=True, help="Wall-clock budget of the online phase.")
@click.option("--target-success", type=float, default=None,
              help="Stop early when every task reaches this success: held-out (operator off) at the latest checkpoint "
                   "with --eval-every, else autonomous success (no human step) over the last 20 episodes per task; "
                   "raw success (the operator's rescues counted) never stops a run.")
@click.option("--algorithm", type=click.Choice(["hg-dagger", "recap"]), default="hg-dagger", show_default=True)
@click.option("--sampler", type=click.Choice(["paper", "normalised", "fixed"]), default="paper", show_default=True,
              help="The online/offline mix: the paper's formula on raw losses, on losses normalised by the task's "
                   "offline loss, or a fixed share.")
@click.option("--promotion", type=click.Choice(["auto", "gated"]), default="auto", show_default=True,
              help="auto: every learner version becomes champion; gated: canary actors play each candidate and the "
                   "gate promotes or rejects it against the champion (autonomous success, takeover rate).")
@click.option("--canary-share", type=float, default=0.25, show_default=True,
              help="--promotion gated: share of the actors that follow the candidate (rounded; at least one, never all).")
@click.option("--eval-every", "eval_every", type=float, default=None,
              help="Minutes between held-out checkpoints of the champion (`sop eval`: operator off, held-out seeds) "
                   "during the run; in the live view and the report.")
@click.option("--eval-episodes", type=int, default=10, show_default=True,
              help="Held-out episodes per task of one checkpoint (--eval-every).")
@click.option("--tasks", default=None, help="Comma-separated tasks (default: the default suite).")
@click.option("--hz", default=30.0, show_default=True, help="Control rate of every robot (0 = as fast as possible).")
@click.option("--operator/--no-operator", default=True, show_default=True, help="Simulated human takeovers.")
@click.option("--demos-per-task", type=int, default=None,
              help="Demonstrations per task to create when there are none (default: calibrated per task).")
@click.option("--learn/--no-learn", "learn_online", default=True, show_default=True,
              help="--no-learn: collect with the frozen champion only (train afterwards with `sop learn`).")
@click.option("--keep-stack", is_flag=True, help="Leave Kafka running afterwards (`sop down` stops it).")
def command(profile: str | None, processors: int | None, actors: int, minutes: float, target_success: float | None,
            algorithm: str, promotion: str, canary_share: float, eval_every: float | None, eval_episodes: int,
            sampler: str, tasks: str | None, hz: float, operator: bool, demos_per_task: int | None,
            learn_online: bool, keep_stack: bool) -> None:
    """Stack up, demonstrations and base policy if missing, processor + learner + N actors, live view, report."""
    settings = load_settings(profile=profile)
    if processors is None:
        processors = 2 if settings.profile == "cluster" else 1
    try:
        config = LoopConfig(processors=processors, actors=actors, duration_s=minutes * 60, target_success=target_success,
                            algorithm=algorithm, promotion=promotion, canary_share=canary_share,
                            eval_every_s=eval_every * 60 if eval_every is not None else None,
                            eval_episodes=eval_episodes, sampler=sampler, tasks=tuple(tasks.split(",")) if tasks else None,
                            hz=hz, operator=operator, demos_per_task=demos_per_task, learn_online=learn_online,
                            keep_stack=keep_stack)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    console = Console()
    summary = ClosedLoop(settings, config, console=console).run()
    if summary:
        for task, t in sorted(summary["tasks"].items()):
            console.print(f"{task:>24}: {t['episodes']:4d} episodes, last {config.target_window}: autonomous success "
                          f"{t['autonomous_success_last_window']:.2f}, raw (rescues counted) "
                          f"{t['success_last_window']:.2f}")
        console.print(f"policy versions: {describe_versions(summary['versions'])}")
