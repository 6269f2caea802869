"""Running actors as a fleet: what each actor reports, how N actors split the seeds and tasks, and the
supervision of actor processes.

- :class:`ActorMonitor` watches one actor (an ``EventSink`` wrapper plus the actor's ``on_episode``) and
  answers an :class:`ActorStatus`: episodes, success and intervention rates, the version acting now,
  steps/s, publisher counters, registry switches and refusals. ``sop actor`` shows it as its status line
  and writes it as JSON for ``sop fleet``, which adds them up with :func:`aggregate`.
- :func:`plan_fleet` gives N actors distinct ids, interleaved seeds (actor i runs ``start + i + k*N``:
  no two actors replay a placement) and task orders rotated by i (the fleet spreads over the tasks).
- :class:`ProcessFleet` starts actor processes in their own sessions (a Ctrl-C in the terminal reaches
  only the supervisor) and stops them: SIGTERM, wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from producers.interfaces import EpisodeStats, EventSink

RUNNING, STOPPING, DONE, FAILED = "running", "stopping", "done", "failed"


@dataclass(kw_only=True)
class ActorStatus:
    """One actor's state as shown live and written for ``sop fleet`` (JSON-able)."""

    actor_id: str
    pid: int = 0
    state: str = RUNNING
    started_at: float = 0.0  # wall clock
    updated_at: float = 0.0
    steps: int = 0
    human_steps: int = 0
    episodes: int = 0
    successes: int = 0
    aborted: int = 0
    episodes_with_takeover: int = 0
    takeovers: int = 0
    steps_per_s: float = 0.0  # over the last few seconds
    version: str | None = None  # the version that acted the latest step
    versions: dict[str, int] = field(default_factory=dict)  # version -> steps acted
    first_step_of: dict[str, float] = field(default_factory=dict)  # version -> wall time of its first step here
    switches: list[dict[str, Any]] = field(default_factory=list)  # the policy source's history
    refused: dict[str, str] = field(default_factory=dict)  # version -> why it was refused
    delivered: int = 0
    failed: int = 0
    in_flight: int = 0
    spool: dict[str, Any] = field(default_factory=dict)  # the publisher's spool counters (state, pending, bytes, ...)
    error: str | None = None

    @property
    def finished_episodes(self) -> int:
        """Episodes that ran to an outcome (ABORTED ones, cut short by a stop, do not count in the rates)."""
        return self.episodes - self.aborted

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.finished_episodes if self.finished_episodes else None

    @property
    def intervention_rate(self) -> float | None:
        """Share of finished episodes in which the operator took over at least once."""
        return self.episodes_with_takeover / self.finished_episodes if self.finished_episodes else None

    @property
    def human_step_share(self) -> float | None:
        return self.human_steps / self.steps if self.steps else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ActorStatus:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        """Replace ``path`` atomically (a reader never sees half a file)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> ActorStatus | None:
        try:
            return cls.from_json(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


class ActorMonitor:
    """Counts what one actor does. Wrap its sink with :meth:`sink` and pass :meth:`on_episode` to the
    ``Actor``; :meth:`status` is safe to call from another thread."""

    def __init__(self, actor_id: str, *, rate_window_s: float = 5.0, clock: Any = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._status = ActorStatus(actor_id=actor_id, pid=os.getpid(), started_at=clock(), updated_at=clock())
        self._rate_window_s = rate_window_s
        self._marks: deque[tuple[float, int]] = deque()

    def sink(self, inner: EventSink) -> MonitoredSink:
        return MonitoredSink(inner, self)

    def on_step(self, record: Mapping[str, Any]) -> None:
        version = record["policy_version"]
        with self._lock:
            st = self._status
            st.steps += 1
            st.human_steps += record["controller"] == "HUMAN"
            st.version = version
            st.versions[version] = st.versions.get(version, 0) + 1
            if version not in st.first_step_of:
                st.first_step_of[version] = record["event_time_us"] / 1e6

    def on_episode(self, stats: EpisodeStats) -> None:
        with self._lock:
            st = self._status
            st.episodes += 1
            st.successes += stats.outcome == "SUCCESS"
            st.aborted += stats.outcome == "ABORTED"
            st.takeovers += stats.interventions
            st.episodes_with_takeover += stats.interventions > 0 and stats.outcome != "ABORTED"

    def status(self, **updates: Any) -> ActorStatus:
        """A copy of the status now; ``updates`` (state, publisher counters, switches, ...) are stored first."""
        now = self._clock()
        with self._lock:
            st = self._status
            for key, value in updates.items():
                setattr(st, key, value)
            st.updated_at = now
            self._marks.append((now, st.steps))
            while len(self._marks) > 2 and now - self._marks[1][0] >= self._rate_window_s:
                self._marks.popleft()
            (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
            st.steps_per_s = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
            return ActorStatus.from_json(st.to_json())


class MonitoredSink:
    """An ``EventSink`` that tells an :class:`ActorMonitor` about every Step it passes on."""

    def __init__(self, inner: EventSink, monitor: ActorMonitor) -> None:
        self.inner = inner
        self.monitor = monitor

    def publish(self, record_name: str, record: dict, *, key: str) -> None:
        self.inner.publish(record_name, record, key=key)
        if record_name == "Step":
            self.monitor.on_step(record)

    def flush(self, timeout_s: float = 30.0) -> int:
        return self.inner.flush(timeout_s)


@dataclass(frozen=True)
class FleetTotals:
    actors: int
    running: int
    steps: int
    episodes: int
    successes: int
    finished_episodes: int
    episodes_with_takeover: int
    steps_per_s: float
    delivered: int
    failed: int
    versions: dict[str, int]  # version -> actors acting it now

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.finished_episodes if self.finished_episodes else None

    @property
    def intervention_rate(self) -> float | None:
        return self.episodes_with_takeover / self.finished_episodes if self.finished_episodes else None


def aggregate(statuses: Sequence[ActorStatus]) -> FleetTotals:
    versions: dict[str, int] = {}
    for st in statuses:
        if st.version is not None and st.state == RUNNING:
            versions[st.version] = versions.get(st.version, 0) + 1
    return FleetTotals(
        actors=len(statuses),
        running=sum(st.state == RUNNING for st in statuses),
        steps=sum(st.steps for st in statuses),
        episodes=sum(st.episodes for st in statuses),
        successes=sum(st.successes for st in statuses),
        finished_episodes=sum(st.finished_episodes for st in statuses),
        episodes_with_takeover=sum(st.episodes_with_takeover for st in statuses),
        steps_per_s=sum(st.steps_per_s for st in statuses if st.state == RUNNING),
        delivered=sum(st.delivered for st in statuses),
        failed=sum(st.failed for st in statuses),
        versions=versions,
    )


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- planning ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetMember:
    index: int
    actor_id: str
    seed_start: int
    seed_stride: int
    tasks: tuple[str, ...]


def plan_fleet(
    actors: int, tasks: Sequence[str], *, seeds: range, id_prefix: str = "actor", seed_start: int | None = None
) -> list[FleetMember]:
    """Ids, interleaved seeds and rotated task orders for ``actors`` actors (see the module doc).

    ``seeds`` is the range the fleet may use (the simulated fleet passes ``sim.tasks.ONLINE_SEEDS``);
    ``seed_start`` (default ``seeds.start``) must lie in it."""
    if actors < 1:
        raise ValueError(f"a fleet needs at least 1 actor, got {actors}")
    if not tasks:
        raise ValueError("a fleet needs at least one task")
    seed_start = seeds.start if seed_start is None else seed_start
    if seed_start not in seeds:
        raise ValueError(f"seed_start {seed_start} must lie in the fleet's seeds {seeds.start}..{seeds.stop - 1}")
    tasks = tuple(tasks)
    return [
        FleetMember(
            index=i,
            actor_id=f"{id_prefix}-{i:02d}",
            seed_start=seed_start + i,
            seed_stride=actors,
            tasks=tasks[i % len(tasks):] + tasks[: i % len(tasks)],
        )
        for i in range(actors)
    ]


# -- processes -----------------------------------------------------------------------------------------------

@dataclass
class Member:
    name: str
    process: subprocess.Popen
    log_path: Path | None
    log: IO[bytes] | None
    returncode: int | None = None
    killed: bool = False  # needed SIGKILL


class ProcessFleet:
    """Child processes started in their own sessions and stopped with SIGTERM, then SIGKILL."""

    def __init__(self) -> None:
        self.members: list[Member] = []

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              log_path: Path | None = None) -> Member:
        log = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115 - closed in _reap
        process = subprocess.Popen(
            list(argv), env=None if env is None else dict(env), stdin=subprocess.DEVNULL,
            stdout=log if log is not None else subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        member = Member(name, process, log_path, log)
        self.members.append(member)
        return member

    def poll(self) -> list[Member]:
        """Members that are still running (exit codes of the others are recorded)."""
        for m in self.members:
            if m.returncode is None and m.process.poll() is not None:
                self._reap(m)
        return [m for m in self.members if m.returncode is None]

    def stop(self, *, grace_s: float = 15.0) -> None:
        """SIGTERM every running member, wait up to ``grace_s`` for all, SIGKILL the rest."""
        for m in self.poll():
            with contextlib.suppress(ProcessLookupError):
                m.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.poll() and time.monotonic() < deadline:
            time.sleep(0.05)
        for m in self.poll():
            m.killed = True
            with contextlib.suppress(ProcessLookupError):
                m.process.kill()
            m.process.wait()
            self._reap(m)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for every member to end by itself; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _reap(self, m: Member) -> None:
        m.returncode = m.process.wait()
        if m.log is not None:
            m.log.close()
            m.log = None


def log_tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
