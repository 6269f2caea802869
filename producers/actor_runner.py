"""One robot process from start to exit, for any robot: wait for a loadable policy version, run the actor
loop on a thread while reporting its status, flush the publisher, and say what was delivered.

    outcome = run_robot_process(RunnerConfig(actor=ActorConfig(actor_id="a1", seed_start=0),
                                             source=RegistrySourceConfig(tracking_uri=uri),
                                             policy_wait_s=60, status_interval_s=0.5, flush_timeout_s=30),
                                make_robots=lambda: [MyRobot()], operator=None,
                                make_publisher=lambda on_failure: EventPublisher(cfg, on_failure=on_failure,
                                                                                 raise_on_failure=False),
                                reporter=MyReporter())
    outcome.ok        # no actor error, nothing undelivered, no delivery failed

SIGINT/SIGTERM (when run in the main thread) end the episode in progress as ABORTED and flush; a second
one exits at once. ``sop actor`` supplies MetaWorld robots, the simulated operator and a terminal reporter.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from producers.actor import Actor, ActorConfig
from producers.fleet import DONE, FAILED, RUNNING, STOPPING, ActorMonitor, ActorStatus
from producers.interfaces import EpisodeStats, Operator, Robot
from producers.metrics import ActorMetrics
from producers.publisher import EventPublisher, PublisherStats
from producers.registry_source import (
    NoPolicyYetError,
    Refusal,
    RegistryPolicySource,
    RegistrySourceConfig,
    Switch,
)

LOG = logging.getLogger("sop.actor")
PAUSED = "paused"  # the publisher's spool is full: the robot waits between steps


@dataclass(frozen=True, kw_only=True)
class RunnerConfig:
    """How one robot process runs. ``actor.seed_start`` is also the seed of the observation that vets versions;
    ``source.action_dim`` is taken from the first robot."""

    actor: ActorConfig
    source: RegistrySourceConfig
    policy_wait_s: float  # how long to wait for a first loadable version
    status_interval_s: float
    flush_timeout_s: float
    duration_s: float | None = None  # stop starting episodes after this long
    status_file: Path | None = None  # the status as JSON, kept current (what `sop fleet` reads)


class Reporter(Protocol):
    """Where a robot process says what happens (``sop actor``: the terminal)."""

    def waiting(self, wait_s: float, why: NoPolicyYetError) -> None: ...
    def switch(self, switch: Switch) -> None: ...
    def refusal(self, refusal: Refusal) -> None: ...
    def running(self) -> AbstractContextManager[Any]: ...  # held while the actor runs (e.g. a live status line)
    def status(self, status: ActorStatus, publisher: PublisherStats) -> None: ...


@dataclass(frozen=True)
class ActorOutcome:
    status: ActorStatus
    undelivered: int  # messages neither acknowledged nor failed when the flush gave up
    error: str | None  # why the actor loop failed
    delivery_failures: list[str] = field(default_factory=list)  # "topic: error", as the publisher reported them
    publisher: PublisherStats | None = None  # after the flush; None when no publisher was started
    spool_directory: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.undelivered == 0 and self.status.failed == 0


def run_robot_process(config: RunnerConfig, *, make_robots: Callable[[], Sequence[Robot]],
                      operator: Operator | None, make_publisher: Callable[[Callable[[Any], None]], EventPublisher],
                      reporter: Reporter, stop_event: threading.Event | None = None,
                      metrics: ActorMetrics | None = None) -> ActorOutcome:
    """Run one actor until its episodes or duration are done, or ``stop_event`` is set (SIGINT/SIGTERM set it
    when this runs in the main thread). Raises ``NoPolicyYetError`` (after writing the status file) when no
    version became loadable in ``policy_wait_s``; errors of ``make_publisher`` (e.g. a bad spool) propagate.
    The robots are closed at the end. ``metrics`` (an endpoint's registry) gets every status, the last one too."""
    stop = stop_event or threading.Event()
    actor_id = config.actor.actor_id
    robots: Sequence[Robot] = []
    restore = install_signal_handlers(stop)
    monitor = ActorMonitor(actor_id)
    source: RegistryPolicySource | None = None
    thread: threading.Thread | None = None
    failures: list[str] = []
    try:
        robots = make_robots()
        source = RegistryPolicySource(replace(config.source, action_dim=robots[0].action_dim),
                                      probe=robots[0].reset(seed=config.actor.seed_start))  # vet versions on what this robot sees
        source.start()
        try:
            source.wait_ready(3.0)
        except NoPolicyYetError as exc:
            reporter.waiting(config.policy_wait_s, exc)
        wait_for_policy(source, stop, config.policy_wait_s)
        if stop.is_set():
            return ActorOutcome(monitor.status(state=DONE), 0, None)
        publisher = make_publisher(lambda f: failures.append(f"{f.topic}: {f.error}"))
        deadline = None if config.duration_s is None else time.monotonic() + config.duration_s

        def on_episode(stats: EpisodeStats) -> None:
            monitor.on_episode(stats)
            if deadline is not None and time.monotonic() >= deadline:
                stop.set()  # let the episode that just ended be the last one

        actor = Actor(list(robots), source, operator, monitor.sink(publisher), config.actor,
                      stop_event=stop, on_episode=on_episode, hold=publisher.wait_for_room)
        crashed: list[BaseException] = []

        def body() -> None:
            try:
                actor.run()
            except BaseException as exc:  # reported by the main thread
                crashed.append(exc)

        thread = threading.Thread(target=body, name=f"actor-{actor_id}", daemon=True)
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
        with reporter.running():
            while thread.is_alive():
                thread.join(config.status_interval_s)
                status = snapshot(STOPPING if stop.is_set() else RUNNING)
                for switch in source.history[shown_switches:]:
                    reporter.switch(switch)
                shown_switches = len(source.history)
                for refusal in source.refusals[shown_refusals:]:
                    reporter.refusal(refusal)
                shown_refusals = len(source.refusals)
                if config.status_file is not None:
                    status.write(config.status_file)
                if metrics is not None:
                    metrics.publish(status, publisher.stats, refusals=source.refused_count)
                reporter.status(status, publisher.stats)
        error = None
        if crashed:
            error = f"{type(crashed[0]).__name__}: {crashed[0]}"
            LOG.error("actor %s failed", actor_id, exc_info=crashed[0])
        undelivered = publisher.close(config.flush_timeout_s)
        final = snapshot(FAILED if error else DONE)
        final.error = error
        if config.status_file is not None:
            final.write(config.status_file)
        if metrics is not None:
            metrics.publish(final, publisher.stats, refusals=source.refused_count)
        return ActorOutcome(final, undelivered, error, delivery_failures=failures, publisher=publisher.stats,
                            spool_directory=publisher.spool_directory)
    except NoPolicyYetError as exc:
        status = monitor.status(state=FAILED, error=str(exc), refused=source.refused if source else {})
        if config.status_file is not None:
            status.write(config.status_file)
        raise
    finally:
        restore()
        if source is not None:
            source.close()
        if thread is None or not thread.is_alive():  # a second signal leaves a robot mid-step: let exit reap it
            for robot in robots:
                close = getattr(robot, "close", None)  # optional for robots from outside SOP
                if callable(close):
                    close()


def wait_for_policy(source: RegistryPolicySource, stop: threading.Event, timeout_s: float) -> None:
    """Wait for the first version, in slices so that a signal during the wait stops it."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            source.wait_ready(min(1.0, max(0.01, deadline - time.monotonic())))
            return
        except NoPolicyYetError:
            if time.monotonic() >= deadline:
                raise


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop`` (the episode in progress ends ABORTED); a second one exits at once.
    Returns the function that puts the previous handlers back (a no-op off the main thread)."""
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


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    """A ``Reporter.running`` for reporters without a live view."""
    yield None
