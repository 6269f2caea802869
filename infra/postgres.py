"""A PostgreSQL server on loopback for MLflow's backend store (the cluster profile), from Debian's ``postgresql``.

    pg = LocalPostgres(PostgresConfig(data_dir=run_dir / "postgres"))
    uri = pg.start()        # initdb the first time, start, create the database; "postgresql://sop:…@127.0.0.1:…/mlflow"
    pg.stop()

The data directory is an ordinary folder under the run directory. PostgreSQL refuses to run as root; as root the
server runs inside a user namespace (``unshare --user``) where it is an unprivileged user that owns the files,
so it reaches a data directory under a root-only folder (pytest's, ``~/.sop``) without loosening permissions.
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

UNPRIVILEGED_UID = 1000  # whom the server is inside its user namespace when started by root


def postgres_bin_dir() -> Path:
    """Where Debian keeps the server binaries (``/usr/lib/postgresql/<major>/bin``), newest major first."""
    if (pg_config := shutil.which("pg_config")) is not None:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            found = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip())
            if (found / "postgres").exists():
                return found
    majors = sorted((p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "postgres").exists()),
                    key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    if not majors:
        raise StackError("PostgreSQL is not installed (the cluster profile's registry store): run `make setup` "
                         "or `apt-get install postgresql`")
    return majors[0]


def _unprivileged(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("unshare") is None:
        raise StackError("PostgreSQL cannot run as root and `unshare` (util-linux) is missing to run it unprivileged")
    return ["unshare", "--user", f"--map-user={UNPRIVILEGED_UID}", f"--map-group={UNPRIVILEGED_UID}", *cmd]


@dataclass(frozen=True, kw_only=True)
class PostgresConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (kept for later starts)
    user: str = "sop"
    database: str = "mlflow"
    shared_buffers_mb: int = 32
    max_connections: int = 60
    start_timeout_s: float = 60.0


class LocalPostgres:
    """One postmaster; pid, port and password live in ``data_dir/postgres.json`` (mode 0600)."""

    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        self.pgdata = config.data_dir / "pgdata"
        self.meta_file = config.data_dir / "postgres.json"
        self.log_file = config.data_dir / "postgres.log"
        self._proc: subprocess.Popen | None = None

    def _meta(self) -> dict:
        try:
            return json.loads(self.meta_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            meta = {"port": self.config.port or free_port(self.config.host), "password": secrets.token_urlsafe(18)}
            self.meta_file.write_text(json.dumps(meta))
            self.meta_file.chmod(0o600)
            return meta

    @property
    def uri(self) -> str:
        """The SQLAlchemy URL (psycopg 3, SQLAlchemy 2.1's default PostgreSQL driver)."""
        meta, cfg = self._meta(), self.config
        return f"postgresql+psycopg://{cfg.user}:{meta['password']}@{cfg.host}:{meta['port']}/{cfg.database}"

    def pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    def start(self) -> str:
        """initdb (once), start the server unless it runs, create the database; return its URI."""
        cfg, meta = self.config, self._meta()
        if self.pid() is None:
            bindir = postgres_bin_dir()
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb(bindir, meta["password"])
            if _port_open(cfg.host, meta["port"]):
                raise StackError(f"port {cfg.host}:{meta['port']} (PostgreSQL) is already in use; stop what listens "
                                 f"there or remove {self.meta_file} to pick a new port")
            cmd = _unprivileged([str(bindir / "postgres"), "-D", str(self.pgdata), "-h", cfg.host,
                                 "-p", str(meta["port"]), "-c", "unix_socket_directories=",
                                 "-c", f"shared_buffers={cfg.shared_buffers_mb}MB",
                                 "-c", f"max_connections={cfg.max_connections}", "-c", "fsync=on"])
            with open(self.log_file, "ab") as log:
                self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()
        self._ensure_database()
        return self.uri

    def _initdb(self, bindir: Path, password: str) -> None:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self.pgdata.chmod(0o700)
        pwfile = self.config.data_dir / ".pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        try:
            done = subprocess.run(_unprivileged([
                str(bindir / "initdb"), "-D", str(self.pgdata), "-U", self.config.user, f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8", "--no-instructions"]),
                capture_output=True, text=True)
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise StackError(f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def _connect(self, database: str = "postgres"):  # noqa: ANN202 - a psycopg connection
        import psycopg

        meta, cfg = self._meta(), self.config
        return psycopg.connect(host=cfg.host, port=meta["port"], user=cfg.user, password=meta["password"],
                               dbname=database, connect_timeout=3, autocommit=True)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:] if self.log_file.exists() else ""
                raise StackError(f"PostgreSQL exited with code {self._proc.returncode} while starting:\n{tail}")
            try:
                self._connect().close()
                return
            except Exception as exc:  # noqa: BLE001 - starting up
                last = exc
            time.sleep(0.25)
        raise StackError(f"PostgreSQL did not accept connections within {self.config.start_timeout_s:.0f}s ({last})")

    def _ensure_database(self) -> None:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.config.database,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{self.config.database}"')
        finally:
            conn.close()

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Fast shutdown (SIGINT: sessions end, a checkpoint is written). Returns whether it was running."""
        pid = self.pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
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
        return True
