"""The runtime side of a registered policy: loading an MLflow model version into a ready-to-act
:class:`~producers.interfaces.Policy` with the robot's *own* code, and registering a policy described by a config
alone (the simulated world registers its scripted expert this way: ``sim.expert_version``).

A version is data (``infra.model_versions``): a ``config.json`` declaring its architecture plus data files
(weights), each pinned by a SHA-256 in the version's tags. The loader downloads it, verifies every hash, and
calls the builder the robot process was given for that architecture (``architectures``: name -> builder; `sop
actor` passes SOP's own ``sop-vla`` and ``scripted-expert`` and those a robot's package declares). A version with
an architecture the robot does not know, a hash that does not match, or a pickled pyfunc (the first format) is
refused; nothing from the registry is unpickled or imported.

The registry's version number (a string, e.g. "3") is the policy version actors record in
``Step.policy_version``: the builder receives it with the files.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from infra import registry
from infra.model_versions import Builder, build, fetch_version, publish_files, write_config
from infra.registry import registry_client
from producers.interfaces import Policy

DEFAULT_MODEL_NAME = "sop-policy"
DEFAULT_ALIAS = "champion"
DEFAULT_EXPERIMENT = "sop"  # the experiment `sop up` creates with a pinned artifact root


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/N`` -> (NAME, "N", None).
    ValueError for any other URI."""
    prefix = "models:/"
    if not model_uri.startswith(prefix):
        raise ValueError(f"not a registered-model URI (models:/NAME@ALIAS or models:/NAME/N): {model_uri!r}")
    rest = model_uri[len(prefix) :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    if not version.isdigit():
        raise ValueError(f"registered-model URI needs @ALIAS or a numeric version: {model_uri!r}")
    return name, version, None


def resolve_model_version(model_uri: str, *, tracking_uri: str | None = None, registry_uri: str | None = None) -> str:
    """The version number a ``models:/`` URI points to now (an alias is resolved at this moment)."""
    name, version, alias = parse_model_uri(model_uri)
    if version is not None:
        return version
    client = registry_client(tracking_uri, registry_uri)
    return str(client.get_model_version_by_alias(name, alias).version)


def load_policy_from_registry(
    model_uri: str,
    *,
    architectures: Mapping[str, Builder],
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    dst_path: str | None = None,
) -> Policy:
    """Download, verify and build a policy version (``models:/NAME@ALIAS`` or ``models:/NAME/N``). For an alias
    the exact version it points at is resolved first, so a concurrent alias move cannot mislabel it.
    Raises ``infra.model_versions.VersionRefused`` (tampered, pickled, unknown architecture, not a policy)."""
    name = parse_model_uri(model_uri)[0]
    version = resolve_model_version(model_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    client = registry_client(tracking_uri, registry_uri)
    dst = Path(dst_path or tempfile.mkdtemp(prefix="sop-policy-"))
    local = fetch_version(client, name, version, dst=dst)
    policy = build(local, architectures, kind="policy")
    if not callable(getattr(policy, "act", None)) or not hasattr(policy, "version"):
        raise TypeError(f"architecture {local.architecture!r} built a {type(policy).__name__}, which is not a "
                        "SOP policy: it needs an act(observation) method and a version attribute")
    return policy


def register_policy_config(
    architecture: str,
    settings: Mapping[str, Any],
    tracking_uri: str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    alias: str | None = DEFAULT_ALIAS,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    tags: dict[str, str] | None = None,
    files: Callable[[Path], None] | None = None,
) -> str:
    """Register a policy version that is a declared ``architecture`` with ``settings`` (and the data files
    ``files(directory)`` writes, if any) as a new version of ``model_name``; point ``alias`` at it (None: leave
    the alias alone) and return the version number. The experiment is created with ``artifact_location`` if it
    does not exist yet."""
    client = registry_client(tracking_uri)
    experiment_id = registry.experiment_id(client, experiment, artifact_location=artifact_location,
                                          require_location=True)
    registry.ensure_registered_model(client, model_name)

    def write(directory: Path) -> None:
        write_config(directory, kind="policy", architecture=architecture, **dict(settings))
        if files is not None:
            files(directory)

    return publish_files(client, name=model_name, experiment_id=experiment_id, write=write, tags=tags,
                         alias=alias)
