"""The one way SOP talks to the MLflow model registry: the client, the experiment, the registered model.

    client = registry_client(tracking_uri)                   # registry on the same server as tracking
    exp = experiment_id(client, "sop", artifact_location=root)
    ensure_registered_model(client, "sop-policy")

Only ``MlflowClient`` calls: the process-wide tracking URI is neither read nor changed (MLflow 3.17 resolves
some registry calls through it otherwise). Robots, the processor and the learner all build clients here; a
version's files and their hashes are ``infra.model_versions`` (the simulated expert as much as the learner's
VLA). Credentials of an authenticated registry (``mlflow server --app-name basic-auth``) reach MLflow's client
through ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` in each process's environment.
"""

from __future__ import annotations

from collections.abc import Mapping

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


def versions_tagged(client: MlflowClient, name: str, tags: Mapping[str, str]) -> list:
    """The versions of ``name`` carrying every tag in ``tags`` (key -> exact value), oldest first: what an
    idempotent registration looks for before registering again (e.g. a learner's run id and step)."""
    clauses = [f"name = '{name}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    found = client.search_model_versions(" AND ".join(clauses))
    # filter again: a registry that ignores a tag clause must not make an unrelated version look like ours
    return sorted((v for v in found if all(v.tags.get(k) == val for k, val in tags.items())),
                  key=lambda v: int(v.version))


def version_complete(client: MlflowClient, version: object) -> bool:
    """Whether a registered version's model files were all uploaded: a version of the data format
    (``infra.model_versions``, tag ``sop.format``) is created only after its files are, an older one was tagged
    ``sop.complete`` last, or its logged model is READY. A SQLite registry used without a process-wide tracking
    URI does not report a version's model id, hence the tags."""
    tags = getattr(version, "tags", None) or {}
    if tags.get(COMPLETE_TAG) == "true" or "sop.format" in tags:
        return True
    model_id = getattr(version, "model_id", None)
    return bool(model_id) and client.get_logged_model(model_id).status == LoggedModelStatus.READY
