"""The runtime side of a registered policy: loading an MLflow model version into a ready-to-act
:class:`~producers.interfaces.Policy`, and ``register_python_model`` for any ``PythonModel`` that follows the
contract below (the simulated world registers its scripted expert with it: ``sim.expert_pyfunc``).

Contract for every policy registered in MLflow: a ``mlflow.pyfunc.PythonModel`` whose
``unwrap_python_model()`` has ``.act(observation) -> np.ndarray`` and a ``.version`` attribute.
The registry's version number (a string, e.g. "3") is the policy version actors record in
``Step.policy_version``: registering bakes it into the model, and loading by registry URI sets it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlflow

from infra import registry
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
    tracking_uri: str | None = None,
    registry_uri: str | None = None,
    dst_path: str | None = None,
) -> Policy:
    """Download and load a policy. For ``models:/NAME@ALIAS`` the alias is resolved first and that
    exact version is downloaded (so a concurrent alias move cannot mislabel it), and the policy's
    ``.version`` becomes the registry version number. Other URIs (``runs:/``, a local path) keep
    the model's own ``.version``."""
    version: str | None = None
    if model_uri.startswith("models:/"):
        name = parse_model_uri(model_uri)[0]
        version = resolve_model_version(model_uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
        client = registry_client(tracking_uri, registry_uri)
        # The version's storage location is a plain artifact URI (file://, s3://, ...): downloading it
        # needs no registry lookup, which MLflow 3.17 would do against the process-wide registry URI.
        model_uri = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=tracking_uri, dst_path=dst_path)
    policy = mlflow.pyfunc.load_model(local).unwrap_python_model()
    if not callable(getattr(policy, "act", None)) or not hasattr(policy, "version"):
        raise TypeError(
            f"model {model_uri!r} is not a SOP policy: its python model {type(policy).__name__} "
            "needs an act(observation) method and a version attribute"
        )
    if version is not None:
        policy.version = version
    return policy


def register_python_model(
    make_model: Callable[[str], mlflow.pyfunc.PythonModel],
    tracking_uri: str,
    *,
    model_name: str = DEFAULT_MODEL_NAME,
    alias: str | None = DEFAULT_ALIAS,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Register any ``PythonModel`` that follows the policy contract (no artifacts of its own) as a new
    version of ``model_name`` holding ``make_model(version)``, point ``alias`` at it (None: leave the alias
    alone) and return the version number.

    The version number is baked into the model as the learner's ``register_policy`` does (both go through
    ``infra.registry.register_pyfunc_version``). The experiment is created with ``artifact_location`` if it
    does not exist yet.
    """
    client = registry_client(tracking_uri)
    experiment_id = registry.experiment_id(client, experiment, artifact_location=artifact_location,
                                          require_location=True)
    registry.ensure_registered_model(client, model_name)
    return registry.register_pyfunc_version(client, name=model_name, experiment_id=experiment_id,
                                            make_model=make_model, pip_requirements=[], tags=tags, alias=alias)
