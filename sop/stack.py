"""The local stack as `sop up` / `sop down` / `sop status` and the test fixtures see it, in two profiles.

- ``embedded`` (the default): one KRaft broker, MLflow on SQLite with local artifacts, the lake on local disk.
- ``cluster``: what a small production site runs, on loopback — three KRaft brokers (a controller quorum of three;
  topics with replication factor 3 and ``min.insync.replicas=2``), a SeaweedFS S3 server holding the Delta tables
  and MLflow's artifacts in one bucket, and ``mlflow server`` on a PostgreSQL backend store with artifacts proxied
  to that bucket. Its endpoints go to ``<run_dir>/cluster/endpoints.json``; every other command reads them under
  ``--profile cluster`` (:func:`sop.settings.resolve_profile`), and a machine elsewhere sets the same settings by hand
  (:func:`sop.settings.site_environment`, docs/deploy.md).

With ``SOP_SECURITY=true`` the registry is ``mlflow server --app-name basic-auth`` on both profiles (the embedded
one then runs a server on its own SQLite store, ``<run_dir>/mlflow-server``): the admin and one user per role
(learner, processor, actor) are generated once into ``<run_dir>/security/registry/registry-users.json`` (0600),
the experiments and registered models are created by the admin and each role gets its grants
(:mod:`infra.registry_auth`). :func:`role_env` gives a process its role's ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from infra import KafkaBrokerConfig, LocalKafka, LocalMlflow, MlflowConfig, ensure_topics
from infra.kafka import KafkaCluster, KafkaClusterConfig, StackError, wait_until_ready
from infra.mlflow_local import MlflowServer, MlflowServerConfig, ensure_experiment
from infra.objectstore import LAKE_ROLES, LocalObjectStore, ObjectStoreConfig
from infra.postgres import LocalPostgres, PostgresConfig
from infra.registry_auth import RegistryAuth, provision
from sop.settings import Settings, endpoints_file, registry_server_dir, resolve_profile


def registry_auth(settings: Settings) -> RegistryAuth:
    """The registry's admin and role users of this run directory (generated the first time)."""
    return RegistryAuth.create(settings.run_path / "security" / "registry")


def role_env(settings: Settings, role: str) -> dict[str, str]:
    """``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` of ``role`` (learner, processor, actor, admin) for a process of
    the local stack; empty without ``security``."""
    return registry_auth(settings).credentials(role).env() if settings.security else {}


def local_registry_server(settings: Settings, *, auth: bool = True) -> MlflowServer:
    """The embedded profile's authenticated registry (``security`` only): its own SQLite store and artifact root,
    apart from the unauthenticated ``mlflow.db`` (switching security on starts a fresh registry).
    ``auth=False``: enough to stop it (no credentials generated)."""
    root = registry_server_dir(settings)
    return MlflowServer(MlflowServerConfig(state_dir=root, backend_store_uri=f"sqlite:///{root / 'registry.db'}",
                                           artifacts_destination=(root / "artifacts").as_uri(), artifact_env={},
                                           auth=registry_auth(settings) if auth else None))


def _provision(settings: Settings, tracking: str) -> None:
    provision(tracking, registry_auth(settings), policy_model=settings.policy_model_name,
              value_model=settings.value_model_name)


def lake_role_options(settings: Settings, role: str) -> dict[str, str] | None:
    """The cluster's delta-rs options with ``role``'s keys (processor: writes the lake; learner, analyst: read it),
    or None when the lake is not the cluster's own (``s3://<bucket>/lake``) or the cluster never started."""
    own = f"s3://{settings.cluster_bucket}/lake"
    root = settings.lake_root.rstrip("/") if settings.profile == "cluster" else ""
    if root != own and not root.startswith(own + "/"):
        return None
    try:
        return json.loads(endpoints_file(settings).read_text())["lake_role_options"][role]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def registry_up(settings: Settings) -> str:
    """The embedded profile's authenticated registry server, started and provisioned (idempotent); its URL."""
    tracking = local_registry_server(settings).start()
    _provision(settings, tracking)
    return tracking


def _security(settings: Settings) -> dict:
    """The broker fields that secure it (SOP_KAFKA_SECURITY=scram-tls), creating the material if missing."""
    if not settings.kafka_secure:
        return {}
    settings.kafka_auth.ensure()
    return settings.kafka_auth.broker_settings()


def local_kafka(settings: Settings) -> LocalKafka:
    return LocalKafka(KafkaBrokerConfig(data_dir=settings.run_path / "kafka", version=settings.kafka_version,
                                        port=settings.kafka_port, heap_mb=settings.kafka_heap_mb,
                                        max_message_bytes=settings.max_message_bytes, **_security(settings)))


def provision_security(settings: Settings, internal: str) -> Settings:
    """Security on: the services' SCRAM users, ACLs and client files, through the INTERNAL listener (as the brokers
    themselves, mTLS); then wait until the admin's credentials work on the client listener. Returns the settings
    with the admin's client config unless one was set explicitly."""
    from confluent_kafka.admin import AdminClient

    from infra.kafka_security import ADMIN

    sec = settings.kafka_auth
    admin = AdminClient({"bootstrap.servers": internal, **sec.internal_client_config()})
    sec.provision_services(admin, topics=settings.topics, group=settings.processor_group,
                           prefix=settings.topic_prefix)
    if "kafka_client_config" not in settings.model_fields_set:
        settings = settings.model_copy(update={"kafka_client_config": sec.service_config(ADMIN)})
    return settings


def local_mlflow(settings: Settings) -> LocalMlflow:
    return LocalMlflow(MlflowConfig(tracking_uri=settings.tracking_uri, artifact_root=settings.artifact_root,
                                    state_dir=settings.run_path / "mlflow", ui_port=settings.mlflow_ui_port))


@dataclass
class Cluster:
    """The services of the cluster profile (none is started by building this)."""

    kafka: KafkaCluster
    s3: LocalObjectStore
    postgres: LocalPostgres
    mlflow: MlflowServer
    bucket: str

    @property
    def lake_uri(self) -> str:
        return f"s3://{self.bucket}/lake"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/mlartifacts"


def local_cluster(settings: Settings) -> Cluster:
    root = settings.cluster_dir
    kafka = KafkaCluster(KafkaClusterConfig(
        data_dir=root / "kafka", nodes=settings.cluster_kafka_nodes, version=settings.kafka_version,
        first_port=settings.kafka_port, heap_mb=settings.cluster_kafka_heap_mb,
        max_message_bytes=settings.max_message_bytes,
        min_insync_replicas=min(2, settings.cluster_kafka_nodes), **_security(settings)))
    s3 = LocalObjectStore(ObjectStoreConfig(data_dir=root / "s3", role_bucket=settings.cluster_bucket))
    postgres = LocalPostgres(PostgresConfig(data_dir=root / "postgres"))
    # the database URI (its password) and the bucket's keys are known once those services were set up:
    # _cluster_up fills them in
    mlflow = MlflowServer(MlflowServerConfig(
        state_dir=root / "mlflow", backend_store_uri="",
        artifacts_destination=f"s3://{settings.cluster_bucket}/mlartifacts", artifact_env={}))
    return Cluster(kafka=kafka, s3=s3, postgres=postgres, mlflow=mlflow, bucket=settings.cluster_bucket)


@dataclass
class StackInfo:
    bootstrap: str
    external_kafka: bool
    topics_created: list[str]
    tracking_uri: str
    ui_url: str | None
    profile: str = "embedded"
    settings: Settings | None = None  # resolved: under the cluster profile, with the cluster's endpoints
    parts: dict[str, str] = field(default_factory=dict)  # service -> where (cluster profile)


def up(settings: Settings, *, ui: bool = False) -> StackInfo:
    """Start what is not running yet (idempotent) and make sure topics and the MLflow experiment exist."""
    settings.run_path.mkdir(parents=True, exist_ok=True)
    if settings.profile == "cluster":
        return _cluster_up(settings)
    if settings.kafka_bootstrap:
        bootstrap = settings.kafka_bootstrap
        wait_until_ready(bootstrap, timeout_s=30, client_config=settings.kafka_client_config)
    else:
        broker = local_kafka(settings)
        bootstrap = broker.start()
        if settings.kafka_secure:
            settings = provision_security(settings, broker.internal_address or bootstrap)
            wait_until_ready(bootstrap, timeout_s=30, client_config=settings.kafka_client_config)
    created = ensure_topics(bootstrap, settings.topic_specs(), client_config=settings.kafka_client_config)
    if settings.kafka_secure and not settings.kafka_bootstrap:
        _wait_for_grants(settings, bootstrap)
    if settings.security and not settings.mlflow_tracking_uri:
        tracking = registry_up(settings)
        resolved = resolve_profile(settings)
        return StackInfo(bootstrap=bootstrap, external_kafka=bool(settings.kafka_bootstrap), topics_created=created,
                         tracking_uri=tracking, ui_url=tracking, settings=resolved,
                         parts={"mlflow": f"{tracking} (basic-auth, roles)"})
    mlflow = local_mlflow(settings)
    mlflow.init()
    url = mlflow.serve_ui() if ui else None
    return StackInfo(bootstrap=bootstrap, external_kafka=bool(settings.kafka_bootstrap), topics_created=created,
                     tracking_uri=settings.tracking_uri, ui_url=url, settings=settings)


def _wait_for_grants(settings: Settings, bootstrap: str) -> None:
    """Until the processor's credentials and ACLs took effect on the brokers (it sees its topics): a processor
    started at once would otherwise be refused."""
    from infra.kafka_security import PROCESSOR, wait_for_login

    wait_for_login(bootstrap, settings.kafka_auth.service_config(PROCESSOR), topics=settings.topics.values())


def _cluster_up(settings: Settings) -> StackInfo:
    """Brokers (started first, they take longest), S3 server and bucket, PostgreSQL, the MLflow server; then the
    endpoints file, the topics and the experiment."""
    cluster = local_cluster(settings)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sop-kafka-cluster") as pool:
        brokers = pool.submit(cluster.kafka.start)
        try:
            cluster.s3.start()
            cluster.s3.ensure_bucket(cluster.bucket)
            database = cluster.postgres.start()
            tracking = _complete_mlflow(cluster, database, settings).start()
        finally:
            bootstrap = brokers.result()  # raises what the brokers' start raised
    endpoints = {"kafka_bootstrap": bootstrap, "mlflow_tracking_uri": tracking, "lake_uri": cluster.lake_uri,
                 "lake_storage_options": cluster.s3.storage_options(), "s3_endpoint": cluster.s3.endpoint,
                 "bucket": cluster.bucket, "artifacts_destination": cluster.artifacts_destination,
                 # per role (infra.objectstore.LAKE_ROLES): the processor writes the lake, the others only read it
                 "lake_role_options": {role: cluster.s3.storage_options(role) for role in LAKE_ROLES},
                 "kafka_nodes": settings.cluster_kafka_nodes}
    path = endpoints_file(settings)
    path.write_text(json.dumps(endpoints, indent=2))
    path.chmod(0o600)  # it holds the object store's keys
    resolved = resolve_profile(settings)
    if settings.kafka_secure:
        resolved = provision_security(resolved, cluster.kafka.node(1).internal_address or bootstrap)
        wait_until_ready(bootstrap, timeout_s=30, client_config=resolved.kafka_client_config)
    created = ensure_topics(bootstrap, resolved.topic_specs(), client_config=resolved.kafka_client_config)
    if settings.kafka_secure:
        _wait_for_grants(resolved, bootstrap)
    if settings.security:
        _provision(settings, tracking)  # the experiments and models, by the admin; the role users and grants
    else:
        ensure_experiment(tracking, None)  # artifacts: the server's proxied store (mlflow-artifacts:/)
    parts = {"kafka": f"{settings.cluster_kafka_nodes} brokers {bootstrap}", "s3": cluster.s3.endpoint,
             "lake": cluster.lake_uri, "postgres": _without_password(cluster.postgres.uri), "mlflow": tracking,
             "artifacts": cluster.artifacts_destination}
    return StackInfo(bootstrap=bootstrap, external_kafka=False, topics_created=created, tracking_uri=tracking,
                     ui_url=tracking, profile="cluster", settings=resolved, parts=parts)


def _complete_mlflow(cluster: Cluster, database: str, settings: Settings) -> MlflowServer:
    opts = cluster.s3.storage_options()
    # the server alone reaches the bucket (boto3 reads these); clients see only its HTTP API
    artifact_env = {"MLFLOW_S3_ENDPOINT_URL": opts["AWS_ENDPOINT_URL"],
                    "AWS_ACCESS_KEY_ID": opts["AWS_ACCESS_KEY_ID"],
                    "AWS_SECRET_ACCESS_KEY": opts["AWS_SECRET_ACCESS_KEY"],
                    "AWS_DEFAULT_REGION": opts["AWS_REGION"]}
    return MlflowServer(replace(cluster.mlflow.config, backend_store_uri=database, artifact_env=artifact_env,
                                auth=registry_auth(settings) if settings.security else None))


def running_cluster(settings: Settings) -> Cluster:
    """The services of a cluster that runs (``sop up --profile cluster``), each ready to be stopped, killed and
    started again on its ports and data: the MLflow server with its database and artifact store filled in."""
    cluster = local_cluster(settings)
    if cluster.postgres.pid() is None:
        raise StackError("the cluster's PostgreSQL is not running: `sop up --profile cluster` first")
    return replace(cluster, mlflow=_complete_mlflow(cluster, cluster.postgres.uri, settings))


def _without_password(uri: str) -> str:
    head, _, tail = uri.partition("@")
    return f"{head.rsplit(':', 1)[0]}:***@{tail}" if tail else uri


def down(settings: Settings) -> dict[str, bool]:
    if settings.profile == "cluster":
        cluster = local_cluster(settings)
        stopped = {"mlflow-server": cluster.mlflow.stop()}  # first: it holds connections to the others
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="sop-down") as pool:
            futures = {"postgres": pool.submit(cluster.postgres.stop), "s3": pool.submit(cluster.s3.stop),
                       "kafka": pool.submit(cluster.kafka.stop)}
            stopped.update({name: f.result() for name, f in futures.items()})
        return stopped
    return {"mlflow-ui": local_mlflow(settings).stop_ui(), "mlflow-server": local_registry_server(settings, auth=False).stop(),
            "kafka": local_kafka(settings).stop()}


def cluster_status(settings: Settings) -> dict[str, tuple[str, str]]:
    """Service -> (state, where) for the cluster profile."""
    cluster = local_cluster(settings)
    out: dict[str, tuple[str, str]] = {}
    layout = cluster.kafka.layout_file.exists()
    for i in cluster.kafka.node_ids:
        st = cluster.kafka.node(i).state() if layout else None
        out[f"kafka node {i}"] = ("running", st["bootstrap"]) if st else ("stopped", "-")
    s3 = cluster.s3.state()
    out["s3 (seaweedfs)"] = ("running", f"{cluster.s3.endpoint} bucket {cluster.bucket}") if s3 else ("stopped", "-")
    pg = cluster.postgres.pid()
    out["postgres"] = ("running", _without_password(cluster.postgres.uri)) if pg else ("stopped", "-")
    ml = cluster.mlflow.state()
    out["mlflow server"] = ("running", cluster.mlflow.url) if ml else ("stopped", "-")
    return out

