"""A real S3-compatible object store on loopback: SeaweedFS (master, volume server, filer and S3 gateway in one
``weed server`` process), built once per machine from its Go module into a cache outside the repository.

    store = LocalObjectStore(ObjectStoreConfig(data_dir=run_dir / "s3"))
    endpoint = store.start()              # builds ``weed`` if needed (minutes, once), waits until S3 answers
    store.ensure_bucket("sop")
    options = store.storage_options()     # for delta-rs: endpoint, keys, conditional put
    store.stop()

Roles (``-s3.config``: one identity per role, each with its own keys and actions): ``sop`` (Admin: the stack
itself — buckets, the MLflow server's artifacts, people's maintenance commands), ``processor`` (Read, Write, List,
Tagging on ``<bucket>/lake/*``: it writes the tables), ``learner`` and ``analyst`` (Read on ``<bucket>/lake/*``,
List on the bucket: they read the tables, `sop sql` included, and can write nothing). The role keys are generated
once into ``data_dir/role-keys.json`` (0600); ``storage_options(role)`` gives each its delta-rs options.

Why SeaweedFS: it is S3 with credentials (SigV4) and honours conditional writes (``If-None-Match: *`` and
``If-Match``) atomically also between concurrent requests (SeaweedFS PR 8801, March 2026), which delta-rs 1.x uses
to commit a table version exactly once when several writers race (``aws_conditional_put=etag``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.kafka import StackError, _pid_alive, _port_open, free_port

# SeaweedFS tags its releases without a "v" (4.x), so the Go module proxy serves the source under pseudo-versions:
# this one is the commit of 2026-11-09, which includes the conditional-write fix (PR 8801).
SEAWEEDFS_MODULE = "github.com/seaweedfs/seaweedfs"
SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
CACHE = Path(os.environ.get("SOP_TOOL_CACHE", Path.home() / ".cache" / "sop"))
READY_PROBE = ".sop-ready-probe"  # the object wait_ready writes and deletes to see that the server takes writes


def weed_binary(version: str = SEAWEEDFS_VERSION, cache: Path = CACHE) -> Path:
    return cache / "bin" / f"weed-{version.rsplit('-', 1)[-1]}"


def build_weed(version: str = SEAWEEDFS_VERSION, cache: Path = CACHE, *, log: Path | None = None) -> Path:
    """The ``weed`` binary of ``version``, built with Go from the module proxy the first time (a few minutes on
    2 cores; the Go caches stay under ``cache/go`` so a rebuild is quick). Returns its path."""
    binary = weed_binary(version, cache)
    if binary.exists():
        return binary
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise StackError("Go is not installed, so SeaweedFS (the cluster profile's S3 server) cannot be built: "
                         "run `make setup` (installs golang-go) or install Go")
    env = {**os.environ, "GOPATH": str(cache / "go"), "GOCACHE": str(cache / "go" / "build-cache"),
           "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "auto", "CGO_ENABLED": "0"}
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        found = subprocess.run([go, "mod", "download", "-json", f"{SEAWEEDFS_MODULE}@{version}"], env=env,
                               capture_output=True, text=True)
        if found.returncode != 0:
            raise StackError(f"could not download SeaweedFS {version} from the Go module proxy:\n{found.stderr[-2000:]}")
        source = Path(json.loads(found.stdout)["Dir"])
        go = _go_at_least(go, _required_go(source / "go.mod"), env)
        # `go install module@version` refuses modules whose go.mod has replace directives (SeaweedFS has one), so
        # the source is built as the main module from a writable copy.
        work = cache / "build" / f"seaweedfs-{version}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(source, work)
        for path in [work, *work.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        built = subprocess.run([go, "build", "-trimpath", "-ldflags", "-s -w", "-o", str(partial), "./weed"],
                               cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
        if built.returncode != 0:
            raise StackError(f"building SeaweedFS failed (exit {built.returncode})" + (f": see {log}" if log else ""))
        partial.replace(binary)
        shutil.rmtree(work, ignore_errors=True)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    return binary


def _required_go(go_mod: Path) -> str:
    for line in go_mod.read_text().splitlines():
        if line.startswith("go "):
            return line.split()[1]
    return "1.21"


def _go_version(go: str) -> tuple[int, ...]:
    out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True).stdout.strip()
    return tuple(int(x) for x in out.removeprefix("go").split(".")[:3] if x.isdigit())


def _go_at_least(go: str, required: str, env: dict[str, str]) -> str:
    """``go`` if it is new enough to build (Go >= 1.21 switches toolchains by itself, GOTOOLCHAIN=auto); else the
    Go release ``required`` fetched as the module golang.org/toolchain from the module proxy (Debian 12's
    golang-go is 1.19)."""
    if _go_version(go) >= (1, 21):
        return go
    module = f"golang.org/toolchain@v0.0.1-go{required}.linux-amd64"
    found = subprocess.run([go, "mod", "download", "-json", module], env=env, capture_output=True, text=True)
    if found.returncode != 0:
        raise StackError(f"Go {required} is needed to build SeaweedFS and {module} could not be downloaded:\n"
                         f"{found.stderr[-2000:]}")
    newer = Path(json.loads(found.stdout)["Dir"]) / "bin" / "go"
    newer.chmod(newer.stat().st_mode | 0o111)
    return str(newer)


LAKE_ROLES = ("processor", "learner", "analyst")


def role_actions(role: str, bucket: str, lake_prefix: str = "lake") -> list[str]:
    """The SeaweedFS actions of ``role``: the processor writes ``bucket/lake_prefix/*``, the others only read it."""
    scope = f"{bucket}/{lake_prefix.strip('/')}/*"
    if role == "processor":
        return [f"Read:{scope}", f"Write:{scope}", f"Tagging:{scope}", f"List:{bucket}"]
    if role in ("learner", "analyst"):
        return [f"Read:{scope}", f"List:{bucket}"]
    raise ValueError(f"unknown object-store role {role!r}; one of {', '.join(LAKE_ROLES)}")


@dataclass(frozen=True, kw_only=True)
class ObjectStoreConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    s3_port: int = 0  # 0 = a free port (kept for later starts)
    access_key: str = "sop-access"
    secret_key: str = "sop-secret-key-local"
    region: str = "us-east-1"
    volume_size_limit_mb: int = 64
    role_bucket: str = "sop"  # the bucket whose lake the role identities (LAKE_ROLES) may use
    binary: Path | None = None  # None: built into the cache (build_weed)
    start_timeout_s: float = 90.0
    # The master's raft election timeout. SeaweedFS's 10 s default made a restarted server (resumed raft state, a
    # single master) refuse writes for ~15 s after S3 already answered reads: one master has nobody to wait for.
    election_timeout_s: float = 1.0


class LocalObjectStore:
    """One ``weed server`` process with the S3 gateway; its pid and ports live in ``data_dir/s3.json``."""

    def __init__(self, config: ObjectStoreConfig) -> None:
        self.config = config
        self.state_file = config.data_dir / "s3.json"
        self.ports_file = config.data_dir / "ports.json"
        self.log_file = config.data_dir / "weed.log"
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.config.host}:{self._ports()['s3']}"

    def state(self) -> dict | None:
        try:
            st = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return st if _pid_alive(st.get("pid", -1)) else None

    def _ports(self) -> dict[str, int]:
        try:
            ports = json.loads(self.ports_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            host = self.config.host
            ports = {name: free_port(host) for name in ("master", "master_grpc", "volume", "volume_grpc", "filer",
                                                         "filer_grpc", "s3_grpc")}
            ports["s3"] = self.config.s3_port or free_port(host)
            self.ports_file.write_text(json.dumps(ports))
        return ports

    def start(self) -> str:
        """Start the server unless it runs; return the S3 endpoint URL once S3 answers."""
        if self.state() is not None:
            self.wait_ready()
            return self.endpoint
        cfg = self.config
        binary = cfg.binary or build_weed(log=cfg.data_dir / "build.log")
        data = cfg.data_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ports = self._ports()
        for name, port in ports.items():
            if _port_open(cfg.host, port):
                raise StackError(f"port {cfg.host}:{port} ({name} of the S3 server) is already in use; stop what "
                                 f"listens there or remove {self.ports_file} to pick new ports")
        identities = cfg.data_dir / "s3-identities.json"
        roles = [{"name": f"sop-{role}", "credentials": [{"accessKey": key, "secretKey": secret}],
                  "actions": role_actions(role, cfg.role_bucket)} for role, (key, secret) in self.role_keys().items()]
        identities.write_text(json.dumps({"identities": [{
            "name": "sop", "credentials": [{"accessKey": cfg.access_key, "secretKey": cfg.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}, *roles]}))
        identities.chmod(0o600)
        cmd = [str(binary), "server", f"-dir={data}", f"-ip={cfg.host}", f"-ip.bind={cfg.host}",
               f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
               f"-master.volumeSizeLimitMB={cfg.volume_size_limit_mb}", "-master.telemetry=false",
               f"-master.electionTimeout={cfg.election_timeout_s:g}s",
               f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
               "-volume.max=0", "-volume.preStopSeconds=0",
               "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
               f"-filer.localSocket={cfg.data_dir / 'filer.sock'}",
               "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}", f"-s3.config={identities}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={cfg.data_dir / 's3.sock'}"]
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=cfg.data_dir)
        self.state_file.write_text(json.dumps({"pid": self._proc.pid, "endpoint": self.endpoint}))
        try:
            self.wait_ready()
        except StackError:
            self.stop()
            raise
        return self.endpoint

    def wait_ready(self) -> None:
        """Until the S3 gateway answers a signed ListBuckets and, when a bucket exists, takes a write into it.

        Reads answer before writes do: a restarted server lists buckets at once but stores objects only once its
        master is raft leader again and the volume server has registered (measured: 28 s with SeaweedFS's default
        election timeout), so a probe object is written and deleted."""
        deadline = time.monotonic() + self.config.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise StackError(f"the S3 server exited with code {self._proc.returncode}:\n{self._log_tail()}")
            try:
                s3 = self.client()
                buckets = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
                if buckets:
                    s3.put_object(Bucket=buckets[0], Key=READY_PROBE, Body=b"ready")
                    s3.delete_object(Bucket=buckets[0], Key=READY_PROBE)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
            time.sleep(0.5)
        raise StackError(f"the S3 server at {self.endpoint} did not answer within {self.config.start_timeout_s:.0f}s "
                         f"({last}):\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""

    def ensure_bucket(self, name: str) -> bool:
        """Create bucket ``name`` unless it exists; returns whether it was created."""
        s3 = self.client()
        try:
            s3.head_bucket(Bucket=name)
            return False
        except Exception:  # noqa: BLE001 - absent (404) or not yet visible: create it
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
                s3.create_bucket(Bucket=name)
            return True

    def role_keys(self) -> dict[str, tuple[str, str]]:
        """Role -> (access key, secret key) of the role identities, generated the first time."""
        path = self.config.data_dir / "role-keys.json"
        try:
            return {role: (k, s) for role, (k, s) in json.loads(path.read_text()).items()}
        except FileNotFoundError:
            pass
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        keys = {role: (f"sop-{role}-{secrets.token_hex(4)}", secrets.token_urlsafe(24)) for role in LAKE_ROLES}
        path.write_text(json.dumps(keys))
        path.chmod(0o600)
        return keys

    def storage_options(self, role: str | None = None) -> dict[str, str]:
        """What delta-rs (object_store) needs to use this server: endpoint, keys (the admin's, or ``role``'s), plain
        HTTP on loopback, path-style addresses and conditional puts (safe concurrent commits)."""
        cfg = self.config
        key, secret = (cfg.access_key, cfg.secret_key) if role is None else self.role_keys()[role]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": cfg.region, "AWS_ALLOW_HTTP": "true",
                "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false", "aws_conditional_put": "etag"}

    def client(self, role: str | None = None):  # noqa: ANN201 - a boto3 S3 client
        """A boto3 client with the admin's keys (or ``role``'s)."""
        import boto3
        from botocore.config import Config

        opts = self.storage_options(role)
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=opts["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=opts["AWS_SECRET_ACCESS_KEY"], region_name=self.config.region,
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                          connect_timeout=2, read_timeout=30))
    def restart(self, *, down_s: float = 0.0) -> str:
        """Stop the server, wait ``down_s``, start it again on the same ports and data (faults on purpose: clients
        see connections refused meanwhile); returns the endpoint once it takes writes again."""
        self.stop()
        time.sleep(down_s)
        return self.start()

    def stop(self, timeout_s: float = 30.0) -> bool:
        st = self.state()
        if st is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(st["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(st["pid"]) and time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=0.1)
            else:
                time.sleep(0.1)
        if _pid_alive(st["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(st["pid"], signal.SIGKILL)
            if self._proc is not None:
                self._proc.wait(timeout=10)
        self.state_file.unlink(missing_ok=True)
        return True
