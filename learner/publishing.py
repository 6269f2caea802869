"""Registering policy and value versions in the MLflow model registry, and moving aliases.

    version = register_policy(model, metrics={"loss": 0.1}, lineage={"learner_step": 500},
                              tracking_uri=uri, embeddings=encoder.table(), condition="positive")
    move_alias("3", alias="champion", tracking_uri=uri)            # promote / roll back

A version is data (``infra.model_versions``): ``weights.safetensors``, ``config.json`` declaring the
architecture (``sop-vla`` / ``sop-value``) and ``instructions.npz``, uploaded first; the version is created
afterwards with the SHA-256 of every file in its tags (``sop.sha256.weights.safetensors`` …), and the alias
moves last. Actors and the processor verify those hashes and build the model with their own code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from infra.model_versions import publish_files
from infra.registry import ensure_registered_model, experiment_id, registry_client
from learner.artifacts import check_finite, write_artifacts
from learner.model import Condition, VLAPolicy
from learner.value import ValueModel

POLICY_NAME = "sop-policy"
VALUE_NAME = "sop-value"
DEFAULT_EXPERIMENT = "sop-learner"


def _tags(metrics: Mapping[str, float], lineage: Mapping[str, Any]) -> dict[str, str]:
    tags = {f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()}
    tags.update({f"lineage.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                 for k, v in lineage.items()})
    return tags


def _register(*, write: Callable[[Path], None], name: str, alias: str | None, metrics: Mapping[str, float],
              lineage: Mapping[str, Any], tracking_uri: str | None, experiment: str, run_id: str | None, step: int | None) -> str:
    client = registry_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    ensure_registered_model(client, name)
    version = publish_files(client, name=name, experiment_id=exp_id, write=write, tags=_tags(metrics, lineage),
                            run_id=run_id)
    if run_id is not None and metrics:
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value), step=step or 0)
    if alias is not None:  # after the metrics, so whoever follows the alias finds them logged
        client.set_registered_model_alias(name, alias, version)
    return version


def register_policy(model: VLAPolicy, *, name: str = POLICY_NAME, alias: str | None = "champion",
                    metrics: Mapping[str, float] | None = None, lineage: Mapping[str, Any] | None = None,
                    tracking_uri: str | None = None, embeddings: Mapping[str, np.ndarray] | None = None,
                    condition: Condition = "unconditioned", cfg_beta: float = 1.0,
                    experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                    step: int | None = None) -> str:
    """Register ``model`` as a new version of ``name``, move ``alias`` to it, and return the version.

    A model with a NaN/Inf weight or buffer is refused with ``NonFiniteWeights`` before anything is created.

    ``embeddings`` (instruction -> 384-d vector, e.g. ``SentenceEncoder.table()``) ship with the version so
    actors need no text encoder; ``condition``/``cfg_beta`` say how the version acts (RECAP: "positive").
    ``lineage`` (Delta versions read, algorithm, learner step, parent version ...) and ``metrics`` become tags
    of the version; metrics are also logged to ``run_id`` when given.
    """
    if condition not in ("positive", "unconditioned"):
        raise ValueError(f"condition must be 'positive' or 'unconditioned'; got {condition!r}")
    check_finite(model)  # before anything exists in the registry, so no alias can ever point at it
    return _register(
        write=lambda d: write_artifacts(d, kind="policy", model=model, config=model.config,
                                        embeddings=embeddings or {},
                                        extra={"condition": condition, "cfg_beta": cfg_beta}),
        name=name, alias=alias, metrics=metrics or {}, lineage=lineage or {}, tracking_uri=tracking_uri,
        experiment=experiment, run_id=run_id, step=step)


def register_value(model: ValueModel, *, name: str = VALUE_NAME, alias: str | None = "champion",
                   metrics: Mapping[str, float] | None = None, lineage: Mapping[str, Any] | None = None,
                   tracking_uri: str | None = None, embeddings: Mapping[str, np.ndarray] | None = None,
                   experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                   step: int | None = None) -> str:
    """Register a value model version (what the stream processor loads to compute advantages)."""
    check_finite(model)
    return _register(
        write=lambda d: write_artifacts(d, kind="value", model=model, config=model.config,
                                        embeddings=embeddings or {}),
        name=name, alias=alias, metrics=metrics or {}, lineage=lineage or {}, tracking_uri=tracking_uri,
        experiment=experiment, run_id=run_id, step=step)


def move_alias(version: str, *, name: str = POLICY_NAME, alias: str = "champion",
               tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (promote / roll back)."""
    registry_client(tracking_uri).set_registered_model_alias(name, alias, version)


