"""Loading registered versions back, for resuming training and for evaluation.

    resumed = load_latest("sop-policy", tracking_uri=uri)     # None on a fresh start
    model = resumed.model if resumed else VLAPolicy(cfg)
    start = resumed.lineage["learner_step"] if resumed else 0
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from infra.model_versions import LegacyPickledVersion, build, fetch_version, version_source
from infra.registry import registry_client
from learner.artifacts import ARCHITECTURES, legacy_runtime, policy_from_version, value_from_version
from learner.publishing import POLICY_NAME

BUILDERS = {ARCHITECTURES["policy"]: policy_from_version, ARCHITECTURES["value"]: value_from_version}


@dataclass(frozen=True, kw_only=True)
class RegisteredVersion:
    """A version loaded back for resuming training or for evaluation."""

    name: str
    version: str
    runtime: Any  # PolicyRuntime or ValueRuntime
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.runtime.model


def latest_version(name: str, *, tracking_uri: str | None = None, alias: str | None = None) -> str | None:
    """The version ``alias`` points at, or the highest version number; None if nothing is registered."""
    client = registry_client(tracking_uri)
    if alias is not None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def load_version(name: str, version: str, *, tracking_uri: str | None = None, dst_path: str | None = None,
                 allow_legacy: bool = False) -> RegisteredVersion:
    """A version, hash-checked and built by this package's code (``infra.model_versions``).

    ``allow_legacy``: a first-format version (pickled pyfunc beside its data files) is read from its data files
    with ``torch.load(weights_only=True)``, never unpickled; for ``sop registry convert`` and resuming."""
    client = registry_client(tracking_uri)
    dst = Path(dst_path or tempfile.mkdtemp(prefix="sop-load-"))
    try:
        runtime = build(fetch_version(client, name, version, dst=dst), BUILDERS)
    except LegacyPickledVersion:
        if not allow_legacy:
            raise
        legacy = dst / "legacy"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version_source(client, name, version),
                                                         dst_path=str(legacy), tracking_uri=tracking_uri))
        runtime = legacy_runtime(local, version=version)
    tags = client.get_model_version(name, version).tags
    lineage = {k.removeprefix("lineage."): _json_or_str(v) for k, v in tags.items() if k.startswith("lineage.")}
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    return RegisteredVersion(name=name, version=version, runtime=runtime, lineage=lineage, metrics=metrics)


def load_latest(name: str = POLICY_NAME, *, tracking_uri: str | None = None,
                alias: str | None = None) -> RegisteredVersion | None:
    """The newest registered version (or the one ``alias`` points at) for resuming; None if there is none.
    A first-format version is read from its data files (the learner resumes from it; it never unpickles)."""
    version = latest_version(name, tracking_uri=tracking_uri, alias=alias)
    return None if version is None else load_version(name, version, tracking_uri=tracking_uri, allow_legacy=True)


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
