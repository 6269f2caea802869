"""Shared settings of every `sop` command: typed, validated at start, overridable by ``SOP_…`` variables.

Every field maps to an environment variable: ``run_dir`` ← ``SOP_RUN_DIR``, ``kafka_bootstrap`` ←
``SOP_KAFKA_BOOTSTRAP``, and so on. Dict fields take JSON (``SOP_KAFKA_CLIENT_CONFIG='{"security.protocol":
"SASL_SSL"}'``). A bad value stops the command at start with a message naming the variable to fix.

Kafka security (``SOP_KAFKA_SECURITY=scram-tls`` or `sop up --secure`): the local stack's brokers take only
SASL/SCRAM-SHA-512 over TLS, with ACLs; each process authenticates as one principal (``SOP_KAFKA_PRINCIPAL``:
``sop-admin``, ``sop-processor``, ``sop-tools`` or a robot of `sop robot add`), whose client settings file under
``<run_dir>/security/clients`` fills in ``kafka_client_config`` unless that is set explicitly (JSON text or the
path of a JSON file); a robot's signing identity fills in ``publish_identity_file`` (docs/security.md). The
registry's roles are the other switch, ``SOP_SECURITY`` (``security``); `sop up --secure` turns on both.

Profiles (``SOP_PROFILE`` or ``--profile`` of `sop up/run/down/status`): ``embedded`` (one broker, SQLite MLflow,
the lake on local disk) or ``cluster`` (three brokers, an S3 server, MLflow on PostgreSQL; see docs/deploy.md).
Under ``cluster`` the endpoints `sop up --profile cluster` started fill in ``kafka_bootstrap``,
``mlflow_tracking_uri``, ``lake_uri`` and ``lake_storage_options`` unless those are set explicitly — the same
settings a real site sets by hand (:func:`site_environment` prints them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from infra.kafka import DEFAULT_KAFKA_VERSION, TopicSpec, topic_names
from infra.kafka_client import check_client_config
from infra.kafka_security import ADMIN, LocalSecurity

PROFILES = ("embedded", "cluster")


class SettingsError(ValueError):
    """A setting is invalid; the message names the ``SOP_…`` variable to fix."""


def settings_error(exc: ValidationError, heading: str = "invalid settings") -> SettingsError:
    """One :class:`SettingsError` for a settings class's ``ValidationError``: a line per problem naming its
    ``SOP_…`` variable (a rule across fields names its variables in its own message)."""
    problems = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        if not name:
            problems.append(err["msg"].removeprefix("Value error, "))
            continue
        problems.append(f"SOP_{name.upper()}: {err['msg']} (got {err.get('input')!r})")
    return SettingsError(f"{heading}:\n  " + "\n  ".join(problems))


def _metrics_port(value: object) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "off":
        return "off"
    try:
        port = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError("must be a port number (0 = any free port) or 'off'") from None
    if not 0 <= port < 65536:
        raise ValueError("must be in 0..65535 (0 = any free port) or 'off'")
    return port


# The port of a process's Prometheus endpoint: N, 0 = any free port (announced under <run dir>/metrics for
# `sop status`), or "off". Used by SOP_PROCESSOR_METRICS_PORT, SOP_LEARN_METRICS_PORT and SOP_ACTOR_METRICS_PORT.
MetricsPort = Annotated[int | Literal["off"], BeforeValidator(_metrics_port)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOP_", extra="ignore", frozen=True)

    run_dir: Path = Field(Path(".sop"), description="Where the local stack keeps its data (Kafka logs, Delta tables, MLflow).")
    profile: Literal["embedded", "cluster"] = Field("embedded", description=(
        "The local stack: embedded (one broker, SQLite MLflow, local lake) or cluster (3 brokers, S3 server, "
        "MLflow server on PostgreSQL)."))

    # Kafka
    kafka_bootstrap: str | None = Field(None, description="External Kafka bootstrap servers; unset = the local broker of `sop up`.")
    kafka_client_config: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict, description=(
        "Extra librdkafka settings (SASL/TLS …): JSON text, or the path of a JSON file (what `sop robot add` writes)."))
    kafka_security: Literal["off", "scram-tls"] = Field("off", description=(
        "off, or scram-tls: the local stack's brokers take only SASL/SCRAM-SHA-512 over TLS, with ACLs, and the "
        "processor dead-letters events whose signature does not prove their actor (docs/security.md)."))
    kafka_principal: str | None = Field(None, description=(
        "With security on: the principal whose client settings file (<run_dir>/security/clients/) this process uses; "
        "unset = sop-processor for `sop process`, sop-admin otherwise."))
    kafka_version: str = DEFAULT_KAFKA_VERSION
    kafka_port: int = Field(9092, ge=0, lt=65536, description="Port of the local broker (0 = any free port).")
    kafka_heap_mb: int = Field(768, ge=128)
    topic_prefix: str = "sop."
    topic_partitions: int = Field(4, ge=1, le=1024)
    topic_replication_factor: int | None = Field(None, ge=1, le=32, description=(
        "Replicas of every topic SOP creates (data topics, the processor's changelogs and control topic); "
        "unset = 1, or the brokers of the cluster profile."))
    topic_min_insync_replicas: int | None = Field(None, ge=1, le=32, description=(
        "min.insync.replicas of those topics; unset = the broker's default (the cluster profile: 2)."))
    topic_retention_hours: float = Field(24 * 7, gt=0)
    cluster_kafka_nodes: int = Field(3, ge=1, le=9, description="Brokers (each also a controller) of the cluster profile.")
    cluster_kafka_heap_mb: int = Field(384, ge=128, description="Java heap of each broker of the cluster profile.")
    cluster_bucket: str = Field("sop", description="The cluster profile's bucket: the lake and MLflow's artifacts.")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=64 * 1024)

    # Publisher
    publish_linger_ms: int = Field(5, ge=0)
    publish_compression: str = "lz4"
    publish_queue_max_messages: int = Field(100_000, ge=100)
    publish_queue_max_kbytes: int = Field(256 * 1024, ge=1024)
    publish_delivery_timeout_ms: int = Field(120_000, ge=1000)
    publish_identity_file: Path | None = Field(None, description=(
        "A robot's signing identity (`sop robot add` writes it): every event it publishes carries its signature; "
        "unset = the identity of SOP_KAFKA_PRINCIPAL when security is on and it has one."))

    # Security
    security: bool = Field(False, description=(
        "Authenticated registry with roles (MLflow basic-auth: the learner registers and moves aliases, actors and "
        "the processor only read) on both profiles; credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD. Kafka's "
        "own switch is kafka_security; `sop up --secure` turns on both (docs/security.md)."))

    # Registry
    mlflow_tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI; unset = SQLite under run_dir (with SOP_SECURITY: the local registry server)."))
    mlflow_ui_port: int = Field(5000, ge=1, lt=65536)
    policy_model_name: str = "sop-policy"
    value_model_name: str = "sop-value"
    value_model_version: int | None = Field(None, ge=1, description=(
        "The sop-value version the processor (and RECAP's pretraining) computes values with, pinned: a replay with "
        "a new value model, or a run whose value model must stay frozen; unset = the champion alias, else the "
        "newest version."))
    policy_alias: str = "champion"

    # Prometheus endpoints (infra.metrics): every long-running process serves one
    metrics_host: str = Field("127.0.0.1", min_length=1, description=(
        "Address the processes' Prometheus endpoints listen on (0.0.0.0 for a site's Prometheus on another host)."))

    # Stream processor
    processor_group: str = "sop-processor"
    processor_metrics_port: MetricsPort = Field(0, description=(
        "Port of the processor's Prometheus endpoint: N, 0 = any free port (announced for `sop status`), or off."))
    processor_flush_interval_s: float = Field(0.5, gt=0)
    processor_end_grace_s: float = Field(15.0, gt=0)
    processor_abort_timeout_s: float = Field(120.0, gt=0)
    processor_chunk_steps: int = Field(256, ge=1)  # steps of one episode per changelog entry of the step store
    processor_chunk_age_s: float = Field(5.0, gt=0)  # steps held in memory only for at most about this long
    processor_vacuum_interval_s: float = Field(6 * 3600.0, gt=0, description="How often the processor vacuums the tables.")
    processor_vacuum_retention_hours: float | None = Field(
        None, ge=0, description="Files older than this no version references are deleted; unset = the tables' (7 days).")
    # Validation at the edge (consumers/validation.py): what a step of each task must look like, and the limits
    processor_task_contracts: str | None = Field(None, description=(
        "Task contracts: JSON text or the path of a JSON file, {task: {action_dim, proprio_dim, cameras: {name: "
        "[width, height]}, encodings: [jpeg, png]}}; unset = the simulated suite's (sop.contracts.sim_contracts)."))
    processor_unknown_tasks: Literal["accept", "reject"] = Field(
        "accept", description="Events of a task without a contract: accept with the generic checks, or reject.")
    processor_full_image_decode: bool = Field(False, description="Also fully decode every image (slow; off = structure only).")
    processor_robot_keyring: Path | None = Field(None, description=(
        "With security on: the robots' signing keys and actor ids (robots.json of `sop robot add`); "
        "unset = <run_dir>/security/robots.json."))
    processor_max_steps: int = Field(10_000, ge=1, description="Largest episode length / step index an event may carry.")
    processor_clock_skew_future_s: float = Field(60.0, ge=0, description="How far ahead of the processor's clock an event may be.")
    processor_clock_skew_past_s: float = Field(
        7 * 86400.0, ge=0, description="How far behind the processor's clock an event may be; 0 = no bound (replays).")

    # RECAP rewards (computed by the processor at episode close)
    max_episode_steps: int = Field(150, ge=1, le=500, description="Episode cap; also the per-task return normaliser.")
    recap_c_fail: float | None = Field(None, ge=0, description="Failure penalty; unset = max_episode_steps.")
    recap_advantage_horizon: int = Field(50, ge=1)

    # Lakehouse
    lake_uri: str | None = Field(None, description="Root of the Delta tables (path or s3://…); unset = run_dir/lake.")
    lake_storage_options: dict[str, str] = Field(default_factory=dict)

    @field_validator("kafka_client_config", mode="before")
    @classmethod
    def _client_config_text(cls, v: object) -> object:
        """JSON text, or the path of a JSON file holding it (a file keeps the password out of the environment)."""
        if not isinstance(v, str):
            return v
        text = v.strip()
        if not text:
            return {}
        if not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as exc:
                raise ValueError(f"neither JSON text (starting with {{) nor a readable file: {exc}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None

    @field_validator("kafka_client_config")
    @classmethod
    def _client_config(cls, v: dict[str, str]) -> dict[str, str]:
        check_client_config(v)  # every client (confluent-kafka and faust's aiokafka) must honour every key
        return v

    @field_validator("publish_identity_file")
    @classmethod
    def _identity_file(cls, v: Path | None) -> Path | None:
        if v is not None:
            from schemas.identity import load_signer

            load_signer(v)  # unreadable or malformed: stop at start, naming the file
        return v

    @model_validator(mode="after")
    def _replication(self) -> Settings:
        rf, isr = self.replication_factor, self.topic_min_insync_replicas
        if isr is not None and isr > rf:
            raise ValueError(f"SOP_TOPIC_MIN_INSYNC_REPLICAS ({isr}) exceeds the replication factor ({rf}); "
                             "set SOP_TOPIC_REPLICATION_FACTOR or lower it")
        return self

    @field_validator("publish_compression")
    @classmethod
    def _known_compression(cls, v: str) -> str:
        allowed = {"none", "gzip", "snappy", "lz4", "zstd"}
        if v not in allowed:
            raise ValueError(f"must be one of {sorted(allowed)}")
        return v

    @field_validator("processor_task_contracts")
    @classmethod
    def _task_contracts(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from consumers.validation import parse_task_contracts

        parse_task_contracts(v)  # fails at start, naming the problem; sop.contracts parses it again for use
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, v: str) -> str:
        if not v or any(c not in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-" for c in v):
            raise ValueError("may hold only letters, digits, '.', '_' and '-'")
        return v

    # -- derived -------------------------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        return self.run_dir.resolve()

    def topic(self, base: str) -> str:
        return f"{self.topic_prefix}{base}"

    @property
    def topics(self) -> dict[str, str]:
        """Record name → topic, plus the dead-letter topic under ``"deadletter"``."""
        return topic_names(self.topic_prefix)

    @property
    def replication_factor(self) -> int:
        """Replicas of the topics SOP creates."""
        if self.topic_replication_factor is not None:
            return self.topic_replication_factor
        return self.cluster_kafka_nodes if self.profile == "cluster" else 1

    @property
    def min_insync_replicas(self) -> int | None:
        """min.insync.replicas of the topics SOP creates (None: the broker's default)."""
        if self.topic_min_insync_replicas is not None:
            return self.topic_min_insync_replicas
        return min(2, self.replication_factor) if self.profile == "cluster" else None

    @property
    def retention_ms(self) -> int:
        return int(self.topic_retention_hours * 3600 * 1000)

    def topic_specs(self) -> list[TopicSpec]:
        return [TopicSpec(name=name, partitions=self.topic_partitions, replication_factor=self.replication_factor,
                          min_insync_replicas=self.min_insync_replicas, retention_ms=self.retention_ms,
                          max_message_bytes=self.max_message_bytes) for name in self.topics.values()]

    @property
    def kafka_auth(self) -> LocalSecurity:
        """The local stack's Kafka security material (CA, certificates, principals' client files, keyring); apart
        from ``security`` (SOP_SECURITY: the registry's and object store's roles), whose files are under
        ``security/registry``."""
        return LocalSecurity(self.run_path / "security")

    @property
    def kafka_secure(self) -> bool:
        """Kafka security on (SOP_KAFKA_SECURITY other than off)."""
        return self.kafka_security != "off"

    @property
    def robot_keyring(self) -> Path:
        return self.processor_robot_keyring or self.kafka_auth.keyring_file

    @property
    def cluster_dir(self) -> Path:
        """Where the cluster profile keeps its services' data and ``endpoints.json``."""
        return self.run_path / "cluster"

    def _need_cluster(self, what: str) -> None:
        if self.profile == "cluster":
            raise SettingsError(f"no {what} to talk to: the cluster profile is not up (run `sop up --profile cluster`)"
                                f" or set it explicitly")

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        self._need_cluster("MLflow server (SOP_MLFLOW_TRACKING_URI)")
        if self.security:
            raise SettingsError("no MLflow server to talk to: with SOP_SECURITY the registry is a server "
                                "(run `sop up`) or set SOP_MLFLOW_TRACKING_URI")
        return f"sqlite:///{self.run_path / 'mlflow.db'}"

    @property
    def artifact_root(self) -> Path:
        return self.run_path / "mlartifacts"

    @property
    def lake_root(self) -> str:
        if self.lake_uri:
            return self.lake_uri
        self._need_cluster("lake (SOP_LAKE_URI)")
        return str(self.run_path / "lake")

    def bootstrap(self) -> str:
        """The Kafka to talk to: SOP_KAFKA_BOOTSTRAP, else the local broker that `sop up` started."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        self._need_cluster("Kafka (SOP_KAFKA_BOOTSTRAP)")
        state = self.run_path / "kafka" / "broker.json"
        try:
            return json.loads(state.read_text())["bootstrap"]
        except (FileNotFoundError, KeyError, json.JSONDecodeError):
            raise SettingsError(
                f"no Kafka to talk to: run `sop up` (local broker under {self.run_path}) or set SOP_KAFKA_BOOTSTRAP"
            ) from None


# What a cluster's endpoints fill in (endpoints.json of `sop up --profile cluster`), unless set explicitly.
ENDPOINT_FIELDS = ("kafka_bootstrap", "mlflow_tracking_uri", "lake_uri", "lake_storage_options")


def endpoints_file(settings: Settings) -> Path:
    return settings.cluster_dir / "endpoints.json"


def registry_server_dir(settings: Settings) -> Path:
    """Where the embedded profile's registry server keeps its state (only with ``security``)."""
    return settings.run_path / "mlflow-server"


def resolve_profile(settings: Settings) -> Settings:
    """Under the cluster profile: the endpoints of the running cluster for every endpoint setting not set
    explicitly; under the embedded profile with ``security``: the local registry server's URL. Unchanged while
    nothing was started."""
    if settings.profile != "cluster":
        if settings.security and not settings.mlflow_tracking_uri:
            try:
                port = json.loads((registry_server_dir(settings) / "port.json").read_text())["port"]
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                return settings
            return settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{port}"})
        return settings
    try:
        endpoints = json.loads(endpoints_file(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return settings
    update = {k: endpoints[k] for k in ENDPOINT_FIELDS if k in endpoints and k not in settings.model_fields_set}
    return settings.model_copy(update=update)


def site_environment(settings: Settings) -> dict[str, str]:
    """The ``SOP_…`` variables that point a process on another machine at this deployment: what `sop run`
    gives its processor, learner and actors under the cluster profile, and what docs/deploy.md sets by hand."""
    env = {"SOP_KAFKA_BOOTSTRAP": settings.bootstrap(), "SOP_MLFLOW_TRACKING_URI": settings.tracking_uri,
           "SOP_LAKE_URI": settings.lake_root, "SOP_TOPIC_PREFIX": settings.topic_prefix,
           "SOP_TOPIC_REPLICATION_FACTOR": str(settings.replication_factor)}
    if settings.min_insync_replicas is not None:
        env["SOP_TOPIC_MIN_INSYNC_REPLICAS"] = str(settings.min_insync_replicas)
    if settings.lake_storage_options:
        env["SOP_LAKE_STORAGE_OPTIONS"] = json.dumps(settings.lake_storage_options)
    if settings.kafka_secure:  # each process then takes its own principal's client settings (SOP_KAFKA_PRINCIPAL)
        env["SOP_KAFKA_SECURITY"] = settings.kafka_security
    elif settings.kafka_client_config:
        env["SOP_KAFKA_CLIENT_CONFIG"] = json.dumps(settings.kafka_client_config)
    if settings.security:
        env["SOP_SECURITY"] = "true"
    return env


def resolve_security(settings: Settings, *, default_principal: str = ADMIN) -> Settings:
    """With security on: the client settings (and, for a robot, the signing identity) of the process's principal
    from the local stack's security directory, for each of those settings not set explicitly. The admin's file
    may be missing (`sop up` writes it); any other principal's must exist."""
    if not settings.kafka_secure:
        return settings
    principal = settings.kafka_principal or default_principal
    update: dict[str, object] = {}
    if "kafka_client_config" not in settings.model_fields_set:
        path = settings.kafka_auth.client_file(principal)
        if path.exists():
            update["kafka_client_config"] = Settings(kafka_client_config=str(path)).kafka_client_config
        elif principal != ADMIN:
            raise SettingsError(f"SOP_KAFKA_PRINCIPAL: no client settings for {principal!r} ({path} is missing): "
                                f"run `sop up` (sop-* principals) or `sop robot add {principal}`, or set "
                                "SOP_KAFKA_CLIENT_CONFIG")
    if "publish_identity_file" not in settings.model_fields_set:
        identity = settings.kafka_auth.identity_file(principal)
        if identity.exists():
            update["publish_identity_file"] = identity
    return settings.model_copy(update=update) if update else settings


def load_settings(*, default_principal: str = ADMIN, **overrides: object) -> Settings:
    """Read settings from the environment (and explicit overrides); raise :class:`SettingsError` on bad input.
    ``profile=None`` is dropped (a command's ``--profile`` left unset: SOP_PROFILE or the default decides).
    ``default_principal``: whose Kafka client settings a command uses with security on, unless SOP_KAFKA_PRINCIPAL
    says otherwise."""
    if overrides.get("profile", "") is None:
        overrides.pop("profile")
    try:
        return resolve_security(resolve_profile(Settings(**overrides)),  # type: ignore[arg-type]
                                default_principal=default_principal)
    except ValidationError as exc:
        raise settings_error(exc) from None
