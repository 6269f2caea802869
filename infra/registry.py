"""The one way SOP talks to the MLflow model registry: the client, the experiment, the registered model.

    client = registry_client(tracking_uri)                   # registry on the same server as tracking
    exp = experiment_id(client, "sop", artifact_location=root)
    ensure_registered_model(client, "sop-policy")
    version = register_pyfunc_version(client, name="sop-policy", experiment_id=exp,
                                      make_model=lambda v: MyPolicy(version=v), pip_requirements=[])

Only ``MlflowClient`` calls: the process-wide tracking URI is neither read nor changed (MLflow 3.17 resolves
some registry calls through it otherwise). Robots, the processor and the learner all build clients here, and register versions with
``register_pyfunc_version`` (the simulated expert as much as the learner's VLA).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

COMPLETE_TAG = "sop.complete"  # set on a version once its files are all uploaded


def registry_client(tracking_uri: str | None, registry_uri: str | None = None) -> MlflowClient:
    """A client for ``tracking_uri`` whose registry is ``registry_uri`` (default: the same server)."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


def experiment_id(client: MlflowClient, experiment: str, *, artifact_location: str | None = None,
                  require_location: bool = False) -> str:
    """The id of ``experiment`` (a name or an id), created with ``artifact_location`` if missing.

    ``require_location``: refuse to create it without an artifact root (MLflow would otherwise put artifacts
    under ./mlruns of whatever directory the process runs in)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    if experiment.isdigit():
        try:
            return client.get_experiment(experiment).experiment_id
        except MlflowException:
            pass
    if artifact_location is None and require_location:
        raise ValueError(f"MLflow experiment {experiment!r} does not exist; "
                         "pass artifact_location=... to create it with a fixed artifact root")
    return client.create_experiment(experiment, artifact_location=artifact_location)


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model ``name`` unless it exists (another process may create it at the same moment)."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # created concurrently by another process
            client.get_registered_model(name)


def register_pyfunc_version(client: MlflowClient, *, name: str, experiment_id: str,
                            make_model: Callable[[str], mlflow.pyfunc.PythonModel], pip_requirements: list[str],
                            artifacts: Callable[[Path], dict[str, str]] | None = None,
                            tags: Mapping[str, str] | None = None, run_id: str | None = None,
                            alias: str | None = None) -> str:
    """Register ``make_model(version)`` as a new version of ``name`` (which must exist), point ``alias`` at
    it (None: leave aliases alone) and return the version number.

    The version is created first so that its number is baked into the model (``.version``); nobody loads it
    before an alias moves, and a failed upload deletes it again. ``artifacts(directory)`` writes the files
    the model loads in ``load_context`` and returns MLflow's artifact map.
    """
    tag_map = dict(tags or {})
    logged = client.create_logged_model(experiment_id=experiment_id, name=name, source_run_id=run_id, tags=tag_map)
    # The artifact location rather than "models:/<model_id>", and the model id only along with a run id:
    # MLflow 3.17's SQL registry resolves either through the process-wide tracking URI, not this client's.
    # A tracking server resolves them itself, and refuses an mlflow-artifacts:/ source that neither a run id nor
    # a model id vouches for.
    server = (client.tracking_uri or "").startswith(("http://", "https://"))
    created = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tag_map,
                                          model_id=logged.model_id if run_id is not None or server else None)
    version = str(created.version)
    try:
        with tempfile.TemporaryDirectory(prefix="sop-register-") as tmp:
            files = artifacts(Path(tmp) / "files") if artifacts is not None else None
            model_dir = Path(tmp) / "model"
            mlflow.pyfunc.save_model(str(model_dir), python_model=make_model(version), artifacts=files,
                                     pip_requirements=pip_requirements)
            client.log_model_artifacts(logged.model_id, str(model_dir))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        client.set_model_version_tag(name, version, COMPLETE_TAG, "true")  # see version_complete
    except BaseException:
        client.delete_model_version(name, version)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    if alias is not None:
        client.set_registered_model_alias(name, alias, version)
    return version


def versions_tagged(client: MlflowClient, name: str, tags: Mapping[str, str]) -> list:
    """The versions of ``name`` carrying every tag in ``tags`` (key -> exact value), oldest first: what an
    idempotent registration looks for before registering again (e.g. a learner's run id and step)."""
    clauses = [f"name = '{name}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    found = client.search_model_versions(" AND ".join(clauses))
    # filter again: a registry that ignores a tag clause must not make an unrelated version look like ours
    return sorted((v for v in found if all(v.tags.get(k) == val for k, val in tags.items())),
                  key=lambda v: int(v.version))


def version_complete(client: MlflowClient, version: object) -> bool:
    """Whether a registered version's model files were all uploaded: :func:`register_pyfunc_version` tags it
    ``sop.complete`` last, or (a version registered before that tag) its logged model is READY. A SQLite registry
    used without a process-wide tracking URI does not report a version's model id, hence the tag."""
    if (getattr(version, "tags", None) or {}).get(COMPLETE_TAG) == "true":
        return True
    model_id = getattr(version, "model_id", None)
    return bool(model_id) and client.get_logged_model(model_id).status == LoggedModelStatus.READY
