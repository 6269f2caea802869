"""Settings of the robot side (`sop actor`, `sop fleet`, `sop demos`), overridable by ``SOP_…`` variables.

Same rules as :mod:`sop.settings` (which holds what every command shares): ``actor_poll_interval_s`` ←
``SOP_ACTOR_POLL_INTERVAL_S``, ``operator_divergence_threshold`` ← ``SOP_OPERATOR_DIVERGENCE_THRESHOLD`` …
A bad value stops the command at start with a message naming the variable to fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producers.images import DEFAULT_JPEG_QUALITY
from producers.spool import SpoolConfig
from sim.operator import OperatorConfig
from sim.tasks import DEFAULT_SUITE
from sop.settings import MetricsPort, SettingsError, settings_error

CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")


def camera_list(spec: str) -> str:
    """``--cameras``: a count N (MetaWorld's first N cameras) or comma-separated names, as SOP_ACTOR_CAMERAS text.

    >>> camera_list("3")
    'corner,corner2,corner3'
    """
    spec = spec.strip()
    if spec.isdigit():
        n = int(spec)
        if not 1 <= n <= len(CAMERAS):
            raise ValueError(f"--cameras {n}: a count must be in 1..{len(CAMERAS)} (MetaWorld has {list(CAMERAS)})")
        return ",".join(CAMERAS[:n])
    names = [c.strip() for c in spec.split(",") if c.strip()]
    unknown = [c for c in names if c not in CAMERAS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--cameras {spec!r}: give a count or distinct names from {list(CAMERAS)}, comma-separated")
    return ",".join(names)


class ActorSettings(BaseSettings):
    # SOP_OPERATOR_STALL_STEPS=none disables stall detection (likewise for the other optional values).
    model_config = SettingsConfigDict(env_prefix="SOP_", extra="ignore", frozen=True, env_parse_none_str="none")

    # the robots
    actor_tasks: str = Field(",".join(DEFAULT_SUITE), description="Default task list of `sop actor`/`fleet`/`demos`.")
    actor_cameras: str = Field("corner", description="Comma-separated MetaWorld cameras each step carries.")
    actor_image_size: int = Field(64, ge=8, le=1024, description="Camera image side in pixels.")
    actor_jpeg_quality: int = Field(DEFAULT_JPEG_QUALITY, ge=1, le=95)
    actor_control_hz: float = Field(30.0, ge=0, description="Control rate of a robot (0 = as fast as possible).")

    # following the registry
    actor_poll_interval_s: float = Field(0.5, gt=0, le=60, description="How often actors poll the registry alias.")
    actor_alias: str | None = Field(None, description=(
        "The registry alias this robot follows; unset = SOP_POLICY_ALIAS (champion). A canary follows candidate."))
    actor_fallback_alias: str | None = Field(None, description=(
        "Followed while SOP_ACTOR_ALIAS is not set in the registry (a canary: champion)."))
    actor_policy_wait_s: float = Field(120.0, gt=0, description="How long `sop actor` waits for a first loadable version.")
    actor_retry_refused_after_s: float | None = Field(
        None, gt=0, description="Retry a refused version after this long; unset = never.")
    actor_expert_noise: float = Field(0.2, ge=0, le=2, description="Noise of the scripted-expert stand-in policy.")
    actor_status_interval_s: float = Field(0.5, gt=0, le=60, description="Refresh of the live view / status file.")
    actor_flush_timeout_s: float = Field(60.0, gt=0, description="How long shutdown waits for Kafka acks.")
    actor_metrics_port: MetricsPort = Field(0, description=(
        "Port of the actor's Prometheus endpoint: N, 0 = any free port, or off (`sop fleet` and `sop run` give "
        "actor i the port N + i)."))

    # the on-disk spool of the publisher (producers/spool.py): where events wait while Kafka is unreachable
    actor_spool: bool = Field(True, description="Spill to disk when Kafka is unreachable (false: RAM queue only).")
    actor_spool_dir: Path | None = Field(
        None, description="Spool directory; unset = <SOP_RUN_DIR>/spool/<actor id> (a restart with the same "
                          "--actor-id drains it).")
    actor_spool_max_bytes: int = Field(1 << 30, ge=1 << 20, description="Bound on the spool's files on disk.")
    actor_spool_segment_bytes: int = Field(32 << 20, ge=4096, description="Size of one spool segment file.")
    actor_spool_fsync: Literal["always", "interval", "never"] = Field(
        "interval", description="fsync after every record, every SOP_ACTOR_SPOOL_FSYNC_INTERVAL_S, or never.")
    actor_spool_fsync_interval_s: float = Field(1.0, gt=0, le=60)
    actor_spool_when_full: Literal["pause", "fail"] = Field(
        "pause", description="A full spool pauses the robot until there is room, or stops the actor with an error.")
    actor_spool_after_s: float = Field(
        30.0, gt=0, description="Spill once Kafka has acknowledged nothing for this long while messages wait.")

    # the simulated operator (HG-DAgger gate, see sim/operator.py)
    operator_divergence_threshold: float = 0.5
    operator_gripper_weight: float = 0.25
    operator_takeover_after: int = 3
    operator_reaction_delay: int = 2
    operator_stall_steps: int | None = 20
    operator_stall_min_progress: float = 0.01
    operator_stall_min_motion: float = 0.02
    operator_on_track_threshold: float | None = None
    operator_handback_after: int = 5
    operator_max_drive_steps: int = 25

    # the fleet
    fleet_stop_grace_s: float = Field(15.0, gt=0, description="SIGTERM → SIGKILL grace when `sop fleet` stops.")

    @model_validator(mode="after")
    def _spool_bounds(self) -> ActorSettings:
        if self.actor_spool_segment_bytes > self.actor_spool_max_bytes:
            raise ValueError(f"SOP_ACTOR_SPOOL_SEGMENT_BYTES ({self.actor_spool_segment_bytes}) must not exceed "
                             f"SOP_ACTOR_SPOOL_MAX_BYTES ({self.actor_spool_max_bytes})")
        return self

    def spool_config(self, run_path: Path, actor_id: str) -> SpoolConfig | None:
        """The publisher's spool for ``actor_id`` (None when SOP_ACTOR_SPOOL=false)."""
        if not self.actor_spool:
            return None
        return SpoolConfig(directory=self.actor_spool_dir or run_path / "spool" / actor_id,
                           max_bytes=self.actor_spool_max_bytes, segment_bytes=self.actor_spool_segment_bytes,
                           fsync=self.actor_spool_fsync, fsync_interval_s=self.actor_spool_fsync_interval_s,
                           when_full=self.actor_spool_when_full)

    @field_validator("actor_cameras")
    @classmethod
    def _cameras(cls, v: str) -> str:
        if v.strip().isdigit():
            raise ValueError(f"must be distinct names from {list(CAMERAS)}, comma-separated")
        try:
            return camera_list(v)
        except ValueError:
            raise ValueError(f"must be distinct names from {list(CAMERAS)}, comma-separated") from None

    @field_validator("actor_tasks")
    @classmethod
    def _tasks(cls, v: str) -> str:
        return ",".join(parse_tasks(v))

    @property
    def cameras(self) -> tuple[str, ...]:
        return tuple(self.actor_cameras.split(","))

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.actor_tasks.split(","))

    def operator_config(self) -> OperatorConfig:
        prefix = "operator_"
        values = {name[len(prefix):]: getattr(self, name) for name in type(self).model_fields if name.startswith(prefix)}
        try:
            return OperatorConfig(**values)
        except ValueError as exc:
            # OperatorConfig names its fields; name the variables people set instead.
            message = re.sub(r"OperatorConfig\.(\w+)", lambda m: f"SOP_OPERATOR_{m.group(1).upper()}", str(exc))
            raise SettingsError(f"invalid settings:\n  {message}") from None


def parse_tasks(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), every name a known task (ValueError listing the known ones)."""
    from sim.tasks import TASKS

    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("lists no task")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(sorted(TASKS))}")
    return names


def load_actor_settings(**overrides: object) -> ActorSettings:
    """Read the robot-side settings from the environment; :class:`SettingsError` names the variable to fix."""
    try:
        settings = ActorSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise settings_error(exc) from None
    settings.operator_config()  # the gate's own rules (e.g. gripper weight below the threshold)
    return settings
