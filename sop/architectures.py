"""The model architectures a SOP process can instantiate from a registered version (a version is data: a config
declaring its architecture, files pinned by SHA-256; ``infra.model_versions``).

    policy_architectures()                              # {"sop-vla": ..., "scripted-expert": ...}
    policy_architectures(["toy-mirror=toy_arm:MirroredPolicy"])   # plus a robot's own, by name
    value_architectures()                               # {"sop-value": ...}

SOP's own builders load lazily (torch and MetaWorld only when a version of theirs arrives). A robot's package
adds its architectures under the entry-point group ``sop.architectures`` (``name = "pkg.module:Builder"``), or
`sop actor --architecture NAME=pkg.module:Builder` names one; a builder is called as ``Builder(local_version)``
with the verified version (``.config``, ``.file(name)``, ``.version``) and returns the policy. The version itself
can only *name* an architecture from this list; it never says which code to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from infra.model_versions import Builder, LocalVersion

ARCHITECTURE_GROUP = "sop.architectures"


def _vla(local: LocalVersion) -> Any:
    from learner.artifacts import policy_from_version

    return policy_from_version(local)


def _expert(local: LocalVersion) -> Any:
    from sim.expert_version import build_expert

    return build_expert(local)


def _value(local: LocalVersion) -> Any:
    from learner.artifacts import value_from_version

    return value_from_version(local)


def parse_architecture(spec: str) -> tuple[str, str]:
    """``NAME=pkg.module:Builder`` (or ``NAME=entry-point``) -> (NAME, target)."""
    name, sep, target = spec.partition("=")
    if not sep or not name.strip() or not target.strip():
        raise ValueError(f"--architecture takes NAME=package.module:Builder, got {spec!r}")
    return name.strip(), target.strip()


def policy_architectures(extra: Sequence[str] = ()) -> dict[str, Builder]:
    """SOP's policy architectures, those installed packages declare (``sop.architectures``) and ``extra``."""
    from producers.plugins import find_factory

    known: dict[str, Builder] = {"sop-vla": _vla, "scripted-expert": _expert}
    for ep in entry_points(group=ARCHITECTURE_GROUP):
        known.setdefault(ep.name, lambda local, _ep=ep: _ep.load()(local))
    for spec in extra:
        name, target = parse_architecture(spec)
        known[name] = find_factory(target, ARCHITECTURE_GROUP)
    return known


def value_architectures() -> dict[str, Builder]:
    """What the processor instantiates value versions with."""
    return {"sop-value": _value}
