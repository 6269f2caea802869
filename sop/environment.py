"""Every ``SOP_…`` variable the code reads, so that a mistyped one stops a command at start instead of being
ignored (pydantic-settings skips environment variables that match no field)::

    check_environment()   # SettingsError: unknown SOP_ACTOR_TASK (did you mean SOP_ACTOR_TASKS?)

The known names are the fields of the three settings classes (``SOP_`` + the field name) and the few
variables read directly with ``os.environ`` (``DIRECT``, each with its reader); ``sop`` checks at start.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping

from sop.settings import Settings, SettingsError

PREFIX = "SOP_"

# Variables read with os.environ rather than through a settings class: name -> who reads it.
DIRECT: Mapping[str, str] = {
    "SOP_CODEC_KNOWN_VERSIONS": "schemas.codec: the released schema versions this process knows",
    "SOP_PARENT_PID": "sop.processes: a child stops when this parent process is gone",
    "SOP_JAR_CACHE": "infra.kafka: where the Kafka jars are cached",
    "SOP_TOOL_CACHE": "infra.objectstore: where the SeaweedFS build (and its Go caches) live (~/.cache/sop)",
    "SOP_TEST_KAFKA_BOOTSTRAP": "tests/conftest.py: an external broker for the integration tests",
    "SOP_VENV": "infra/setup.sh: where the virtual environment is made",
}


def known_variables() -> frozenset[str]:
    """Every ``SOP_…`` name some part of SOP reads."""
    from sop.actor_settings import ActorSettings  # imports the robot runtime, so only when checking
    from sop.learner_settings import LearnerSettings

    names = {f"{PREFIX}{field.upper()}" for cls in (Settings, ActorSettings, LearnerSettings)
             for field in cls.model_fields}
    return frozenset(names | set(DIRECT))


def unknown_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """Unknown ``SOP_…`` names in ``environ`` (default ``os.environ``) -> the closest known name, or None."""
    env = os.environ if environ is None else environ
    known = known_variables()
    unknown = sorted(name for name in env if name.upper().startswith(PREFIX) and name.upper() not in known)
    return {name: next(iter(difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)), None)
            for name in unknown}


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SettingsError` naming every unknown ``SOP_…`` variable and the closest known one."""
    unknown = unknown_variables(environ)
    if unknown:
        lines = [f"{name}: no such setting" + (f" (did you mean {close}?)" if close else "")
                 for name, close in unknown.items()]
        raise SettingsError("unknown SOP_ variable(s); fix or unset them:\n  " + "\n  ".join(lines))
