"""Publishing policy and value versions to the MLflow model registry, and loading them back: one import for
callers, split by concern into

- ``learner.artifacts``   a version's files (safetensors weights, config JSON, instruction embeddings), the
                          builders of the ``sop-vla`` / ``sop-value`` architectures, ``check_finite``
- ``learner.publishing``  ``register_policy`` / ``register_value`` / ``move_alias``
- ``learner.loading``     ``load_latest`` / ``load_version`` / ``latest_version`` for resuming and evaluation
- ``learner.convert``     re-registering first-format (pickled pyfunc) versions as data

A version is data, never code (``infra.model_versions``): actors and the processor download it, check the
SHA-256 of every file against the version's tags and build it with their own code for its declared
architecture::

    local = fetch_version(client, "sop-policy", "3", dst=tmp)      # TamperedVersion / LegacyPickledVersion
    policy = policy_from_version(local)                             # PolicyRuntime: .act(obs), .version

One policy query takes ~1 ms on a CPU with one torch thread; actors sharing a machine should call
``torch.set_num_threads(1)``, as more threads on a busy machine made single queries up to 50x slower here.
"""

from __future__ import annotations

from learner.artifacts import (
    ARCHITECTURES,
    POLICY_ARCHITECTURE,
    VALUE_ARCHITECTURE,
    NonFiniteWeights,
    check_finite,
    non_finite_tensors,
    policy_from_version,
    value_from_version,
    write_artifacts,
)
from learner.loading import BUILDERS, RegisteredVersion, latest_version, load_latest, load_version
from learner.publishing import (
    DEFAULT_EXPERIMENT,
    POLICY_NAME,
    VALUE_NAME,
    move_alias,
    register_policy,
    register_value,
)

__all__ = [
    "ARCHITECTURES", "BUILDERS", "DEFAULT_EXPERIMENT", "POLICY_ARCHITECTURE", "POLICY_NAME", "VALUE_ARCHITECTURE",
    "VALUE_NAME", "NonFiniteWeights", "RegisteredVersion", "check_finite", "latest_version", "load_latest",
    "load_version", "move_alias", "non_finite_tensors", "policy_from_version", "register_policy", "register_value",
    "value_from_version", "write_artifacts",
]
