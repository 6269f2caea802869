"""`sop actor`: one robot process. Simulated MetaWorld robots (one per task, taken in turn), the policy the
registry alias points at (followed live), the simulated operator, every record published to Kafka.

    sop actor                                  # DEFAULT_SUITE at 30 Hz, until Ctrl-C
    sop actor --tasks drawer-open-v3 --hz 0 --episodes 20 --no-operator
    sop actor --register-expert-if-missing     # registers the noisy expert when the alias is unset

SIGINT/SIGTERM end the episode in progress as ABORTED, flush the publisher and report undelivered
messages; the exit status is 1 when a message could not be delivered or the actor failed.

While Kafka is unreachable the publisher spools to ``<SOP_RUN_DIR>/spool/<actor id>`` (``SOP_ACTOR_SPOOL_*``);
the status line shows the spool, and a full spool pauses the robot between steps (state ``paused``) or,
with ``SOP_ACTOR_SPOOL_WHEN_FULL=fail``, stops the actor with an error. What is left in the spool at exit
is drained by the next ``sop actor`` with the same ``--actor-id``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from producers.fleet import ActorStatus, rate
from producers.interfaces import EpisodeStats
from sim.tasks import ONLINE_SEEDS
from sop.actor_settings import ActorSettings, load_actor_settings, parse_tasks
from sop.settings import Settings, load_settings

if TYPE_CHECKING:
    from producers.publisher import PublisherStats
    from producers.registry_source import Refusal, RegistryPolicySource, Switch

LOG = logging.getLogger("sop.actor")
PAUSED = "paused"  # the publisher's spool is full: the robot waits between steps


@dataclass(frozen=True, kw_only=True)
class ActorRun:
    """What one `sop actor` process runs (validated before anything starts)."""

    actor_id: str
    tasks: tuple[str, ...]
    operator: bool = True
    control_hz: float | None = 30.0  # None: as fast as the machine allows
    episodes: int | None = None
    duration_s: float | None = None  # stop starting episodes after this long
    image_size: int = 64
    seed_start: int = ONLINE_SEEDS.start
    seed_stride: int = 1
    register_expert_if_missing: bool = False
    show_status: bool = True
    status_file: Path | None = None

    def __post_init__(self) -> None:
        if not self.actor_id:
            raise ValueError("--actor-id must not be empty")
        if not self.tasks:
            raise ValueError("--tasks lists no task")
        if self.control_hz is not None and not self.control_hz > 0:
            raise ValueError(f"--hz must be > 0, or 0 to run free, got {self.control_hz}")
        if self.episodes is not None and self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in 8..1024, got {self.image_size}")
        if self.seed_stride < 1:
            raise ValueError(f"--seed-stride must be >= 1, got {self.seed_stride}")
        if self.seed_start not in ONLINE_SEEDS:
            raise ValueError(
                f"--seed-start {self.seed_start} must lie in the online seeds {ONLINE_SEEDS.start}..{ONLINE_SEEDS.stop - 1}"
                " (demonstration and evaluation placements stay out of online training)"
            )


@dataclass(frozen=True)
class ActorOutcome:
    status: ActorStatus
    undelivered: int  # messages neither acknowledged nor failed when the flush gave up
    error: str | None  # why the actor loop failed

    @property
    def ok(self) -> bool:
        return self.error is None and self.undelivered == 0 and self.status.failed == 0


def quiet_mlflow() -> None:
    """MLflow warns about pyfunc type hints and pickling on every policy saved or loaded: noise for a robot."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\..*)?")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)


def ensure_policy(settings: Settings, actor_settings: ActorSettings) -> str | None:
    """Register the noisy scripted expert as ``policy_model_name@policy_alias`` if the alias is unset.
    Returns the version registered, or None when the alias already pointed somewhere."""
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client
    from sim.expert_pyfunc import register_expert_policy

    uri = settings.tracking_uri
    client = registry_client(uri)
    try:
        client.get_model_version_by_alias(settings.policy_model_name, settings.policy_alias)
        return None
    except MlflowException:
        pass
    if settings.mlflow_tracking_uri is None:  # the local registry of `sop up`: pin its artifact root
        from infra.mlflow_local import ensure_experiment

        ensure_experiment(uri, settings.artifact_root)
    try:
        return register_expert_policy(uri, noise_sigma=actor_settings.actor_expert_noise,
                                      model_name=settings.policy_model_name, alias=settings.policy_alias)
    except ValueError as exc:  # the experiment is missing on an external tracking server
        raise click.ClickException(f"cannot register the stand-in policy: {exc}") from None


def run_actor(run: ActorRun, *, settings: Settings, actor_settings: ActorSettings, console: Console,
              stop_event: threading.Event | None = None) -> ActorOutcome:
    """Run one actor until its episodes or duration are done, or ``stop_event`` is set (SIGINT/SIGTERM set it
    when this runs in the main thread)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from producers.actor import Actor, ActorConfig
    from producers.fleet import DONE, FAILED, RUNNING, STOPPING, ActorMonitor
    from producers.registry_source import NoPolicyYetError, RegistryPolicySource, RegistrySourceConfig
    from producers.spool import SpoolError
    from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig
    from sim.operator import GatedExpertOperator
    from sop.commands.loadgen import make_publisher

    stop = stop_event or threading.Event()
    settings.bootstrap()  # fail before building robots when there is no Kafka
    if run.register_expert_if_missing and (version := ensure_policy(settings, actor_settings)):
        console.print(f"registered the noisy scripted expert as {settings.policy_model_name} version {version} "
                      f"@{settings.policy_alias} (stand-in until the learner registers a policy)")
    robots: list[MetaWorldRobot] = []
    restore = _install_signal_handlers(stop)
    monitor = ActorMonitor(run.actor_id)
    source: RegistryPolicySource | None = None
    thread: threading.Thread | None = None
    failures: list[str] = []
    try:
        robots = [MetaWorldRobot(MetaWorldRobotConfig(task=task, cameras=actor_settings.cameras,
                                                      image_size=run.image_size,
                                                      max_steps=settings.max_episode_steps)) for task in run.tasks]
        source = RegistryPolicySource(
            RegistrySourceConfig(tracking_uri=settings.tracking_uri, model_name=settings.policy_model_name,
                                 alias=settings.policy_alias, poll_interval_s=actor_settings.actor_poll_interval_s,
                                 action_dim=robots[0].action_dim,
                                 retry_refused_after_s=actor_settings.actor_retry_refused_after_s),
            probe=robots[0].reset(seed=run.seed_start),  # vet versions on what this robot really sees
        )
        source.start()
        try:
            source.wait_ready(3.0)
        except NoPolicyYetError as exc:
            console.print(f"waiting up to {actor_settings.actor_policy_wait_s:.0f}s (SOP_ACTOR_POLICY_WAIT_S) for a "
                          f"loadable version: {exc}")
        _wait_for_policy(source, stop, actor_settings.actor_policy_wait_s)
        if stop.is_set():
            return ActorOutcome(monitor.status(state=DONE), 0, None)
        try:
            publisher = make_publisher(settings, on_failure=lambda f: failures.append(f"{f.topic}: {f.error}"),
                                       raise_on_failure=False,
                                       spool=actor_settings.spool_config(settings.run_path, run.actor_id),
                                       spill_after_s=actor_settings.actor_spool_after_s)
        except SpoolError as exc:
            raise click.ClickException(str(exc)) from None
        deadline = None if run.duration_s is None else time.monotonic() + run.duration_s

        def on_episode(stats: EpisodeStats) -> None:
            monitor.on_episode(stats)
            if deadline is not None and time.monotonic() >= deadline:
                stop.set()  # let the episode that just ended be the last one

        actor = Actor(
            robots, source,
            GatedExpertOperator(actor_settings.operator_config(), operator_id=f"sim-expert@{run.actor_id}")
            if run.operator else None,
            monitor.sink(publisher),
            ActorConfig(actor_id=run.actor_id, control_hz=run.control_hz, seed_start=run.seed_start,
                        seed_stride=run.seed_stride, max_episodes=run.episodes,
                        jpeg_quality=actor_settings.actor_jpeg_quality),
            stop_event=stop, on_episode=on_episode, hold=publisher.wait_for_room,
        )
        crashed: list[BaseException] = []

        def body() -> None:
            try:
                actor.run()
            except BaseException as exc:  # reported by the main thread
                crashed.append(exc)

        thread = threading.Thread(target=body, name=f"actor-{run.actor_id}", daemon=True)
        thread.start()

        def snapshot(state: str) -> ActorStatus:
            publisher.poll(0)  # serve delivery reports so the acked count is current
            stats = publisher.stats
            if state == RUNNING and stats.paused:
                state = PAUSED
            spool = {k: getattr(stats, k) for k in ("spool_state", "spooled", "drained", "recovered", "spool_pending",
                                                     "spool_bytes", "spool_max_bytes", "ambiguous", "spills")
                     if hasattr(stats, k)}
            return monitor.status(state=state, delivered=stats.delivered, failed=stats.failed,
                                  in_flight=stats.in_flight, switches=[asdict(s) for s in source.history],
                                  refused=source.refused, spool=spool)

        shown_switches = shown_refusals = 0
        with Live(Text(""), console=console, transient=True, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) if run.show_status else _Nothing() as live:
            while thread.is_alive():
                thread.join(actor_settings.actor_status_interval_s)
                status = snapshot(STOPPING if stop.is_set() else RUNNING)
                shown_switches = _report_switches(console, source.history, shown_switches)
                shown_refusals = _report_refusals(console, source.refusals, shown_refusals)
                if run.status_file is not None:
                    status.write(run.status_file)
                if run.show_status:
                    live.update(status_line(status, publisher.stats), refresh=True)
        error = None
        if crashed:
            error = f"{type(crashed[0]).__name__}: {crashed[0]}"
            LOG.error("actor %s failed", run.actor_id, exc_info=crashed[0])
        undelivered = publisher.close(actor_settings.actor_flush_timeout_s)
        final = snapshot(FAILED if error else DONE)
        final.error = error
        if run.status_file is not None:
            final.write(run.status_file)
        for line in failures[:5]:
            console.print(f"[red]delivery failed: {line}")
        if publisher.stats.spool_pending:
            console.print(f"[yellow]{publisher.stats.spool_pending:,} message(s) wait in the spool "
                          f"{publisher.spool_directory}: the next `sop actor --actor-id {run.actor_id}` drains them")
        if publisher.stats.spool_state != "off" and (publisher.stats.spooled or publisher.stats.recovered):
            console.print(spool_summary(publisher.stats))
        return ActorOutcome(final, undelivered, error)
    except NoPolicyYetError as exc:
        error = str(exc)
        status = monitor.status(state=FAILED, error=error, refused=source.refused if source else {})
        if run.status_file is not None:
            status.write(run.status_file)
        raise click.ClickException(error) from None
    finally:
        restore()
        if source is not None:
            source.close()
        if thread is None or not thread.is_alive():  # a second signal leaves a robot mid-step: let exit reap it
            for robot in robots:
                robot.close()


def _wait_for_policy(source: RegistryPolicySource, stop: threading.Event, timeout_s: float) -> None:
    """Wait for the first version, in slices so that a signal during the wait stops it."""
    from producers.registry_source import NoPolicyYetError

    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            source.wait_ready(min(1.0, max(0.01, deadline - time.monotonic())))
            return
        except NoPolicyYetError:
            if time.monotonic() >= deadline:
                raise


class _Nothing:
    def __enter__(self) -> _Nothing:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, *args: object, **kw: object) -> None:
        pass


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop`` (the episode in progress ends ABORTED); a second one exits at once."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _report_switches(console: Console, history: list[Switch], shown: int) -> int:
    for switch in history[shown:]:
        was = f" (was {switch.previous})" if switch.previous else ""
        console.print(f"policy version {switch.version}{was}: loaded in {switch.load_s:.2f}s")
    return len(history)


def _report_refusals(console: Console, refusals: list[Refusal], shown: int) -> int:
    for refusal in refusals[shown:]:
        console.print(f"[red]refused policy version {refusal.version}[/red], keeping the current one: {refusal.error}")
    return len(refusals)


def status_line(status: ActorStatus, publisher: PublisherStats | None = None) -> Text:
    line = Text()
    line.append(f"{status.actor_id} ", style="bold")
    line.append(f"{status.state} · v{status.version or '-'} · {status.episodes} episodes · "
                f"success {rate(status.success_rate)} · takeover {rate(status.intervention_rate)} · "
                f"human steps {rate(status.human_step_share)} · {status.steps:,} steps · "
                f"{status.steps_per_s:,.0f} steps/s · acked {status.delivered:,}")
    if status.failed:
        line.append(f" · failed {status.failed}", style="red")
    if status.refused:
        line.append(f" · refused {sorted(status.refused)}", style="yellow")
    if publisher is not None and publisher.paused:
        line.append(f" · PAUSED: spool full ({publisher.spool_bytes / 2**20:,.0f} MiB), waiting for Kafka",
                    style="bold red")
    elif publisher is not None and publisher.spool_state in ("spooling", "draining"):
        what = "Kafka unreachable, spooling" if publisher.spool_state == "spooling" else "draining"
        line.append(f" · {what}: {publisher.spool_pending:,} on disk ({publisher.spool_bytes / 2**20:,.1f} of "
                    f"{publisher.spool_max_bytes / 2**20:,.0f} MiB)", style="yellow")
    return line


def spool_summary(stats: PublisherStats) -> str:
    return (f"spool: {stats.spooled:,} spooled, {stats.drained:,} drained, {stats.recovered:,} recovered from an "
            f"earlier run, {stats.spool_pending:,} left ({stats.spool_bytes / 2**20:,.1f} MiB), {stats.ambiguous:,} "
            f"ambiguous (sent again, possibly a duplicate), {stats.spills} spill(s), paused {stats.spool_full_waits} time(s)")


def summary(status: ActorStatus) -> str:
    versions = ", ".join(f"{v}: {n:,} steps" for v, n in status.versions.items()) or "none"
    return (f"{status.actor_id}: {status.episodes} episodes ({status.aborted} aborted), success "
            f"{rate(status.success_rate)}, takeover {rate(status.intervention_rate)}, {status.steps:,} steps "
            f"(versions {versions}); delivered {status.delivered:,}, failed {status.failed}, "
            f"in flight {status.in_flight}" + (f"; refused {status.refused}" if status.refused else ""))


@click.command("actor")
@click.option("--tasks", default=None, help="Comma-separated tasks, run in turn [default: SOP_ACTOR_TASKS].")
@click.option("--actor-id", default=None, help="Name of this robot [default: actor-HOST-PID].")
@click.option("--operator/--no-operator", default=True, show_default=True,
              help="The simulated human who takes over (HG-DAgger); thresholds via SOP_OPERATOR_*.")
@click.option("--hz", type=float, default=None,
              help="Control rate in Hz; 0 = as fast as possible [default: SOP_ACTOR_CONTROL_HZ = 30].")
@click.option("--episodes", type=int, default=None, help="Stop after this many episodes.")
@click.option("--duration", "duration_s", type=float, default=None,
              help="Stop starting episodes after this many seconds.")
@click.option("--image-size", type=int, default=None, help="Camera image side [default: SOP_ACTOR_IMAGE_SIZE].")
@click.option("--seed-start", type=int, default=ONLINE_SEEDS.start, show_default=True,
              help="Placement seed of the first episode.")
@click.option("--seed-stride", type=int, default=1, show_default=True,
              help="Episode k uses seed-start + k*stride (a fleet of N interleaves with stride N).")
@click.option("--register-expert-if-missing", is_flag=True,
              help="Register the noisy scripted expert as the policy when the alias is unset.")
@click.option("--status/--no-status", "show_status", default=None,
              help="Live status line [default: on when writing to a terminal].")
@click.option("--status-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Keep writing this actor's status as JSON here (what `sop fleet` reads).")
@click.option("--loglevel", default="warning", type=click.Choice(["debug", "info", "warning", "error"]))
def command(tasks: str | None, actor_id: str | None, operator: bool, hz: float | None, episodes: int | None,
            duration_s: float | None, image_size: int | None, seed_start: int, seed_stride: int,
            register_expert_if_missing: bool, show_status: bool | None, status_file: Path | None,
            loglevel: str) -> None:
    """Run one robot: episodes with the policy the registry alias points at, streamed to Kafka."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one CPU policy query is fastest single-threaded here
    quiet_mlflow()
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    actor_settings = load_actor_settings()
    console = Console(stderr=False)
    try:
        hz = actor_settings.actor_control_hz if hz is None else hz
        run = ActorRun(
            actor_id=actor_id or f"actor-{socket.gethostname()}-{os.getpid()}",
            tasks=parse_tasks(tasks) if tasks is not None else actor_settings.tasks,
            operator=operator, control_hz=hz or None, episodes=episodes, duration_s=duration_s,
            image_size=image_size or actor_settings.actor_image_size, seed_start=seed_start,
            seed_stride=seed_stride, register_expert_if_missing=register_expert_if_missing,
            show_status=console.is_terminal if show_status is None else show_status, status_file=status_file,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if status_file is not None:
        status_file.parent.mkdir(parents=True, exist_ok=True)
    outcome = run_actor(run, settings=settings, actor_settings=actor_settings, console=console)
    console.print(summary(outcome.status))
    if outcome.undelivered:
        console.print(f"[red]{outcome.undelivered} message(s) still undelivered after "
                      f"{actor_settings.actor_flush_timeout_s:.0f}s")
    if outcome.error:
        console.print(f"[red]actor failed: {outcome.error}")
    if not outcome.ok:
        sys.exit(1)
