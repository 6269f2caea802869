"""The scripted expert packaged as an MLflow pyfunc, so it can stand in as ``sop-policy`` before the
learner registers a learned one::

    version = register_expert_policy(tracking_uri, noise_sigma=0.2, artifact_location=root)  # "1", @champion

The wrapper is pickled by reference: MLflow imports ``sim.expert_pyfunc`` where the version is loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np

from producers.interfaces import Observation
from producers.policies import DEFAULT_ALIAS, DEFAULT_EXPERIMENT, DEFAULT_MODEL_NAME, register_python_model


class ExpertPyfunc(mlflow.pyfunc.PythonModel):
    """The (noisy) scripted expert as an MLflow pyfunc and a :class:`Policy`.

    ``predict`` takes rows with ``task`` and ``proprio`` (the 39-d state) and returns actions
    (n, 4); actors use :meth:`act`.
    """

    def __init__(self, *, noise_sigma: float = 0.0, seed: int | None = None, version: str = "expert") -> None:
        self.noise_sigma = noise_sigma
        self.seed = seed
        self.version = version
        self._policy: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_policy": None}

    def _expert(self) -> Any:
        if self._policy is None:
            from sim.expert import ExpertPolicy  # imports MetaWorld

            self._policy = ExpertPolicy(noise_sigma=self.noise_sigma, seed=self.seed, version=self.version)
        return self._policy

    def act(self, observation: Observation) -> np.ndarray:
        return self._expert().act(observation)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        observations = [
            Observation(
                images={}, proprio=np.asarray(row["proprio"], dtype=np.float32), instruction="", task=row["task"]
            )
            for row in rows
        ]
        return np.stack([self.act(obs) for obs in observations]) if observations else np.zeros((0, 4), np.float32)


def register_expert_policy(
    tracking_uri: str,
    *,
    noise_sigma: float = 0.2,
    seed: int | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    alias: str | None = DEFAULT_ALIAS,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
) -> str:
    """Register the noisy scripted expert as a version of ``model_name`` (a stand-in policy)."""
    return register_python_model(
        lambda version: ExpertPyfunc(noise_sigma=noise_sigma, seed=seed, version=version),
        tracking_uri,
        model_name=model_name,
        alias=alias,
        experiment=experiment,
        artifact_location=artifact_location,
        tags={"sop.policy": "scripted-expert", "sop.noise_sigma": str(noise_sigma)},
    )
