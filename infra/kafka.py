"""Local Kafka 4.x in KRaft mode, run from the official jars on Maven Central: one broker (:class:`LocalKafka`,
the embedded profile) or a cluster of combined broker/controller nodes with a controller quorum
(:class:`KafkaCluster`, the cluster profile), and topic creation that honours replication settings."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

POM = Path(__file__).parent / "kafka" / "pom.xml"
LOG4J_CONFIG = Path(__file__).parent / "kafka" / "log4j2.properties"

# Kafka 4.1.1: the newest release with which both confluent-kafka 2.16 and faust-streaming's
# aiokafka 0.14 pass our integration tests (see README, "Broker version").
DEFAULT_KAFKA_VERSION = "4.1.1"


def new_cluster_id() -> str:
    """A random KRaft cluster id (base64url of a UUID) that does not start with "-": one in 64 would, and
    `kafka-storage format -t -abc…` then reads the id as an option and fails (as Kafka's Uuid.randomUuid,
    which draws again for the same reason)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class StackError(RuntimeError):
    """The local stack could not be started, reached or stopped; the message says what to fix."""


_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now that this process has not handed out before.

    The kernel may give the same ephemeral port to two ``bind(0)`` calls once the first socket is closed, and the
    servers we start bind their ports only later: a broker once got the same port for two of its listeners and
    refused to format its storage. Remembering what was handed out makes the ports of one start distinct."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if (host, port) not in _handed_out:
            _handed_out.add((host, port))
            return port
    raise StackError(f"no free port on {host} that was not handed out already (64 tries)")


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    partitions: int = 4
    replication_factor: int = 1
    min_insync_replicas: int | None = None  # None: the broker's default
    retention_ms: int = 7 * 24 * 3600 * 1000
    max_message_bytes: int = 8 * 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replication_factor < 1:
            raise StackError(f"topic {self.name}: replication factor must be >= 1, got {self.replication_factor}")
        if self.min_insync_replicas is not None and not 1 <= self.min_insync_replicas <= self.replication_factor:
            raise StackError(f"topic {self.name}: min.insync.replicas must be in 1..{self.replication_factor} "
                             f"(the replication factor), got {self.min_insync_replicas}")

    def config(self) -> dict[str, str]:
        """The topic-level configs this spec sets."""
        out = {"retention.ms": str(self.retention_ms), "max.message.bytes": str(self.max_message_bytes)}
        if self.min_insync_replicas is not None:
            out["min.insync.replicas"] = str(self.min_insync_replicas)
        return {**out, **self.extra}


@dataclass(frozen=True, kw_only=True)
class KafkaBrokerConfig:
    data_dir: Path
    version: str = DEFAULT_KAFKA_VERSION
    host: str = "127.0.0.1"
    port: int = 9092  # 0 picks a free port
    controller_port: int = 0  # 0 picks a free port
    jar_cache: Path = Path(os.environ.get("SOP_JAR_CACHE", Path.home() / ".cache" / "sop" / "jars"))
    heap_mb: int = 768
    max_message_bytes: int = 8 * 1024 * 1024
    start_timeout_s: float = 90.0
    # One node of a cluster: its id, the controller quorum ("1@host:port,2@host:port,...") and the cluster id
    # every node is formatted with. None: a cluster of this node alone.
    node_id: int = 1
    voters: str | None = None
    cluster_id: str | None = None
    # Replication of the broker's internal topics (consumer offsets, transactions) and the default of topics
    # created without one (auto-created ones).
    replication_factor: int = 1
    min_insync_replicas: int = 1
    # The listener clients use: PLAINTEXT, or SSL / SASL_PLAINTEXT / SASL_SSL with ``extra_properties`` saying how
    # (e.g. ``listener.name.client.plain.sasl.jaas.config``, ``ssl.keystore.*``). A secured client listener gets
    # a PLAINTEXT listener beside it on loopback for the brokers themselves and for readiness checks.
    client_protocol: str = "PLAINTEXT"
    extra_properties: dict[str, str] = field(default_factory=dict)
    # The brokers' own listeners (inter-broker INTERNAL, KRaft CONTROLLER): PLAINTEXT on loopback, or SSL with
    # client certificates (``extra_properties`` say how; infra.kafka_security). ``internal_client_config`` is what
    # the readiness checks (and the set-up's admin calls) present on the INTERNAL listener.
    internal_protocol: str = "PLAINTEXT"
    controller_protocol: str = "PLAINTEXT"
    internal_client_config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for what in ("internal_protocol", "controller_protocol"):
            if getattr(self, what) not in ("PLAINTEXT", "SSL"):
                raise StackError(f"{what} must be PLAINTEXT or SSL, got {getattr(self, what)!r}")
        if not (0 <= self.port < 65536 and 0 <= self.controller_port < 65536):
            raise StackError(f"Kafka ports must be in 0..65535, got {self.port}/{self.controller_port}")
        if self.heap_mb < 128:
            raise StackError(f"Kafka heap of {self.heap_mb} MB is too small: set at least 128")
        if self.client_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise StackError(f"unknown Kafka listener protocol {self.client_protocol!r}")
        if not 1 <= self.min_insync_replicas <= self.replication_factor:
            raise StackError(f"min.insync.replicas {self.min_insync_replicas} must be in 1..{self.replication_factor}")


def resolve_jars(version: str, cache: Path, *, pom: Path = POM, folder: str = "libs") -> Path:
    """Resolve the jars of ``pom`` (the broker's by default) with Maven into ``cache/kafka-<version>/<folder>``
    (once: again only when the pom changed) and return that folder."""
    libs = cache / f"kafka-{version}" / folder
    done = libs / ".complete"
    stamp = hashlib.sha256(pom.read_bytes()).hexdigest()
    if done.exists() and done.read_text().strip() in (stamp, ""):  # "": stamped before the pom hash was kept
        return libs
    if shutil.which("mvn") is None:
        raise StackError("Maven (mvn) is not installed: run `make setup` or `apt-get install maven`")
    if shutil.which("java") is None:
        raise StackError("Java is not installed: run `make setup` or `apt-get install openjdk-17-jre-headless`")
    libs.mkdir(parents=True, exist_ok=True)
    cmd = ["mvn", "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
           f"-Dkafka.version={version}", f"-DoutputDirectory={libs}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError(f"Maven could not resolve {pom.name} for Kafka {version}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    done.write_text(stamp)
    return libs


class LocalKafka:
    """A broker process whose state (pid, ports) lives in ``data_dir/broker.json`` so other processes find it."""

    def __init__(self, config: KafkaBrokerConfig) -> None:
        self.config = config
        self.state_file = config.data_dir / "broker.json"
        self.log_file = config.data_dir / "broker.log"
        self._proc: subprocess.Popen | None = None

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict | None:
        try:
            st = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return st if _pid_alive(st.get("pid", -1)) else None

    @property
    def bootstrap(self) -> str | None:
        st = self.state()
        return st["bootstrap"] if st else None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> str:
        """Start the broker unless it already runs; return its bootstrap address once it answers."""
        if (st := self.state()) is not None:
            wait_until_ready(st.get("ready", st["bootstrap"]), timeout_s=self.config.start_timeout_s,
                             client_config=self._ready_config(st))
            return st["bootstrap"]
        bootstrap = self.launch()
        self.wait_ready()
        return bootstrap

    def launch(self) -> str:
        """Format the storage if needed and start the process, without waiting for it to answer (a node of a
        cluster answers only once a quorum of controllers runs); return the bootstrap address."""
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        libs = resolve_jars(cfg.version, cfg.jar_cache)
        ports = self._ports()
        for what, port in ports.items():
            if _port_open(cfg.host, port):
                raise StackError(f"port {cfg.host}:{port} ({what} of Kafka node {cfg.node_id}) is already in use: stop "
                                 "what listens there or set SOP_KAFKA_PORT (0 = any free port)")
        props = cfg.data_dir / "server.properties"
        log_dir = cfg.data_dir / "log"
        props.write_text(_server_properties(cfg, ports, log_dir))
        java = ["java", f"-Xmx{cfg.heap_mb}m", f"-Xms{min(cfg.heap_mb, 256)}m", "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={cfg.data_dir}",
                "-cp", f"{libs}/*"]
        if not (log_dir / "meta.properties").exists():
            cluster_id = cfg.cluster_id or new_cluster_id()
            fmt = subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise StackError(f"formatting KRaft storage failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen([*java, "kafka.Kafka", str(props)], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        bootstrap = f"{cfg.host}:{ports['port']}"
        ready = f"{cfg.host}:{ports.get('internal_port', ports['port'])}"
        self.state_file.write_text(json.dumps({"pid": self._proc.pid, "bootstrap": bootstrap, "ready": ready,
                                               "node_id": cfg.node_id, "version": cfg.version, **ports}))
        return bootstrap

    def wait_ready(self, *, min_brokers: int = 1) -> None:
        """Block until this node answers (and metadata shows ``min_brokers``); stop it on failure."""
        st = self.state()
        if st is None:
            tail = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
            raise StackError(f"Kafka node {self.config.node_id} is not running:\n{tail}")
        try:
            wait_until_ready(st.get("ready", st["bootstrap"]), timeout_s=self.config.start_timeout_s, proc=self._proc,
                             log_file=self.log_file, min_brokers=min_brokers, client_config=self._ready_config(st))
        except StackError:
            self.stop()
            raise

    def _ready_config(self, state: dict) -> dict[str, str]:
        """Client settings for the readiness address: the INTERNAL listener's when there is one."""
        return self.config.internal_client_config if "ready" in state and state["ready"] != state["bootstrap"] else {}

    @property
    def internal_address(self) -> str | None:
        """host:port of the INTERNAL listener (a secured client listener only), where the set-up talks to the
        broker as the broker itself (``internal_client_config``)."""
        st = self.state()
        return st.get("ready") if st and st.get("ready") != st.get("bootstrap") else None

    def _ports(self) -> dict[str, int]:
        """The ports of this node: those of its first start (kept in ports.json, so that restarts and the other
        nodes' quorum find it again), else the configured ones, else free ones."""
        saved = self.config.data_dir / "ports.json"
        cfg = self.config
        try:
            ports = json.loads(saved.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            ports = {}
        if cfg.port:
            ports["port"] = cfg.port
        if cfg.controller_port:
            ports["controller_port"] = cfg.controller_port
        ports.setdefault("port", free_port(cfg.host))
        ports.setdefault("controller_port", free_port(cfg.host))
        if cfg.client_protocol != "PLAINTEXT":
            ports.setdefault("internal_port", free_port(cfg.host))
        else:
            ports.pop("internal_port", None)
        saved.write_text(json.dumps(ports))
        return ports

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``timeout_s``). Returns whether one was running."""
        st = self.state()
        if st is None:
            return False
        pid = st["pid"]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
            else:
                time.sleep(0.1)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._proc is not None:
                self._proc.wait(timeout=10)
        self.state_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """SIGKILL the broker (tests of failure); its state stays so :meth:`restart` reuses the same ports."""
        st = self.state()
        if st is not None:
            os.kill(st["pid"], signal.SIGKILL)
            if self._proc is not None:
                self._proc.wait(timeout=10)

    def restart_same_ports(self) -> str:
        """Start again on the ports of the last run (after :meth:`kill` or :meth:`stop`)."""
        self.state_file.unlink(missing_ok=True)
        bootstrap = self.start()  # _ports() reads them back from ports.json
        return bootstrap


def _server_properties(cfg: KafkaBrokerConfig, ports: dict[str, int], log_dir: Path) -> str:
    host, port, cport = cfg.host, ports["port"], ports["controller_port"]
    voters = cfg.voters or f"{cfg.node_id}@{host}:{cport}"
    if cfg.client_protocol == "PLAINTEXT":
        listeners = [f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}",
                     f"advertised.listeners=PLAINTEXT://{host}:{port}",
                     "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                     "inter.broker.listener.name=PLAINTEXT"]
    else:
        internal = ports["internal_port"]
        listeners = [f"listeners=CLIENT://{host}:{port},INTERNAL://{host}:{internal},CONTROLLER://{host}:{cport}",
                     f"advertised.listeners=CLIENT://{host}:{port},INTERNAL://{host}:{internal}",
                     f"listener.security.protocol.map=CLIENT:{cfg.client_protocol},INTERNAL:{cfg.internal_protocol},"
                     f"CONTROLLER:{cfg.controller_protocol}",
                     "inter.broker.listener.name=INTERNAL"]
    rf, isr = cfg.replication_factor, cfg.min_insync_replicas
    lines = [
        "process.roles=broker,controller",
        f"node.id={cfg.node_id}",
        f"controller.quorum.voters={voters}",
        *listeners,
        "controller.listener.names=CONTROLLER",
        f"log.dirs={log_dir}",
        "num.partitions=4",
        f"default.replication.factor={rf}",
        f"min.insync.replicas={isr}",
        f"offsets.topic.replication.factor={rf}",
        "offsets.topic.num.partitions=8",
        f"transaction.state.log.replication.factor={rf}",
        f"transaction.state.log.min.isr={isr}",
        f"share.coordinator.state.topic.replication.factor={rf}",
        f"share.coordinator.state.topic.min.isr={isr}",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        f"message.max.bytes={cfg.max_message_bytes}",
        f"replica.fetch.max.bytes={cfg.max_message_bytes}",
        "log.segment.bytes=268435456",
        *(f"{k}={v}" for k, v in cfg.extra_properties.items()),
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class KafkaClusterConfig:
    """A cluster of ``nodes`` combined broker/controller processes on one host (the controller quorum is all of
    them): what a small production site runs, on loopback."""

    data_dir: Path
    nodes: int = 3
    version: str = DEFAULT_KAFKA_VERSION
    host: str = "127.0.0.1"
    first_port: int = 0  # node i listens on first_port + i - 1; 0 = free ports
    jar_cache: Path = Path(os.environ.get("SOP_JAR_CACHE", Path.home() / ".cache" / "sop" / "jars"))
    heap_mb: int = 384
    max_message_bytes: int = 8 * 1024 * 1024
    min_insync_replicas: int = 2
    start_timeout_s: float = 180.0
    # every node's listeners (see KafkaBrokerConfig): security settings shared by the whole cluster
    client_protocol: str = "PLAINTEXT"
    internal_protocol: str = "PLAINTEXT"
    controller_protocol: str = "PLAINTEXT"
    extra_properties: dict[str, str] = field(default_factory=dict)
    internal_client_config: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise StackError(f"a Kafka cluster needs at least one node, got {self.nodes}")
        if not 1 <= self.min_insync_replicas <= self.nodes:
            raise StackError(f"min.insync.replicas {self.min_insync_replicas} must be in 1..{self.nodes} (the nodes)")
        if self.first_port and not 0 < self.first_port + self.nodes - 1 < 65536:
            raise StackError(f"Kafka ports {self.first_port}..{self.first_port + self.nodes - 1} are not all valid")


class KafkaCluster:
    """``nodes`` Kafka processes forming one KRaft cluster; its layout (ports, cluster id) lives in
    ``data_dir/cluster.json`` and every node's state under ``data_dir/node-<id>``, so any process finds it."""

    def __init__(self, config: KafkaClusterConfig) -> None:
        self.config = config
        self.layout_file = config.data_dir / "cluster.json"

    def _layout(self) -> dict:
        """Ports and cluster id, chosen at the first start and kept (the quorum is formatted with them)."""
        try:
            return json.loads(self.layout_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        nodes = {}
        for i in range(1, cfg.nodes + 1):
            nodes[str(i)] = {"port": cfg.first_port + i - 1 if cfg.first_port else free_port(cfg.host),
                             "controller_port": free_port(cfg.host)}
        layout = {"cluster_id": new_cluster_id(), "nodes": nodes}
        self.layout_file.write_text(json.dumps(layout))
        return layout

    def node(self, node_id: int) -> LocalKafka:
        """The process of node ``node_id`` (1-based): stop, kill or restart one node."""
        cfg, layout = self.config, self._layout()
        ports = layout["nodes"][str(node_id)]
        voters = ",".join(f"{i}@{cfg.host}:{n['controller_port']}" for i, n in sorted(layout["nodes"].items()))
        return LocalKafka(KafkaBrokerConfig(
            data_dir=cfg.data_dir / f"node-{node_id}", version=cfg.version, host=cfg.host, port=ports["port"],
            controller_port=ports["controller_port"], jar_cache=cfg.jar_cache, heap_mb=cfg.heap_mb,
            max_message_bytes=cfg.max_message_bytes, start_timeout_s=cfg.start_timeout_s, node_id=node_id,
            voters=voters, cluster_id=layout["cluster_id"], replication_factor=cfg.nodes,
            min_insync_replicas=cfg.min_insync_replicas, client_protocol=cfg.client_protocol,
            internal_protocol=cfg.internal_protocol, controller_protocol=cfg.controller_protocol,
            extra_properties=cfg.extra_properties, internal_client_config=cfg.internal_client_config))

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.config.nodes + 1))

    def state(self) -> dict | None:
        """``{"bootstrap": ..., "nodes": {id: pid}}`` while every node runs, else None."""
        if not self.layout_file.exists():
            return None
        pids = {}
        for i in self.node_ids:
            st = self.node(i).state()
            if st is None:
                return None
            pids[i] = st["pid"]
        return {"bootstrap": self.bootstrap_servers, "nodes": pids}

    @property
    def bootstrap_servers(self) -> str:
        layout = self._layout()
        return ",".join(f"{self.config.host}:{n['port']}" for _, n in sorted(layout["nodes"].items()))

    def start(self) -> str:
        """Start the nodes that do not run (all at once: none answers before a quorum runs), wait until every
        node answers and sees all the brokers, and return the bootstrap list."""
        resolve_jars(self.config.version, self.config.jar_cache)
        nodes = [self.node(i) for i in self.node_ids]
        try:
            for node in nodes:
                if node.state() is None:
                    node.launch()
            for node in nodes:
                node.wait_ready(min_brokers=self.config.nodes)
        except StackError:
            self.stop()
            raise
        return self.bootstrap_servers

    def stop(self, timeout_s: float = 60.0) -> bool:
        """Stop every node (SIGTERM to all, then each waited for); returns whether any was running."""
        nodes = [self.node(i) for i in self.node_ids] if self.layout_file.exists() else []
        running = [(n, n.state()) for n in nodes]
        running = [(n, st) for n, st in running if st is not None]
        for _, st in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(st["pid"], signal.SIGTERM)
        for node, _ in running:
            node.stop(timeout_s=timeout_s)
        return bool(running)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists": look at /proc
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until_ready(bootstrap: str, *, timeout_s: float, client_config: dict | None = None,
                     proc: subprocess.Popen | None = None, log_file: Path | None = None,
                     min_brokers: int = 1) -> None:
    """Block until the broker answers a metadata request listing at least ``min_brokers`` brokers."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    # log_level 0: "connection refused" while the broker boots is expected, not worth a line per retry
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **(client_config or {})})
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text()[-3000:] if log_file and log_file.exists() else ""
            raise StackError(f"Kafka broker exited with code {proc.returncode} while starting:\n{tail}")
        try:
            md = admin.list_topics(timeout=2)
            if len(md.brokers) >= min_brokers:
                return
        except KafkaException as exc:
            last = exc
        time.sleep(0.25)
    raise StackError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f}s ({last})")


def topic_names(prefix: str) -> dict[str, str]:
    """Record name -> topic for one deployment (plus the dead-letter topic under ``"deadletter"``)."""
    return {"Step": f"{prefix}steps", "EpisodeEvent": f"{prefix}episodes",
            "InterventionEvent": f"{prefix}interventions", "deadletter": f"{prefix}deadletter"}


def create_topic_set(bootstrap: str, *, prefix: str, partitions: int, replication_factor: int = 1,
                     min_insync_replicas: int | None = None, client_config: dict | None = None) -> dict[str, str]:
    """Create the four topics under ``prefix`` (tests and benchmarks use a fresh prefix each)."""
    topics = topic_names(prefix)
    ensure_topics(bootstrap, [TopicSpec(name=t, partitions=partitions, replication_factor=replication_factor,
                                        min_insync_replicas=min_insync_replicas) for t in topics.values()],
                  client_config=client_config)
    return topics


def ensure_topics(bootstrap: str, specs: list[TopicSpec], *, client_config: dict | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Harmless to call twice."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **(client_config or {})})
    md = admin.list_topics(timeout=timeout_s).topics
    existing = set(md)
    for s in specs:
        if s.name in md and md[s.name].partitions:
            replicas = min(len(p.replicas) for p in md[s.name].partitions.values())
            if replicas < s.replication_factor:
                raise StackError(
                    f"topic {s.name} exists with replication factor {replicas}, the settings ask for "
                    f"{s.replication_factor}: add replicas with kafka-reassign-partitions, or use another "
                    "SOP_TOPIC_PREFIX")
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication_factor, config=s.config())
        for s in specs if s.name not in existing
    ]
    if not new:
        return []
    created = []
    for name, fut in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise StackError(f"could not create topic {name}: {exc}") from exc
    # wait until metadata shows leaders for every partition
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=5).topics
        if all(n in md and md[n].partitions and all(p.leader >= 0 for p in md[n].partitions.values())
               for n in created):
            break
        time.sleep(0.1)
    return created
