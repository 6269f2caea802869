"""`sop actor`: one robot process. Simulated MetaWorld robots (one per task, taken in turn), the policy the
registry alias points at (followed live), the simulated operator, every record published to Kafka.

    sop actor                                  # DEFAULT_SUITE at 30 Hz, until Ctrl-C
    sop actor --tasks drawer-open-v3 --hz 0 --episodes 20 --no-operator
    sop actor --register-expert-if-missing     # registers the noisy expert when the alias is unset
    sop actor --robot my_lab.arms:UR5Adapter --robot-config '{"host": "10.0.0.5", "task": "fold-towel"}' \
              --operator my_lab.teleop:SpaceMouse --operator-config @spacemouse.json

A robot or teleoperation device from outside SOP (``--robot`` / ``--operator``: ``package.module:Factory`` or an
entry point of the groups ``sop.robots`` / ``sop.operators``) is built as ``Factory(**settings)`` with the JSON
settings given; see ``docs/robots.md`` and :mod:`producers.plugins`. A registered version is data declaring its
architecture; the actor builds SOP's own (``sop-vla``, ``scripted-expert``) and those named by
``--architecture NAME=package.module:Builder`` or the entry-point group ``sop.architectures``
(:mod:`sop.architectures`), and refuses any other, or one whose files do not match their hashes.

SIGINT/SIGTERM end the episode in progress as ABORTED, flush the publisher and report undelivered
messages; the exit status is 1 when a message could not be delivered or the actor failed.

While Kafka is unreachable the publisher spools to ``<SOP_RUN_DIR>/spool/<actor id>`` (``SOP_ACTOR_SPOOL_*``);
the status line shows the spool, and a full spool pauses the robot between steps (state ``paused``) or,
with ``SOP_ACTOR_SPOOL_WHEN_FULL=fail``, stops the actor with an error. What is left in the spool at exit
is drained by the next ``sop actor`` with the same ``--actor-id``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.live import Live
from rich.text import Text

from producers.fleet import ActorStatus, rate
from sim.tasks import ONLINE_SEEDS
from sop.actor_settings import ActorSettings, load_actor_settings, parse_tasks
from sop.metrics import serve_metrics
from sop.settings import Settings, load_settings

if TYPE_CHECKING:
    from producers.actor_runner import ActorOutcome
    from producers.publisher import EventPublisher, PublisherStats
    from producers.registry_source import Refusal, Switch



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
    # a robot / teleoperation device from outside SOP: package.module:Factory or an entry-point name
    robot: str | None = None
    robot_settings: Mapping[str, Any] = field(default_factory=dict)
    operator_device: str | None = None  # replaces the simulated operator
    operator_settings: Mapping[str, Any] = field(default_factory=dict)
    # policy architectures of this robot's own code beyond SOP's: NAME=package.module:Builder
    architectures: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.actor_id:
            raise ValueError("--actor-id must not be empty")
        if not self.tasks and self.robot is None:
            raise ValueError("--tasks lists no task")
        if self.robot_settings and self.robot is None:
            raise ValueError("--robot-config needs --robot")
        if self.operator_settings and self.operator_device is None:
            raise ValueError("--operator-config needs --operator package.module:Factory")
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
        from sop.architectures import parse_architecture

        for spec in self.architectures:
            parse_architecture(spec)
        if self.seed_start not in ONLINE_SEEDS:
            raise ValueError(
                f"--seed-start {self.seed_start} must lie in the online seeds {ONLINE_SEEDS.start}..{ONLINE_SEEDS.stop - 1}"
                " (demonstration and evaluation placements stay out of online training)"
            )


def quiet_mlflow() -> None:
    """MLflow's warnings (e.g. about logged models without an MLmodel file) are noise for a robot."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\..*)?")
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)


def ensure_policy(settings: Settings, actor_settings: ActorSettings) -> str | None:
    """Register the noisy scripted expert as ``policy_model_name@policy_alias`` if the alias is unset.
    Returns the version registered, or None when the alias already pointed somewhere."""
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client
    from sim.expert_version import register_expert_policy

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


def _architectures(specs: tuple[str, ...], make: Callable[[tuple[str, ...]], Any]) -> Any:
    from producers.plugins import PluginError

    try:
        return make(specs)
    except (ValueError, PluginError) as exc:
        raise click.BadParameter(str(exc), param_hint="--architecture") from None


def run_actor(run: ActorRun, *, settings: Settings, actor_settings: ActorSettings, console: Console,
              stop_event: threading.Event | None = None) -> ActorOutcome:
    """Run one actor until its episodes or duration are done, or ``stop_event`` is set (SIGINT/SIGTERM set it
    when this runs in the main thread): simulated robots and operator plugged into ``producers.actor_runner``."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from producers.actor import ActorConfig
    from producers.actor_runner import RunnerConfig, run_robot_process
    from producers.metrics import ActorMetrics
    from producers.plugins import PluginError, load_operator, load_robot
    from producers.registry_source import NoPolicyYetError, RegistrySourceConfig
    from producers.spool import SpoolError
    from sim.operator import GatedExpertOperator
    from sop.architectures import policy_architectures
    from sop.commands.loadgen import make_publisher

    settings.bootstrap()  # fail before building robots when there is no Kafka
    if run.register_expert_if_missing and (version := ensure_policy(settings, actor_settings)):
        console.print(f"registered the noisy scripted expert as {settings.policy_model_name} version {version} "
                      f"@{settings.policy_alias} (stand-in until the learner registers a policy)")
    robot_config = {"cameras": actor_settings.cameras, "image_size": run.image_size,
                    "max_steps": settings.max_episode_steps}
    config = RunnerConfig(
        actor=ActorConfig(actor_id=run.actor_id, control_hz=run.control_hz, seed_start=run.seed_start,
                          seed_stride=run.seed_stride, max_episodes=run.episodes,
                          jpeg_quality=actor_settings.actor_jpeg_quality),
        source=RegistrySourceConfig(tracking_uri=settings.tracking_uri, model_name=settings.policy_model_name,
                                    alias=actor_settings.actor_alias or settings.policy_alias,
                                    fallback_alias=actor_settings.actor_fallback_alias,
                                    poll_interval_s=actor_settings.actor_poll_interval_s,
                                    retry_refused_after_s=actor_settings.actor_retry_refused_after_s,
                                    architectures=_architectures(run.architectures, policy_architectures)),
        policy_wait_s=actor_settings.actor_policy_wait_s, status_interval_s=actor_settings.actor_status_interval_s,
        flush_timeout_s=actor_settings.actor_flush_timeout_s, duration_s=run.duration_s, status_file=run.status_file)

    def publisher(on_failure: Callable[[Any], None]) -> EventPublisher:
        try:
            return make_publisher(settings, on_failure=on_failure, raise_on_failure=False,
                                  spool=actor_settings.spool_config(settings.run_path, run.actor_id),
                                  spill_after_s=actor_settings.actor_spool_after_s)
        except SpoolError as exc:
            raise click.ClickException(str(exc)) from None

    def make_robots() -> list[Any]:
        if run.robot is not None:
            return [load_robot(run.robot, run.robot_settings)]
        # MuJoCo loads only for simulated robots
        from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

        return [MetaWorldRobot(MetaWorldRobotConfig(task=task, **robot_config)) for task in run.tasks]

    try:
        if run.operator_device is not None:
            operator = load_operator(run.operator_device, run.operator_settings)
        elif run.operator:
            operator = GatedExpertOperator(actor_settings.operator_config(), operator_id=f"sim-expert@{run.actor_id}")
        else:
            operator = None
        prometheus = ActorMetrics(control_hz=run.control_hz)
        endpoint = serve_metrics(prometheus.registry, settings=settings, role="actor", name=run.actor_id,
                                 port=actor_settings.actor_metrics_port, setting="SOP_ACTOR_METRICS_PORT")
        try:
            outcome = run_robot_process(
                config, make_robots=make_robots, operator=operator, make_publisher=publisher,
                reporter=_Terminal(console, run.show_status), stop_event=stop_event, metrics=prometheus)
        finally:
            if endpoint is not None:
                endpoint.close()
    except (NoPolicyYetError, PluginError) as exc:
        raise click.ClickException(str(exc)) from None
    for line in outcome.delivery_failures[:5]:
        console.print(f"[red]delivery failed: {line}")
    stats = outcome.publisher
    if stats is not None and stats.spool_pending:
        console.print(f"[yellow]{stats.spool_pending:,} message(s) wait in the spool "
                      f"{outcome.spool_directory}: the next `sop actor --actor-id {run.actor_id}` drains them")
    if stats is not None and stats.spool_state != "off" and (stats.spooled or stats.recovered):
        console.print(spool_summary(stats))
    return outcome


class _Terminal:
    """``sop actor``'s reporter: lines on the console and, when asked, a live status line."""

    def __init__(self, console: Console, live: bool) -> None:
        self.console = console
        self.live = live
        self._view: Live | None = None

    def waiting(self, wait_s: float, why: Exception) -> None:
        self.console.print(f"waiting up to {wait_s:.0f}s (SOP_ACTOR_POLICY_WAIT_S) for a loadable version: {why}")

    def switch(self, switch: Switch) -> None:
        was = f" (was {switch.previous})" if switch.previous else ""
        self.console.print(f"policy version {switch.version}{was}: loaded in {switch.load_s:.2f}s")

    def refusal(self, refusal: Refusal) -> None:
        self.console.print(f"[red]refused policy version {refusal.version}[/red], keeping the current one: "
                           f"{refusal.error}")

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if not self.live:
            yield None
            return
        with Live(Text(""), console=self.console, transient=True, auto_refresh=False,
                  redirect_stdout=False, redirect_stderr=False) as view:
            self._view = view
            try:
                yield None
            finally:
                self._view = None

    def status(self, status: ActorStatus, publisher: PublisherStats) -> None:
        if self._view is not None:
            self._view.update(status_line(status, publisher), refresh=True)


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
@click.option("--operator", "operator_spec", default=None, is_flag=False, flag_value="sim", metavar="sim|SPEC",
              help="Who may take over: 'sim' (the simulated human, SOP_OPERATOR_* thresholds; the default) or a "
                   "teleoperation device, package.module:Factory or an entry point of group sop.operators.")
@click.option("--operator-config", default=None, help="The device's settings: JSON text or @file.json.")
@click.option("--no-operator", is_flag=True, help="No one takes over: the policy drives every step.")
@click.option("--robot", default=None, metavar="SPEC",
              help="A robot from outside SOP instead of the simulated ones: package.module:Factory or an entry "
                   "point of group sop.robots (docs/robots.md).")
@click.option("--robot-config", default=None, help="The robot's settings: JSON text or @file.json.")
@click.option("--architecture", "architectures", multiple=True, metavar="NAME=SPEC",
              help="A policy architecture of the robot's own code, NAME=package.module:Builder (repeatable): a "
                   "registered version declaring NAME is built as Builder(version). SOP's sop-vla and "
                   "scripted-expert and entry points of group sop.architectures are always known.")
@click.option("--hz", type=float, default=None,
              help="Control rate in Hz; 0 = as fast as possible [default: SOP_ACTOR_CONTROL_HZ = 30].")
@click.option("--episodes", type=int, default=None, help="Stop after this many episodes.")
@click.option("--duration", "duration_s", type=float, default=None,
              help="Stop starting episodes after this many seconds.")
@click.option("--image-size", type=int, default=None, help="Camera image side [default: SOP_ACTOR_IMAGE_SIZE].")
@click.option("--cameras", default=None, metavar="N|NAMES",
              help="Cameras per step: a count (MetaWorld's first N) or comma-separated names [default: "
                   "SOP_ACTOR_CAMERAS]. The processor validates steps against its own SOP_ACTOR_CAMERAS: set both.")
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
def command(tasks: str | None, actor_id: str | None, operator_spec: str | None, operator_config: str | None,
            no_operator: bool, robot: str | None, robot_config: str | None, architectures: tuple[str, ...], hz: float | None, episodes: int | None,
            duration_s: float | None, image_size: int | None, cameras: str | None, seed_start: int, seed_stride: int,
            register_expert_if_missing: bool, show_status: bool | None, status_file: Path | None,
            loglevel: str) -> None:
    """Run one robot: episodes with the policy the registry alias points at, streamed to Kafka."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one CPU policy query is fastest single-threaded here
    quiet_mlflow()
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    actor_settings = load_actor_settings()
    console = Console(stderr=False)
    from producers.plugins import PluginError, parse_settings

    if no_operator and operator_spec not in (None, "none"):
        raise click.UsageError("--no-operator and --operator contradict each other")
    if robot is not None and tasks is not None:
        raise click.UsageError("--tasks chooses simulated tasks; a --robot runs its own task (robot.task)")
    device = None if operator_spec in (None, "sim", "none") else operator_spec
    if cameras is not None:
        from sop.actor_settings import camera_list

        try:
            actor_settings = actor_settings.model_copy(update={"actor_cameras": camera_list(cameras)})
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    try:
        hz = actor_settings.actor_control_hz if hz is None else hz
        run = ActorRun(
            actor_id=actor_id or f"actor-{socket.gethostname()}-{os.getpid()}",
            tasks=() if robot is not None else parse_tasks(tasks) if tasks is not None else actor_settings.tasks,
            operator=not no_operator and operator_spec != "none", control_hz=hz or None, episodes=episodes,
            duration_s=duration_s, robot=robot, robot_settings=parse_settings(robot_config, option="--robot-config"),
            operator_device=device,
            operator_settings=parse_settings(operator_config, option="--operator-config"),
            image_size=image_size or actor_settings.actor_image_size, seed_start=seed_start,
            seed_stride=seed_stride, register_expert_if_missing=register_expert_if_missing,
            show_status=console.is_terminal if show_status is None else show_status, status_file=status_file,
            architectures=architectures,
        )
    except (ValueError, PluginError) as exc:
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
