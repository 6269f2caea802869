"""The pyfunc wrappers: what ``mlflow.pyfunc.load_model(...).unwrap_python_model()`` returns for a version.

    policy = mlflow.pyfunc.load_model("models:/sop-policy@champion").unwrap_python_model()
    action = policy.act(observation)        # np.ndarray [action_dim]
    policy.version                          # "3", recorded with every step

A wrapper is pickled by reference (it holds only a name and a version), so MLflow imports this module on
load: the ``sop`` package must be installed where actors run. Versions registered before this module
existed name ``learner.registry.SOPPolicy``; ``learner.registry`` re-exports both classes for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from learner.artifacts import policy_from_artifacts, value_from_artifacts
from learner.model import PolicyRuntime
from learner.value import ValueRuntime


class SOPPolicy(mlflow.pyfunc.PythonModel):
    """A registered policy version: ``act(observation) -> np.ndarray`` and ``version``."""

    # Images as arrays in a DataFrame are no schema MLflow can validate; skip its type-hint input checks.
    _skip_type_hint_validation = True

    def __init__(self, *, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.runtime: PolicyRuntime | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.runtime = policy_from_artifacts(context.artifacts, version=self.version)

    def act(self, observation: Any) -> np.ndarray:
        return self._runtime().act(observation)

    def act_chunk(self, observation: Any) -> np.ndarray:
        return self._runtime().act_chunk(observation)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Actions ``[B, action_dim]`` for a DataFrame with columns images (camera -> HxWx3 uint8), proprio,
        instruction; a list of observations works too."""
        return self._runtime().act_batch(_observations(model_input))[:, 0]

    def _runtime(self) -> PolicyRuntime:
        if self.runtime is None:
            raise RuntimeError("load this model with mlflow.pyfunc.load_model(...) before acting")
        return self.runtime


class SOPValue(mlflow.pyfunc.PythonModel):
    """A registered value version: ``values(observations)``, ``values_for_rows(step_rows)`` and ``version``."""

    _skip_type_hint_validation = True  # as in SOPPolicy

    def __init__(self, *, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.runtime: ValueRuntime | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.runtime = value_from_artifacts(context.artifacts, version=self.version)

    def values(self, observations: Sequence[Any]) -> np.ndarray:
        return self._runtime().values(observations)

    def values_for_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self._runtime().values_for_rows(rows)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Values ``[B]`` for observations given as in ``SOPPolicy.predict``."""
        return self._runtime().values(_observations(model_input))

    def _runtime(self) -> ValueRuntime:
        if self.runtime is None:
            raise RuntimeError("load this model with mlflow.pyfunc.load_model(...) before using it")
        return self.runtime


@dataclass(frozen=True)
class _ObservationRecord:
    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    task: str = ""


def _observations(model_input: pd.DataFrame | Sequence[Any]) -> list[Any]:
    items = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else model_input
    return [_as_observation(o) for o in items]


def _as_observation(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return _ObservationRecord(images=obj["images"], proprio=np.asarray(obj["proprio"], dtype=np.float32),
                                  instruction=obj["instruction"], task=obj.get("task", ""))
    return obj
