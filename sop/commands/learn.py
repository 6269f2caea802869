"""`sop learn`: the online learner (HG-DAgger or RECAP) from Delta to the MLflow registry, until stopped.

Several processes: ``torchrun --nproc-per-node 2 -m sop.commands.learn [options]`` (DDP; gloo on CPU, NCCL on
GPU); only rank 0 registers versions and writes the status file.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any

import click
from rich.console import Console

from sop.learner_settings import (
    load_learner_settings,
    open_lake,
    prepare_registry,
    quiet_mlflow,
    text_encoder,
)
from sop.metrics import serve_metrics
from sop.settings import SettingsError, load_settings


def status_line(status: dict[str, Any]) -> str:
    omega = " ".join(f"{t.removesuffix('-v3')}={w:.2f}" for t, w in sorted((status.get("omega_on") or {}).items()))
    loss = status.get("loss")
    return (f"step {status.get('step')}  loss {loss if loss is None else f'{loss:.4f}'}  "
            f"{status.get('samples_per_s', 0):.0f} samples/s  version {status.get('last_version')}  "
            f"ω_on {omega or '-'}")


@click.command("learn")
@click.option("--algorithm", type=click.Choice(["hg-dagger", "recap"]), default=None,
              help="Default SOP_LEARN_ALGORITHM (hg-dagger).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many learner steps (SOP_LEARN_MAX_STEPS).")
@click.option("--duration", "duration_s", type=float, default=None, help="Stop after this many seconds.")
@click.option("--promotion", type=click.Choice(["auto", "gated"]), default=None,
              help="auto: every version becomes champion; gated: candidate first (SOP_LEARN_PROMOTION).")
@click.option("--sampler", type=click.Choice(["paper", "normalised", "fixed"]), default=None,
              help="paper/normalised adaptive online share, or a fixed one (SOP_LEARN_SAMPLER, "
                   "SOP_LEARN_FIXED_ONLINE_SHARE).")
@click.option("--publish-every", type=int, default=None, help="Learner steps between versions (SOP_LEARN_PUBLISH_EVERY).")
@click.option("--quiet", is_flag=True, help="No live line; print a status line every 30 s instead.")
def command(algorithm: str | None, max_steps: int | None, duration_s: float | None, promotion: str | None,
            sampler: str | None, publish_every: int | None, quiet: bool) -> None:
    """Learn continuously from the Delta tables and publish `sop-policy` versions (Ctrl-C stops cleanly)."""
    from learner.ddp import init_from_env, shutdown
    from learner.feeder import FeederConfig
    from learner.metrics import LearnerMetrics
    from learner.online import LearnConfig, NoTrainingData, run_learning
    from learner.promotion import GateConfig

    quiet_mlflow()
    shared = load_settings()
    overrides = {k: v for k, v in {"learn_algorithm": algorithm, "learn_max_steps": max_steps,
                                   "learn_duration_s": duration_s, "learn_promotion": promotion,
                                   "learn_sampler": sampler, "learn_publish_every": publish_every}.items()
                 if v is not None}
    settings = load_learner_settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    info = init_from_env(settings.device())
    main = info is None or info.is_main
    try:
        config = LearnConfig(
            model=settings.policy_config(), train=settings.train_config(), sampler=settings.sampler_config(),
            recap=settings.recap_config(shared),
            feeder=FeederConfig(tasks=settings.tasks(), poll_interval_s=settings.learn_poll_s),
            gate=GateConfig(min_episodes=settings.gate_min_episodes, tolerance=settings.gate_tolerance,
                            alpha=settings.gate_alpha, check_interval_s=settings.gate_check_s,
                            gc_keep_last=settings.registry_gc_keep_last, gc_active_s=settings.registry_gc_active_s,
                            gc_every_s=settings.registry_gc_every_s),
            promotion=settings.learn_promotion, max_steps=settings.learn_max_steps,
            duration_s=settings.learn_duration_s, log_every=settings.learn_log_every,
            policy_name=shared.policy_model_name, champion_alias=shared.policy_alias,
            candidate_alias=settings.candidate_alias)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    tracking_uri = prepare_registry(shared) if main else shared.tracking_uri
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    console = Console(stderr=True)
    live = console.status("learner starting…") if main and not quiet and console.is_terminal else None
    last_print = [0.0]

    def show(status: dict[str, Any]) -> None:
        if status.get("state") != "running":
            return
        if live is not None:
            live.update(status_line(status))
            return
        now = time.monotonic()
        if now - last_print[0] >= 30:
            last_print[0] = now
            console.print(status_line(status), highlight=False)

    status_path = shared.run_path / "learner" / "status.json"
    prometheus = LearnerMetrics() if main else None
    endpoint = None if prometheus is None else serve_metrics(
        prometheus.registry, settings=shared, role="learner", name=f"learner@{socket.gethostname()}",
        port=settings.learn_metrics_port, setting="SOP_LEARN_METRICS_PORT")
    if live is not None:
        live.start()
    try:
        summary = run_learning(config, lake=open_lake(shared), tracking_uri=tracking_uri, text=text_encoder(shared),
                               status_path=status_path, stop=stop, dist_info=info, on_status=show if main else None,
                               prometheus=prometheus)
    except NoTrainingData as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if live is not None:
            live.stop()
        if endpoint is not None:
            endpoint.close()
        shutdown(info)
    if main:
        console.print(f"[green]learner stopped[/] ({summary.stopped_by}) at step {summary.final_step}; "
                      f"{len(summary.versions)} version(s) registered"
                      + (f", last {summary.versions[-1]}" if summary.versions else "")
                      + f"; status in {status_path}")


if __name__ == "__main__":  # torchrun -m sop.commands.learn
    command()
