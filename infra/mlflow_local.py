"""The MLflow registry of the two local profiles.

Embedded: a SQLite backend store and a local artifact root under the run directory. Every process uses the same
tracking URI (``sqlite:///<run_dir>/mlflow.db``); no server is needed for that. ``serve_ui`` starts
``mlflow server`` on loopback for people who want the web UI.

Cluster (:class:`MlflowServer`): ``mlflow server`` with a PostgreSQL backend store and artifacts proxied to an
object store (``--serve-artifacts --artifacts-destination s3://…``); every other process talks to it over HTTP
only and never sees the database or the bucket.

With registry roles (``MlflowServerConfig.auth``, ``SOP_SECURITY=true``) the server runs MLflow's basic-auth app
(``--app-name basic-auth``, :mod:`infra.registry_auth`); the embedded profile then also runs an
:class:`MlflowServer`, on its SQLite store and local artifact root, since a database file every process opens
cannot tell a robot from the learner.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.kafka import StackError, _pid_alive, free_port
from infra.registry import registry_client
from infra.registry_auth import RegistryAuth

EXPERIMENT = "sop"


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    tracking_uri: str
    artifact_root: Path
    state_dir: Path
    ui_host: str = "127.0.0.1"
    ui_port: int = 5000


def ensure_experiment(tracking_uri: str, artifact_root: Path | None, name: str = EXPERIMENT) -> str:
    """Create the store (migrations run on first use) and the experiment with a local artifact root.

    Without an explicit artifact location MLflow would write artifacts to ``./mlruns`` of whatever
    directory a process happens to run in; pinning it keeps every process on the same root.
    ``artifact_root=None``: a tracking server's own default (its proxied artifact store).
    """

    client = registry_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        location = artifact_root.resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it in between
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class LocalMlflow:
    def __init__(self, config: MlflowConfig) -> None:
        self.config = config
        self.state_file = config.state_dir / "mlflow-ui.json"

    def init(self) -> str:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        return ensure_experiment(self.config.tracking_uri, self.config.artifact_root)

    def ui_state(self) -> dict | None:
        try:
            st = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return st if _pid_alive(st.get("pid", -1)) else None

    def serve_ui(self, timeout_s: float = 60.0) -> str:
        if (st := self.ui_state()) is not None:
            return st["url"]
        cfg = self.config
        url = f"http://{cfg.ui_host}:{cfg.ui_port}"
        _serve([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking_uri,
                "--default-artifact-root", cfg.artifact_root.resolve().as_uri(), "--host", cfg.ui_host,
                "--port", str(cfg.ui_port), "--workers", "1"],
               url=url, state_file=self.state_file, log_file=cfg.state_dir / "mlflow-ui.log", timeout_s=timeout_s,
               hint="port taken? set SOP_MLFLOW_UI_PORT")
        return url

    def stop_ui(self) -> bool:
        return _stop_served(self.state_file)


@dataclass(frozen=True, kw_only=True)
class MlflowServerConfig:
    state_dir: Path
    backend_store_uri: str  # postgresql://user:password@host:port/db
    artifacts_destination: str  # s3://bucket/prefix
    artifact_env: dict[str, str]  # MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, …
    auth: RegistryAuth | None = None  # None: no authentication (anyone who reaches the port may do anything)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (kept for later starts)
    workers: int = 1
    start_timeout_s: float = 180.0


class MlflowServer:
    """``mlflow server`` backed by a database and a proxied artifact store; state in ``state_dir/mlflow-server.json``."""

    def __init__(self, config: MlflowServerConfig) -> None:
        self.config = config
        self.state_file = config.state_dir / "mlflow-server.json"
        self.port_file = config.state_dir / "port.json"
        self.log_file = config.state_dir / "mlflow-server.log"

    @property
    def url(self) -> str:
        try:
            port = json.loads(self.port_file.read_text())["port"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            self.config.state_dir.mkdir(parents=True, exist_ok=True)
            port = self.config.port or free_port(self.config.host)
            self.port_file.write_text(json.dumps({"port": port}))
        return f"http://{self.config.host}:{port}"

    def state(self) -> dict | None:
        try:
            st = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return st if _pid_alive(st.get("pid", -1)) else None

    def start(self) -> str:
        """Start the server unless it runs (the first start migrates the database); return its URL once it answers."""
        cfg, url = self.config, self.url
        if self.state() is None:
            if not cfg.backend_store_uri:
                raise StackError("MlflowServerConfig.backend_store_uri is empty: give the database to start on")
            port = url.rsplit(":", 1)[1]
            auth = ["--app-name", "basic-auth"] if cfg.auth is not None else []
            # --workers 1: one server process is plenty for a fleet's registry traffic and keeps memory small
            _serve([sys.executable, "-m", "mlflow", "server", *auth, "--backend-store-uri", cfg.backend_store_uri,
                    "--serve-artifacts", "--artifacts-destination", cfg.artifacts_destination,
                    "--host", cfg.host, "--port", port, "--workers", str(cfg.workers)],
                   url=url, state_file=self.state_file, log_file=self.log_file, timeout_s=cfg.start_timeout_s,
                   # no job runner: its four huey consumers (~1 GB together) serve GenAI jobs SOP never runs
                   env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **cfg.artifact_env,
                        **(cfg.auth.server_env() if cfg.auth is not None else {})},
                   hint=f"see {self.log_file}")
        else:
            _wait_healthy(url, None, cfg.start_timeout_s, self.log_file, "")
        return url

    def stop(self) -> bool:
        return _stop_served(self.state_file)

    def kill(self) -> bool:
        """SIGKILL the server's process group (a crash on purpose: requests in flight get no answer); returns
        whether one was running. :meth:`start` then starts it again on the same port."""
        return _stop_served(self.state_file, crash=True)

    def restart(self, *, down_s: float = 0.0, kill: bool = False) -> str:
        """Stop (SIGTERM, or SIGKILL with ``kill``), wait ``down_s``, start again on the same port, database and
        artifact store; returns the URL once ``/health`` answers."""
        if kill:
            self.kill()
        else:
            self.stop()
        time.sleep(down_s)
        return self.start()


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, log_file: Path, hint: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            raise StackError(f"MLflow server exited with code {proc.returncode}:\n{tail}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            return
        time.sleep(0.5)
    raise StackError(f"MLflow server did not answer on {url} within {timeout_s:.0f}s ({hint})")


def _serve(cmd: list[str], *, url: str, state_file: Path, log_file: Path, timeout_s: float, hint: str,
           env: dict[str, str] | None = None) -> None:
    """Start ``mlflow server`` in its own session, record its pid, wait for /health (stop it on failure)."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_file, "ab")  # noqa: SIM115 - the server owns it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    log.close()
    state_file.write_text(json.dumps({"pid": proc.pid, "url": url}))
    try:
        _wait_healthy(url, proc, timeout_s, log_file, hint)
    except StackError:
        _stop_served(state_file)
        raise


def _stop_served(state_file: Path, *, crash: bool = False) -> bool:
    """Stop the process group named in ``state_file``: SIGTERM, then SIGKILL after 15 s, and forget it; or, with
    ``crash``, SIGKILL at once and keep the state file (its port) for the next start. Whether one was running."""
    try:
        st = json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if not _pid_alive(st.get("pid", -1)):
        if not crash:
            state_file.unlink(missing_ok=True)
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(st["pid"], signal.SIGKILL if crash else signal.SIGTERM)
    deadline = time.monotonic() + (10 if crash else 15)
    while _pid_alive(st["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05 if crash else 0.1)
    if crash:
        return True
    if _pid_alive(st["pid"]):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(st["pid"], signal.SIGKILL)
    state_file.unlink(missing_ok=True)
    return True
