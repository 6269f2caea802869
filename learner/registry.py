"""Publishing policy and value versions to the MLflow model registry, and loading them back: one import for
callers, split by concern into

- ``learner.artifacts``   a version's files (weights, config JSON, instruction embeddings), ``check_finite``
- ``learner.pyfunc``      ``SOPPolicy`` / ``SOPValue``, what actors and the processor get from MLflow
- ``learner.publishing``  ``register_policy`` / ``register_value`` / ``move_alias``
- ``learner.loading``     ``load_latest`` / ``load_version`` / ``latest_version`` for resuming and evaluation

Actors load a version without touching this package's API::

    policy = mlflow.pyfunc.load_model("models:/sop-policy@champion").unwrap_python_model()
    action = policy.act(observation)        # np.ndarray [action_dim]

Versions registered before the split pickled their wrapper as ``learner.registry.SOPPolicy`` (or
``SOPValue``), so both names must stay importable from here. One policy query takes ~1 ms on a CPU with
one torch thread; actors sharing a machine should call ``torch.set_num_threads(1)``, as more threads on a
busy machine made single queries up to 50x slower here.
"""

from __future__ import annotations

from learner.artifacts import (
    CONFIG,
    FORMAT_VERSION,
    INSTRUCTIONS,
    WEIGHTS,
    NonFiniteWeights,
    check_finite,
    non_finite_tensors,
    policy_from_artifacts,
    value_from_artifacts,
    write_artifacts,
)
from learner.loading import RegisteredVersion, latest_version, load_latest, load_version
from learner.publishing import (
    DEFAULT_EXPERIMENT,
    POLICY_NAME,
    VALUE_NAME,
    move_alias,
    register_policy,
    register_value,
)
from learner.pyfunc import SOPPolicy, SOPValue

__all__ = [
    "CONFIG", "DEFAULT_EXPERIMENT", "FORMAT_VERSION", "INSTRUCTIONS", "POLICY_NAME", "VALUE_NAME", "WEIGHTS",
    "NonFiniteWeights", "RegisteredVersion", "SOPPolicy", "SOPValue", "check_finite", "latest_version",
    "load_latest", "load_version", "move_alias", "non_finite_tensors", "policy_from_artifacts", "register_policy",
    "register_value", "value_from_artifacts", "write_artifacts",
]
