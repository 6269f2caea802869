"""Loading registered versions back, for resuming training and for evaluation.

    resumed = load_latest("sop-policy", tracking_uri=uri)     # None on a fresh start
    model = resumed.model if resumed else VLAPolicy(cfg)
    start = resumed.lineage["learner_step"] if resumed else 0
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.registry import registry_client
from learner.artifacts import artifact_kind, artifact_paths, policy_from_artifacts, value_from_artifacts
from learner.publishing import POLICY_NAME


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


def _download(client: MlflowClient, name: str, version: str, *, dst: str | None,
              tracking_uri: str | None) -> Path:
    source = client.get_model_version(name, version).source
    if source.startswith("models:/m-"):
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri))


def load_version(name: str, version: str, *, tracking_uri: str | None = None,
                 dst_path: str | None = None) -> RegisteredVersion:
    client = registry_client(tracking_uri)
    local = _download(client, name, version, dst=dst_path, tracking_uri=tracking_uri)
    artifacts = artifact_paths(local / "artifacts")
    runtime = (policy_from_artifacts(artifacts, version=version) if artifact_kind(artifacts) == "policy"
               else value_from_artifacts(artifacts, version=version))
    tags = client.get_model_version(name, version).tags
    lineage = {k.removeprefix("lineage."): _json_or_str(v) for k, v in tags.items() if k.startswith("lineage.")}
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    return RegisteredVersion(name=name, version=version, runtime=runtime, lineage=lineage, metrics=metrics)


def load_latest(name: str = POLICY_NAME, *, tracking_uri: str | None = None,
                alias: str | None = None) -> RegisteredVersion | None:
    """The newest registered version (or the one ``alias`` points at) for resuming; None if there is none."""
    version = latest_version(name, tracking_uri=tracking_uri, alias=alias)
    return None if version is None else load_version(name, version, tracking_uri=tracking_uri)


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value
