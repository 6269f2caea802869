"""One local Kafka 4.x broker in KRaft mode, run from the official jars on Maven Central."""

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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True, kw_only=True)
class TopicSpec:
    name: str
    partitions: int = 4
    retention_ms: int = 7 * 24 * 3600 * 1000
    max_message_bytes: int = 8 * 1024 * 1024
    extra: dict[str, str] = field(default_factory=dict)


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

    def __post_init__(self) -> None:
        if not (0 <= self.port < 65536 and 0 <= self.controller_port < 65536):
            raise StackError(f"Kafka ports must be in 0..65535, got {self.port}/{self.controller_port}")
        if self.heap_mb < 128:
            raise StackError(f"Kafka heap of {self.heap_mb} MB is too small: set at least 128")


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
            wait_until_ready(st["bootstrap"], timeout_s=self.config.start_timeout_s)
            return st["bootstrap"]
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        libs = resolve_jars(cfg.version, cfg.jar_cache)
        port = cfg.port or free_port(cfg.host)
        if _port_open(cfg.host, port):
            raise StackError(
                f"port {cfg.host}:{port} is already in use: stop what listens there or set SOP_KAFKA_PORT (0 = any free port)"
            )
        cport = cfg.controller_port or free_port(cfg.host)
        props = cfg.data_dir / "server.properties"
        log_dir = cfg.data_dir / "log"
        props.write_text(_server_properties(cfg, port, cport, log_dir))
        classpath = f"{libs}/*"
        java = ["java", f"-Xmx{cfg.heap_mb}m", f"-Xms{min(cfg.heap_mb, 256)}m", "-XX:+UseG1GC",
                "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={cfg.data_dir}",
                "-cp", classpath]
        if not (log_dir / "meta.properties").exists():
            cluster_id = new_cluster_id()
            fmt = subprocess.run([*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)],
                                 capture_output=True, text=True)
            if fmt.returncode != 0:
                raise StackError(f"formatting KRaft storage failed:\n{fmt.stdout[-2000:]}{fmt.stderr[-2000:]}")
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen([*java, "kafka.Kafka", str(props)], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        bootstrap = f"{cfg.host}:{port}"
        self.state_file.write_text(json.dumps({"pid": self._proc.pid, "bootstrap": bootstrap,
                                               "controller_port": cport, "version": cfg.version}))
        try:
            wait_until_ready(bootstrap, timeout_s=cfg.start_timeout_s, proc=self._proc, log_file=self.log_file)
        except StackError:
            self.stop()
            raise
        return bootstrap

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
        props = (self.config.data_dir / "server.properties").read_text()
        port = int(props.split("listeners=PLAINTEXT://", 1)[1].split(",", 1)[0].rsplit(":", 1)[1])
        cport = int(props.split("CONTROLLER://", 1)[1].split("\n", 1)[0].rsplit(":", 1)[1])
        self.state_file.unlink(missing_ok=True)
        again = LocalKafka(KafkaBrokerConfig(**{**self.config.__dict__, "port": port, "controller_port": cport}))
        bootstrap = again.start()
        self._proc = again._proc
        return bootstrap


def _server_properties(cfg: KafkaBrokerConfig, port: int, cport: int, log_dir: Path) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{cfg.host}:{cport}",
        f"listeners=PLAINTEXT://{cfg.host}:{port},CONTROLLER://{cfg.host}:{cport}",
        f"advertised.listeners=PLAINTEXT://{cfg.host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        f"log.dirs={log_dir}",
        "num.partitions=4",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=8",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=true",
        f"message.max.bytes={cfg.max_message_bytes}",
        f"replica.fetch.max.bytes={cfg.max_message_bytes}",
        "log.segment.bytes=268435456",
        "",
    ])


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
                     proc: subprocess.Popen | None = None, log_file: Path | None = None) -> None:
    """Block until the broker answers a metadata request and has a controller."""
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
            if md.brokers:
                return
        except KafkaException as exc:
            last = exc
        time.sleep(0.25)
    raise StackError(f"Kafka at {bootstrap} did not answer within {timeout_s:.0f}s ({last})")


def topic_names(prefix: str) -> dict[str, str]:
    """Record name -> topic for one deployment (plus the dead-letter topic under ``"deadletter"``)."""
    return {"Step": f"{prefix}steps", "EpisodeEvent": f"{prefix}episodes",
            "InterventionEvent": f"{prefix}interventions", "deadletter": f"{prefix}deadletter"}


def create_topic_set(bootstrap: str, *, prefix: str, partitions: int) -> dict[str, str]:
    """Create the four topics under ``prefix`` (tests and benchmarks use a fresh prefix each)."""
    topics = topic_names(prefix)
    ensure_topics(bootstrap, [TopicSpec(name=t, partitions=partitions) for t in topics.values()])
    return topics


def ensure_topics(bootstrap: str, specs: list[TopicSpec], *, client_config: dict | None = None,
                  timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Harmless to call twice."""
    admin = AdminClient({"bootstrap.servers": bootstrap, **(client_config or {})})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    new = [
        NewTopic(s.name, num_partitions=s.partitions, replication_factor=1,
                 config={"retention.ms": str(s.retention_ms), "max.message.bytes": str(s.max_message_bytes), **s.extra})
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
