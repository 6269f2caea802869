"""Registry roles: ``mlflow server --app-name basic-auth`` with every permission granted explicitly.

The server's auth database starts with one admin (password from ``MLFLOW_AUTH_ADMIN_PASSWORD``) and
``default_permission = NO_PERMISSIONS``: a user may touch only what a role grants it.

| role | experiments ``sop``, ``sop-learner`` (runs, logged models' files) | ``sop-policy`` | ``sop-value`` |
|---|---|---|---|
| ``learner`` (train, pretrain, promote) | EDIT | EDIT (register versions, tags, move aliases) | EDIT |
| ``processor`` | READ | — | READ |
| ``actor`` (a robot, or a group of them) | READ | READ | — |
| admin (``sop-admin``, people) | everything | everything | everything |

    auth = RegistryAuth.create(state_dir)                 # passwords generated once, kept 0600 in state_dir
    env = auth.server_env()                               # for the `mlflow server` process
    provision(url, auth, policy_model="sop-policy", value_model="sop-value")   # models, experiments, users, grants
    add_user(url, auth.admin, "robot-17", role="actor")   # one more robot; remove_user(...) revokes it
    os.environ.update(auth.credentials("actor").env())    # MLFLOW_TRACKING_USERNAME / _PASSWORD for a process

Every MLflow client of a process reads ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from its
environment, so a process's role is whatever credentials it was started with.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("learner", "processor", "actor")
ADMIN = "sop-admin"
EXPERIMENTS = ("sop", "sop-learner")
# role -> (permission on the experiments, {which model: permission})
GRANTS: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "learner": ("EDIT", {"policy": "EDIT", "value": "EDIT"}),
    "processor": ("READ", {"value": "READ"}),
    "actor": ("READ", {"policy": "READ"}),
}
USERNAME_ENV, PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """The environment that makes every MLflow client of a process this user."""
        return {USERNAME_ENV: self.username, PASSWORD_ENV: self.password}


@dataclass(frozen=True)
class RegistryAuth:
    """The admin and one user per role of one registry, and where the server keeps its auth state."""

    state_dir: Path
    admin: Credentials
    users: dict[str, tuple[str, Credentials]]  # username -> (role, credentials)
    secret_key: str = field(repr=False)

    @property
    def config_file(self) -> Path:
        return self.state_dir / "basic_auth.ini"

    @property
    def database_uri(self) -> str:
        return f"sqlite:///{self.state_dir / 'basic_auth.db'}"

    @classmethod
    def create(cls, state_dir: Path) -> RegistryAuth:
        """Load ``state_dir/registry-users.json``, or generate passwords (one user per role) and write it 0600."""
        path = state_dir / "registry-users.json"
        if path.exists():
            raw = json.loads(path.read_text())
        else:
            state_dir.mkdir(parents=True, exist_ok=True)
            state_dir.chmod(0o700)
            raw = {"admin": {"username": ADMIN, "password": secrets.token_urlsafe(24)},
                   "secret_key": secrets.token_urlsafe(32),
                   "users": {f"sop-{role}": {"role": role, "password": secrets.token_urlsafe(24)} for role in ROLES}}
            path.write_text(json.dumps(raw, indent=2))
            path.chmod(0o600)
        auth = cls(state_dir=state_dir, admin=Credentials(raw["admin"]["username"], raw["admin"]["password"]),
                   users={name: (u["role"], Credentials(name, u["password"])) for name, u in raw["users"].items()},
                   secret_key=raw["secret_key"])
        auth.write_config()
        return auth

    def credentials(self, role: str) -> Credentials:
        """The credentials of the stack's user with ``role`` (``admin`` for the admin)."""
        if role == "admin":
            return self.admin
        for r, creds in self.users.values():
            if r == role:
                return creds
        raise KeyError(f"no registry user with role {role!r} (roles: {', '.join(ROLES)}, admin)")

    def write_config(self) -> Path:
        self.config_file.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = {self.database_uri}\n"
            f"admin_username = {self.admin.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "grant_default_workspace_access = false\n"
            # a password check (PBKDF2) costs ~0.1 s of CPU per request; cache a verified one for a minute. With
            # one server worker (MlflowServerConfig.workers) a removed user or a new password takes effect at once
            "auth_cache_ttl_seconds = 60\n")
        return self.config_file

    def server_env(self) -> dict[str, str]:
        """What ``mlflow server --app-name basic-auth`` needs in its environment."""
        return {"MLFLOW_AUTH_CONFIG_PATH": str(self.config_file), "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin.password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}


@contextlib.contextmanager
def as_user(credentials: Credentials) -> Iterator[None]:
    """MLflow clients of this process act as ``credentials`` inside the block (single-threaded set-up and tests)."""
    old = {k: os.environ.get(k) for k in (USERNAME_ENV, PASSWORD_ENV)}
    os.environ.update(credentials.env())
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _models(policy_model: str, value_model: str) -> dict[str, str]:
    return {"policy": policy_model, "value": value_model}


def _grant(auth: object, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant, replacing an earlier grant of the same resource (a second provisioning, a changed role)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)  # type: ignore[attr-defined]
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(username, resource_type, resource_id)  # type: ignore[attr-defined]
        auth.grant_user_permission(username, resource_type, resource_id, permission)  # type: ignore[attr-defined]


def grant_role(tracking_uri: str, admin: Credentials, username: str, role: str, *, policy_model: str = "sop-policy",
               value_model: str = "sop-value", experiments: Sequence[str] = EXPERIMENTS) -> None:
    """Grant ``username`` the permissions of ``role`` (``GRANTS``) on the models and experiments, which must exist."""
    from mlflow.server.auth.client import AuthServiceClient

    from infra.registry import registry_client

    if role not in GRANTS:
        raise ValueError(f"unknown registry role {role!r}; one of {', '.join(ROLES)}")
    on_experiments, on_models = GRANTS[role]
    models = _models(policy_model, value_model)
    with as_user(admin):
        client, auth = registry_client(tracking_uri), AuthServiceClient(tracking_uri)
        for name in experiments:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise ValueError(f"experiment {name!r} does not exist on {tracking_uri}: run provision() first")
            _grant(auth, username, "experiment", exp.experiment_id, on_experiments)
        for which, permission in on_models.items():
            _grant(auth, username, "registered_model", models[which], permission)


def add_user(tracking_uri: str, admin: Credentials, username: str, *, role: str, password: str | None = None,
             **names: object) -> Credentials:
    """Create ``username`` (or reset its password) with the permissions of ``role``; returns its credentials."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    creds = Credentials(username, password or secrets.token_urlsafe(24))
    with as_user(admin):
        auth = AuthServiceClient(tracking_uri)
        try:
            auth.create_user(username, creds.password)
        except MlflowException as exc:
            if "already exists" not in str(exc) and exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            auth.update_user_password(username, creds.password)
    grant_role(tracking_uri, admin, username, role, **names)  # type: ignore[arg-type]
    return creds


def remove_user(tracking_uri: str, admin: Credentials, username: str) -> bool:
    """Delete ``username`` and with it every permission it had (a lost robot); False if it did not exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    with as_user(admin):
        try:
            AuthServiceClient(tracking_uri).delete_user(username)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
    return True


def provision(tracking_uri: str, auth: RegistryAuth, *, policy_model: str = "sop-policy",
              value_model: str = "sop-value", experiments: Sequence[str] = EXPERIMENTS) -> None:
    """As the admin: the experiments and registered models (so no other user creates, and owns, them first), then
    every user of ``auth`` with its role's grants. Idempotent."""
    from infra.registry import ensure_registered_model, experiment_id, registry_client

    with as_user(auth.admin):
        client = registry_client(tracking_uri)
        for name in experiments:
            experiment_id(client, name)  # artifacts: the server's proxied store (mlflow-artifacts:/)
        for name in (policy_model, value_model):
            ensure_registered_model(client, name)
    for username, (role, creds) in auth.users.items():
        add_user(tracking_uri, auth.admin, username, role=role, password=creds.password, policy_model=policy_model,
                 value_model=value_model, experiments=experiments)
