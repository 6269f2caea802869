"""`sop fleet`: N `sop actor` processes on this machine, one aggregate view, a clean stop.

    sop fleet --actors 4                              # until Ctrl-C
    sop fleet --actors 2 --tasks drawer-open-v3,reach-v3 --episodes 10 --hz 0

Actor i is ``{id-prefix}-{i:02d}``, runs seeds ``seed-start + i + k*N`` (no two actors share a placement)
and starts its task rotation at task i. Each writes its log and a JSON status under
``$SOP_RUN_DIR/fleet/<time>/``. Ctrl-C or SIGTERM stop them all: SIGTERM (each ends its episode in progress
as ABORTED and flushes), then SIGKILL after ``SOP_FLEET_STOP_GRACE_S``. Exit status 1 if any actor failed.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from producers.fleet import (
    DONE,
    FAILED,
    ActorStatus,
    FleetMember,
    Member,
    ProcessFleet,
    aggregate,
    log_tail,
    plan_fleet,
    rate,
)
from sim.tasks import ONLINE_SEEDS
from sop.actor_settings import load_actor_settings, parse_tasks
from sop.commands.actor import ensure_policy, quiet_mlflow
from sop.metrics import child_ports
from sop.settings import load_settings


def actor_argv(member: FleetMember, *, status_file: Path, hz: float, episodes: int | None,
               duration_s: float | None, operator: bool, image_size: int | None,
               cameras: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "sop", "actor", "--actor-id", member.actor_id, "--tasks", ",".join(member.tasks),
            "--seed-start", str(member.seed_start), "--seed-stride", str(member.seed_stride), "--hz", str(hz),
            "--no-status", "--status-file", str(status_file), "--operator" if operator else "--no-operator"]
    if episodes is not None:
        argv += ["--episodes", str(episodes)]
    if duration_s is not None:
        argv += ["--duration", str(duration_s)]
    if image_size is not None:
        argv += ["--image-size", str(image_size)]
    if cameras is not None:
        argv += ["--cameras", cameras]
    return argv


def fleet_view(members: list[FleetMember], processes: list[Member], statuses: dict[str, ActorStatus | None],
               started: float) -> Group:
    table = Table(title=f"fleet · {time.monotonic() - started:,.0f}s", expand=False)
    for column in ("actor", "pid", "state", "version", "episodes", "success", "takeover", "steps/s", "steps",
                   "acked", "failed"):
        table.add_column(column, justify="left" if column in ("actor", "state") else "right", no_wrap=True)
    for member, process in zip(members, processes, strict=True):
        st = statuses.get(member.actor_id)
        state = "starting" if st is None else st.state
        if process.returncode is not None and (process.returncode != 0 or st is None):
            state = f"exited {process.returncode}" + (" (killed)" if process.killed else "")
        if st is None:
            table.add_row(member.actor_id, str(process.process.pid), state, *["-"] * 8)
            continue
        table.add_row(member.actor_id, str(process.process.pid), state, st.version or "-", str(st.episodes),
                      rate(st.success_rate), rate(st.intervention_rate), f"{st.steps_per_s:,.0f}",
                      f"{st.steps:,}", f"{st.delivered:,}", str(st.failed))
    totals = aggregate([st for st in statuses.values() if st is not None])
    versions = ", ".join(f"v{v} × {n}" for v, n in sorted(totals.versions.items())) or "-"
    running = sum(p.returncode is None for p in processes)
    table.add_row("[bold]fleet", "", f"{running} running", versions,
                  str(totals.episodes), rate(totals.success_rate), rate(totals.intervention_rate),
                  f"{totals.steps_per_s:,.0f}", f"{totals.steps:,}", f"{totals.delivered:,}", str(totals.failed),
                  style="bold")
    return Group(table)


@click.command("fleet")
@click.option("--actors", default=2, show_default=True, help="Number of actor processes.")
@click.option("--tasks", default=None, help="Comma-separated tasks every actor runs [default: SOP_ACTOR_TASKS].")
@click.option("--hz", type=float, default=None,
              help="Control rate per actor; 0 = as fast as possible [default: SOP_ACTOR_CONTROL_HZ = 30].")
@click.option("--episodes", type=int, default=None, help="Episodes per actor, then it stops.")
@click.option("--duration", "duration_s", type=float, default=None,
              help="Seconds after which actors stop starting episodes.")
@click.option("--operator/--no-operator", default=True, show_default=True)
@click.option("--image-size", type=int, default=None, help="Camera image side [default: SOP_ACTOR_IMAGE_SIZE].")
@click.option("--cameras", default=None, metavar="N|NAMES",
              help="Cameras per step: a count (MetaWorld's first N) or names [default: SOP_ACTOR_CAMERAS]; the "
                   "processor must run with the same SOP_ACTOR_CAMERAS.")
@click.option("--seed-start", type=int, default=ONLINE_SEEDS.start, show_default=True)
@click.option("--id-prefix", default="actor", show_default=True, help="Actor ids are PREFIX-00, PREFIX-01, …")
@click.option("--register-expert-if-missing", is_flag=True,
              help="Register the noisy scripted expert once, before the actors start, if the alias is unset.")
def command(actors: int, tasks: str | None, hz: float | None, episodes: int | None, duration_s: float | None,
            operator: bool, image_size: int | None, cameras: str | None, seed_start: int, id_prefix: str,
            register_expert_if_missing: bool) -> None:
    """Run N actor processes with an aggregate live view; Ctrl-C stops them all cleanly."""
    quiet_mlflow()
    settings = load_settings()
    actor_settings = load_actor_settings()
    console = Console()
    if cameras is not None:
        from sop.actor_settings import camera_list

        try:
            cameras = camera_list(cameras)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    try:
        members = plan_fleet(actors, parse_tasks(tasks) if tasks is not None else actor_settings.tasks,
                             seeds=ONLINE_SEEDS, id_prefix=id_prefix, seed_start=seed_start)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if episodes is not None and episodes < 1:
        raise click.BadParameter(f"--episodes must be >= 1, got {episodes}")
    bootstrap = settings.bootstrap()
    if register_expert_if_missing and (version := ensure_policy(settings, actor_settings)):
        console.print(f"registered the noisy scripted expert as {settings.policy_model_name} version {version}")
    run_dir = settings.run_path / "fleet" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Children find the broker without the run directory's broker.json (an external one stays external).
    env = {**os.environ, "SOP_KAFKA_BOOTSTRAP": bootstrap, "SOP_MLFLOW_TRACKING_URI": settings.tracking_uri}
    status_files = {m.actor_id: run_dir / f"{m.actor_id}.json" for m in members}
    ports = dict(zip(status_files, child_ports(actor_settings.actor_metrics_port, len(members)), strict=True))
    fleet = ProcessFleet()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        processes = [
            fleet.start(m.actor_id, actor_argv(m, status_file=status_files[m.actor_id],
                                               hz=actor_settings.actor_control_hz if hz is None else hz,
                                               episodes=episodes, duration_s=duration_s, operator=operator,
                                               image_size=image_size, cameras=cameras),
                        env={**env, "SOP_ACTOR_METRICS_PORT": str(ports[m.actor_id])},
                        log_path=run_dir / f"{m.actor_id}.log")
            for m in members
        ]
        console.print(f"started {len(processes)} actors; logs and status in {run_dir}")

        def statuses() -> dict[str, ActorStatus | None]:
            return {aid: ActorStatus.read(path) for aid, path in status_files.items()}

        with Live(fleet_view(members, processes, statuses(), started), console=console, auto_refresh=False,
                  transient=False) as live:
            while fleet.poll() and not stop.is_set():
                stop.wait(actor_settings.actor_status_interval_s)
                live.update(fleet_view(members, processes, statuses(), started), refresh=True)
            if stop.is_set():
                console.print(f"stopping {len(fleet.poll())} actors (SIGTERM, SIGKILL after "
                              f"{actor_settings.fleet_stop_grace_s:.0f}s)…")
                fleet.stop(grace_s=actor_settings.fleet_stop_grace_s)
            live.update(fleet_view(members, processes, statuses(), started), refresh=True)
        console.line()
    finally:
        fleet.stop(grace_s=actor_settings.fleet_stop_grace_s)  # no orphans, whatever happened above
        for sig, old in previous.items():
            signal.signal(sig, old)
    final = statuses()
    bad = [p for p in processes if p.returncode != 0 or getattr(final.get(p.name), "state", None) != DONE]
    for p in bad:
        st = final.get(p.name)
        why = st.error if st is not None and st.state == FAILED and st.error else f"exit status {p.returncode}"
        console.print(f"[red]{p.name} failed ({why}); last lines of {p.log_path}:[/red]\n{log_tail(p.log_path)}")
    totals = aggregate([st for st in final.values() if st is not None])
    console.print(f"fleet: {totals.episodes} episodes, success {rate(totals.success_rate)}, takeover "
                  f"{rate(totals.intervention_rate)}, {totals.steps:,} steps, delivered {totals.delivered:,}, "
                  f"failed {totals.failed}; logs in {run_dir}")
    if bad:
        sys.exit(1)
