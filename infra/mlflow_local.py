"""The local MLflow registry: a SQLite backend store and a local artifact root under the run directory.

Every process uses the same tracking URI (``sqlite:///<run_dir>/mlflow.db``); no server is needed
for that. ``serve_ui`` starts ``mlflow server`` on loopback for people who want the web UI.
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

from infra.kafka import StackError, _pid_alive
from infra.registry import registry_client

EXPERIMENT = "sop"


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    tracking_uri: str
    artifact_root: Path
    state_dir: Path
    ui_host: str = "127.0.0.1"
    ui_port: int = 5000


def ensure_experiment(tracking_uri: str, artifact_root: Path, name: str = EXPERIMENT) -> str:
    """Create the store (migrations run on first use) and the experiment with a local artifact root.

    Without an explicit artifact location MLflow would write artifacts to ``./mlruns`` of whatever
    directory a process happens to run in; pinning it keeps every process on the same root.
    """

    client = registry_client(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_root.mkdir(parents=True, exist_ok=True)
    try:
        return client.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
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
        log = open(cfg.state_dir / "mlflow-ui.log", "ab")  # noqa: SIM115 - the server owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking_uri,
             "--default-artifact-root", cfg.artifact_root.resolve().as_uri(), "--host", cfg.ui_host,
             "--port", str(cfg.ui_port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.state_file.write_text(json.dumps({"pid": proc.pid, "url": url}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(f"MLflow UI exited with code {proc.returncode}: see {cfg.state_dir / 'mlflow-ui.log'}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                return url
            time.sleep(0.5)
        self.stop_ui()
        raise StackError(f"MLflow UI did not answer on {url} within {timeout_s:.0f}s (port taken? set SOP_MLFLOW_UI_PORT)")

    def stop_ui(self) -> bool:
        st = self.ui_state()
        if st is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(st["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _pid_alive(st["pid"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(st["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(st["pid"], signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True
