"""The closed loop on one machine (`sop run`): stack, demonstrations, base policy, processor, learner, fleet.

    up → demos (if missing) → [RECAP: value model (if none registered)] → pretrain (if no champion)
       → process + learn + N actors → live view
       → stop at the duration / target success / Ctrl-C → drain → report (Markdown + PNG, also in MLflow)

RECAP as the paper runs it: the distributional value model is trained before the loop on the demonstrations and
any closed online episodes (`sop train-value`), the base policy is pretrained conditioned on its advantages
(`sop pretrain --algorithm recap`), and the processor is pinned to that value version (frozen while the loop runs).

With ``promotion="gated"`` a canary share of the actors follows the ``candidate`` alias (the champion while
there is none) and the learner's gate promotes or rejects each candidate on their live episodes
(``learner.promotion``); with ``eval_every_s`` the champion is evaluated on held-out seeds with the operator
off every so often (``sop.checkpoints``), and a target success is then judged on those checkpoints.

Each part runs as its own `sop` child process, exactly as it would on its own machine against a shared
Kafka / Delta / MLflow; this module only starts, watches and stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.live import Live

from lakehouse import Lakehouse, query
from sop import stack
from sop.checkpoints import HeldOutCheckpoints
from sop.live import LiveFeed, episodes_since, gather, kafka_lag, render
from sop.metrics import plan_ports
from sop.processes import SopProcess
from sop.progress import PerKeyBars, mirror_until_done, progress_bars
from sop.report import write_report
from sop.settings import Settings, site_environment


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    actors: int = 2
    duration_s: float = 30 * 60
    # stop early when every task reaches it: held-out success when checkpoints are measured, else recent
    # autonomous success (no human step) over ``target_window`` episodes per task
    target_success: float | None = None
    target_window: int = 20
    algorithm: str = "hg-dagger"
    promotion: str = "auto"  # auto: every version becomes champion; gated: canaries play candidates first
    canary_share: float = 0.25  # gated: the share of actors that follow the candidate (at least one)
    eval_every_s: float | None = None  # held-out checkpoints (operator off) every so often; None: none
    eval_episodes: int = 10  # held-out episodes per task of one checkpoint
    tasks: tuple[str, ...] | None = None  # None = the actors' default suite
    hz: float = 30.0
    operator: bool = True
    demos_per_task: int | None = None  # None: the calibrated per-task counts of sim.demos_io
    demo_noise: float = 0.2
    sampler: str = "paper"
    learn_args: tuple[str, ...] = ()
    actor_args: tuple[str, ...] = ()
    learn_online: bool = True  # False: collect only (offline-iterations baseline: train after collection)
    processors: int = 1  # stream processor workers in one consumer group (they split the partitions)
    keep_stack: bool = False
    report_dir: Path | None = None
    refresh_s: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.actors < 1:
            problems.append(f"actors must be >= 1, got {self.actors}")
        if self.processors < 1:
            problems.append(f"processors must be >= 1, got {self.processors}")
        if self.duration_s <= 0:
            problems.append(f"duration must be > 0, got {self.duration_s}")
        if self.target_success is not None and not 0 < self.target_success <= 1:
            problems.append(f"target success must be in (0, 1], got {self.target_success}")
        if self.algorithm not in ("hg-dagger", "recap"):
            problems.append(f"algorithm must be hg-dagger or recap, got {self.algorithm!r}")
        if self.promotion not in ("auto", "gated"):
            problems.append(f"promotion must be auto or gated, got {self.promotion!r}")
        if not 0 < self.canary_share < 1:
            problems.append(f"canary share must be in (0, 1), got {self.canary_share}")
        if self.promotion == "gated" and self.actors < 2:
            problems.append("gated promotion needs at least 2 actors: a canary on the candidate and one on the "
                            "champion to compare it with")
        if self.promotion == "gated" and not self.learn_online:
            problems.append("gated promotion needs the learner (--learn)")
        if self.eval_every_s is not None and not self.eval_every_s > 0:
            problems.append(f"eval every must be > 0 minutes, got {self.eval_every_s / 60}")
        if self.eval_episodes < 1:
            problems.append(f"eval episodes must be >= 1, got {self.eval_episodes}")
        if problems:
            raise ValueError("; ".join(problems))


def canary_count(actors: int, share: float, promotion: str) -> int:
    """Actors that follow the candidate: the share of the fleet, rounded, at least one and never all."""
    if promotion != "gated":
        return 0
    return min(actors - 1, max(1, round(share * actors)))


def target_reached(per_task: list[dict], held_out: dict | None, *, target: float, window: int,
                   measuring_held_out: bool) -> str | None:
    """Why the run may stop at its target success, or None. With held-out checkpoints measured, every task of the
    latest must reach ``target``; without, every task's autonomous success over its last ``window`` episodes."""
    if measuring_held_out:
        if held_out and held_out["per_task"] and all(r >= target for r in held_out["per_task"].values()):
            return (f"held-out success (operator off) of v{held_out['version']} reached {target} on every task "
                    f"({held_out['episodes_per_task']} episodes per task)")
        return None
    if per_task and all(r["episodes"] >= window and (r.get("autonomous_recent") or 0) >= target for r in per_task):
        return f"every task reached recent autonomous success {target} (last {window} episodes, no human step)"
    return None


def _champion(settings: Settings) -> str | None:
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client

    client = registry_client(settings.tracking_uri)
    try:
        return client.get_model_version_by_alias(settings.policy_model_name, settings.policy_alias).version
    except MlflowException:
        return None


def _champion_algorithm(settings: Settings) -> str | None:
    """The algorithm the champion was trained with (its lineage), if it says."""
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client

    try:
        version = registry_client(settings.tracking_uri).get_model_version_by_alias(settings.policy_model_name,
                                                                                   settings.policy_alias)
    except MlflowException:
        return None
    return version.tags.get("lineage.algorithm")


def _demo_rows(settings: Settings) -> int:
    lake = Lakehouse(settings.lake_root, storage_options=settings.lake_storage_options or None)
    if not lake.exists("demonstrations"):
        return 0
    return int(query(lake, "SELECT count(*) FROM demonstrations").column(0)[0].as_py())


def stop_together(children: list[SopProcess], *, timeout_s: float) -> None:
    """SIGTERM to all at once, then SIGKILL to those still running after ``timeout_s`` (for all, not each)."""
    for child in children:
        if child.running:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout_s
    for child in children:
        child.stop(timeout_s=max(0.1, deadline - time.time()))


class ClosedLoop:
    def __init__(self, settings: Settings, config: LoopConfig, *, console: Console | None = None) -> None:
        self.settings, self.config = settings, config
        self.console = console or Console()
        self.logs = settings.run_path / "logs"
        self.children: dict[str, SopProcess] = {}
        self.started_at = time.time()
        self.stop_reason = ""
        self.site_env: dict[str, str] = {}  # under the cluster profile: every endpoint, explicitly, for the children
        self.value_version: str | None = None  # RECAP: the frozen sop-value version the processor is pinned to
        self.checkpoints: HeldOutCheckpoints | None = None

    # -- steps -----------------------------------------------------------------------------------
    def _child(self, name: str, args: list[str], *, settings: dict | None = None,
               principal: str | None = None) -> SopProcess:
        """``sop <args>`` as a child in its own session: with its Kafka principal (Kafka security on), its registry
        user (SOP_SECURITY), its object-store keys (cluster profile); ``config.extra_env`` last."""
        env = {"SOP_RUN_DIR": str(self.settings.run_path), **self.site_env, **self._kafka_principal(principal),
               **self._registry_role(name), **self._lake_role(name), **self.config.extra_env}
        return SopProcess(args, env=env, settings=settings, log=self.logs / f"{name}.log", own_session=True)

    def _kafka_principal(self, principal: str | None) -> dict[str, str]:
        """With Kafka security on: each part authenticates as its own principal (docs/security.md); a child that
        names none (learner, pretraining, demos) gets the read-only ``sop-tools``."""
        if not self.settings.kafka_secure:
            return {}
        return {"SOP_KAFKA_SECURITY": self.settings.kafka_security, "SOP_KAFKA_PRINCIPAL": principal or "sop-tools"}

    def _lake_role(self, name: str) -> dict[str, str]:
        """Under the cluster profile: the processor gets the object store's write keys, the learner read-only ones,
        the robots none (they never touch the lake)."""
        if self.settings.profile != "cluster":
            return {}
        if name.startswith("actor"):
            return {"SOP_LAKE_STORAGE_OPTIONS": "{}"}
        role = "processor" if name.startswith("processor") else "learner" if name.startswith(
            ("learner", "pretrain", "train-value")) else None
        options = stack.lake_role_options(self.settings, role) if role else None
        return {"SOP_LAKE_STORAGE_OPTIONS": json.dumps(options)} if options else {}

    def _registry_role(self, name: str) -> dict[str, str]:
        """With security: each child runs as its role's registry user (none for children that need no registry), with
        SOP_SECURITY set whichever way this process got it (its registry is then the server, not the SQLite file)."""
        if not self.settings.security:
            return {}
        role = next((r for prefix, r in (("processor", "processor"), ("learner", "learner"), ("pretrain", "learner"),
                                         ("train-value", "learner"), ("actor", "actor"), ("eval", "actor"))
                     if name.startswith(prefix)), None)
        creds = stack.role_env(self.settings, role) if role else {"MLFLOW_TRACKING_USERNAME": "",
                                                                  "MLFLOW_TRACKING_PASSWORD": ""}
        return {"SOP_SECURITY": "true", **creds}

    def _run_to_end(self, name: str, args: list[str]) -> None:
        """Run ``sop <args>`` to its end, drawing the bars it writes to its progress file (``--progress-file``)."""
        progress = self.settings.run_path / "progress" / f"{name}.json"
        progress.unlink(missing_ok=True)
        child = self._child(name, [*args, "--progress-file", str(progress)]).start()
        self.console.print(f"[green]{name}[/] `sop {' '.join(args)}` (log: {child.log})")
        try:
            mirror_until_done(lambda: child.running, progress, self.console)
        except BaseException:  # Ctrl-C: the child is in its own session and did not see it
            child.stop(timeout_s=30)
            raise
        if child.proc.returncode != 0:
            raise RuntimeError(f"`sop {' '.join(args)}` failed with {child.proc.returncode}:\n{child.tail()}")

    def prepare(self) -> None:
        with self.console.status(f"starting the {self.settings.profile} stack…"):
            info = stack.up(self.settings)
        if info.settings is not None:
            self.settings = info.settings  # under the cluster profile: with the endpoints it started
        if self.settings.security:  # this process set the stack up: it reads and reports as the admin
            for key, value in stack.role_env(self.settings, "admin").items():
                os.environ.setdefault(key, value)
        if self.settings.profile == "cluster":
            # The processor, learner and actors run as on machines of a real site: the embedded profile with every
            # endpoint set explicitly (Kafka, registry over HTTP, the lake in the bucket), nothing read from here.
            self.site_env = {**site_environment(self.settings), "SOP_PROFILE": "embedded"}
            for part, where in info.parts.items():
                self.console.print(f"[green]{part}[/] {where}")
        else:
            self.console.print(f"[green]stack[/] kafka {info.bootstrap} · mlflow {info.tracking_uri}")
        if self.settings.kafka_secure:
            from sop.commands.robot import add_robot

            with self.console.status(f"adding {self.config.actors} robot principals…"):
                for aid in self.actor_ids:
                    add_robot(self.settings, aid)
            self.console.print(f"[green]security[/] SASL/SCRAM over TLS, ACLs; robots {', '.join(self.actor_ids)}")
        tasks = ["--tasks", ",".join(self.config.tasks)] if self.config.tasks else []
        if _demo_rows(self.settings) == 0 and self.config.demos_per_task is not None:
            self._run_to_end("demos", ["demos", "--episodes-per-task", str(self.config.demos_per_task),
                                       "--noise", str(self.config.demo_noise), *tasks])
        elif _demo_rows(self.settings) == 0:
            # the counts per task that give a deliberately imperfect base policy (see sim.demos_io)
            from sim.demos import demo_task
            from sim.demos_io import BASE_DEMOS_PER_TASK, make_demonstrations

            lake = Lakehouse(self.settings.lake_root, storage_options=self.settings.lake_storage_options or None)
            counts = {t: BASE_DEMOS_PER_TASK.get(t, 10) for t in (self.config.tasks or BASE_DEMOS_PER_TASK)}
            self.console.print("[green]demos[/] scripted-expert demonstrations, per task:")
            with progress_bars(self.console) as bars:
                per_task = PerKeyBars(counts, bars=bars, label="demos ")
                make_demonstrations(lake, episodes_per_task=counts, noise_sigma=self.config.demo_noise,
                                    on_episode=lambda episode_id, written: per_task.advance(demo_task(episode_id),
                                                                                            written=written))
                per_task.finish()
        self.console.print(f"[green]demonstrations[/] {_demo_rows(self.settings):,} steps")
        if self.config.algorithm == "recap":
            self.value_version = self._value_model()
        if _champion(self.settings) is None:
            self._run_to_end("pretrain", ["pretrain", "--algorithm", self.config.algorithm, "--no-eval"])
        elif self.config.algorithm == "recap" and _champion_algorithm(self.settings) not in (None, "recap"):
            self.console.print(f"[yellow]the champion was trained with {_champion_algorithm(self.settings)}, not "
                               "RECAP: this run continues from it (a fresh SOP_RUN_DIR gives a RECAP-pretrained base)[/]")
        self.console.print(f"[green]base policy[/] {self.settings.policy_model_name}@{self.settings.policy_alias}"
                           f" = v{_champion(self.settings)}")

    def _value_model(self) -> str:
        """RECAP's value model: the registered one (pinned by SOP_VALUE_MODEL_VERSION, else the champion, else the
        newest), or one trained now on the demonstrations and the closed online episodes there are."""
        from sop.learner_settings import value_version

        found = value_version(self.settings)
        if found is None:
            self._run_to_end("train-value", ["train-value"])
            found = value_version(self.settings)
            if found is None:
                raise RuntimeError("`sop train-value` ended without registering a value model")
        self.console.print(f"[green]value model[/] {self.settings.value_model_name} v{found} (frozen: the processor "
                           "computes every advantage with this version)")
        return found

    def start(self) -> None:
        from sop.actor_settings import load_actor_settings
        from sop.learner_settings import load_learner_settings

        cfg = self.config
        self.started_at = time.time()
        # Prometheus endpoints: a fixed port N gives the i-th processor / actor N + i (0 = any free port, off)
        ports = plan_ports({"processor": (self.settings.processor_metrics_port, len(self.processor_names)),
                            "learner": (load_learner_settings().learn_metrics_port, 1),
                            "actor": (load_actor_settings().actor_metrics_port, cfg.actors)})
        pin = {"value_model_version": self.value_version} if self.value_version is not None else {}
        for name, port in zip(self.processor_names, ports["processor"], strict=True):
            self.children[name] = self._child(name, ["process"], settings={"processor_metrics_port": port, **pin},
                                              principal="sop-processor").start()
        if cfg.learn_online:
            self.children["learner"] = self._child("learner", [
                "learn", "--algorithm", cfg.algorithm, "--sampler", cfg.sampler, "--promotion", cfg.promotion,
                "--quiet", *cfg.learn_args]).start()
        tasks = ["--tasks", ",".join(cfg.tasks)] if cfg.tasks else []
        canaries = set(self.canary_ids)
        candidate = load_learner_settings().candidate_alias
        for i, aid in enumerate(self.actor_ids):
            follow = {"actor_alias": candidate, "actor_fallback_alias": self.settings.policy_alias} \
                if aid in canaries else {}
            self.children[aid] = self._child(aid, [
                "actor", "--actor-id", aid, "--hz", str(cfg.hz), "--seed-start", str(10_000 + i),
                "--seed-stride", str(cfg.actors), "--operator" if cfg.operator else "--no-operator",
                "--no-status", "--status-file", str(self.settings.run_path / "actors" / f"{aid}.json"),
                *tasks, *cfg.actor_args], settings={"actor_metrics_port": ports["actor"][i], **follow},
                principal=aid).start()
        if cfg.eval_every_s is not None:
            self.checkpoints = HeldOutCheckpoints(self._child, every_s=cfg.eval_every_s, episodes=cfg.eval_episodes,
                                                  tasks=cfg.tasks, out_dir=self.settings.run_path / "checkpoints",
                                                  run_started_s=self.started_at)

    @property
    def actor_ids(self) -> list[str]:
        return [f"actor-{i:02d}" for i in range(self.config.actors)]

    @property
    def canary_ids(self) -> list[str]:
        """The actors that follow the candidate (the last ones)."""
        n = canary_count(self.config.actors, self.config.canary_share, self.config.promotion)
        return self.actor_ids[len(self.actor_ids) - n:] if n else []

    @property
    def processor_names(self) -> list[str]:
        n = self.config.processors
        return ["processor"] if n == 1 else [f"processor-{i}" for i in range(n)]

    def done(self, state) -> bool:  # noqa: ANN001 - LiveState
        cfg = self.config
        if time.time() - self.started_at >= cfg.duration_s:
            self.stop_reason = f"duration of {cfg.duration_s / 60:.1f} min reached"
            return True
        if cfg.target_success is not None and (why := target_reached(
                state.per_task, self.checkpoints.latest if self.checkpoints else None, target=cfg.target_success,
                window=cfg.target_window, measuring_held_out=self.checkpoints is not None)):
            self.stop_reason = why
            return True
        for name, child in self.children.items():
            if not child.running and (name == "learner" or name in self.processor_names):
                self.stop_reason = f"{name} exited ({child.proc.returncode}); see {child.log}"
                return True
        return False

    def watch(self) -> None:
        """Until a stop condition. Ctrl-C and SIGTERM only set a flag that the loop checks every second: an
        exception raised wherever the signal lands (inside the live view's lock, say) could stop the loop
        half-way and leave the shutdown stuck."""
        learner_status = self.settings.run_path / "learner" / "status.json"
        signals: list[int] = []
        previous = {sig: signal.signal(sig, lambda signum, _frame: signals.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        checkpoints = self.checkpoints
        feed = LiveFeed(lambda: gather(self.settings, started_at_s=self.started_at, learner_status=learner_status,
                                       window=self.config.target_window,
                                       held_out=(lambda: checkpoints.latest) if checkpoints else None),
                        every_s=self.config.refresh_s).start()
        try:
            with Live(console=self.console, refresh_per_second=1, transient=False) as live:
                while not signals:
                    if checkpoints is not None:
                        checkpoints.tick()
                    state = feed.latest(elapsed_s=time.time() - self.started_at)
                    if checkpoints is not None:
                        state.held_out = checkpoints.latest
                        state.notes += checkpoints.failures[-1:]
                    live.update(render(state, title=f"SOP — {self.config.algorithm}, {self.config.actors} actors"))
                    if self.done(state):
                        break
                    time.sleep(min(1.0, self.config.refresh_s))
            if signals:
                self.stop_reason = "stopped by Ctrl-C" if signals[0] == signal.SIGINT else "stopped by SIGTERM"
        finally:
            feed.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Actors first (their open episode ends ABORTED, publishers flush), then let the processor drain."""
        if self.checkpoints is not None:
            with self.console.status("held-out checkpoint: letting the running evaluation finish…"):
                self.checkpoints.wait(timeout_s=120)
        with self.console.status("stopping actors…"):
            stop_together([child for name, child in self.children.items() if name.startswith("actor-")],
                          timeout_s=60)
        with self.console.status("processor: draining what the actors published…"):
            deadline = time.time() + 90
            while time.time() < deadline and any(self.children[n].running for n in self.processor_names):
                lag = kafka_lag(self.settings, self.settings.processor_group)
                if lag == 0:
                    time.sleep(2 * self.settings.processor_flush_interval_s + 1)
                    break
                time.sleep(1)
        if "learner" in self.children:
            with self.console.status("stopping learner…"):
                self.children["learner"].stop(timeout_s=60)
        with self.console.status("stopping the processor…"):
            stop_together([self.children[n] for n in self.processor_names if n in self.children], timeout_s=60)

    def report(self) -> dict:
        lake = Lakehouse(self.settings.lake_root, storage_options=self.settings.lake_storage_options or None)
        episodes = episodes_since(lake, self.started_at, columns=None)
        stamp = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y%m%d-%H%M%S")
        out = self.config.report_dir or self.settings.run_path / "reports" / stamp
        if episodes is None or episodes.num_rows == 0:
            self.console.print("[yellow]no episodes were closed during the run: no report[/]")
            return {}
        extra: dict = {"stop_reason": self.stop_reason, "config": {
            "actors": self.config.actors, "algorithm": self.config.algorithm, "duration_s": self.config.duration_s,
            "hz": self.config.hz, "sampler": self.config.sampler, "promotion": self.config.promotion,
            "canaries": self.canary_ids}}
        if self.checkpoints is not None and self.checkpoints.results:
            last = self.checkpoints.latest
            assert last is not None
            extra["held_out_checkpoints"] = self.checkpoints.results
            extra["held_out"] = {"success": last["mean"], "note": f"v{last['version']} at minute {last['t_min']:.1f}, "
                                 f"{last['episodes_per_task']} episodes per task, `sop eval`"}
        summary = write_report(episodes, out, started_at_s=self.started_at,
                               title=f"SOP run {stamp} — {self.config.algorithm}, {self.config.actors} actors",
                               window=self.config.target_window, extra=extra)
        self._log_to_mlflow(out, summary, stamp)
        self.console.print(f"[green]report[/] {out / 'report.md'}")
        return summary

    def _log_to_mlflow(self, out: Path, summary: dict, stamp: str) -> None:
        from infra.mlflow_local import ensure_experiment
        from infra.registry import registry_client

        client = registry_client(self.settings.tracking_uri)
        # an explicit tracking server keeps artifacts where it says (the cluster's proxied bucket)
        exp = ensure_experiment(self.settings.tracking_uri,
                                None if self.settings.mlflow_tracking_uri else self.settings.artifact_root)
        run = client.create_run(exp, run_name=f"sop-run-{stamp}", tags={"sop.kind": "closed-loop"})
        for key in ("episodes", "episodes_per_hour", "success_last_window_mean", "final_rolling_success",
                    "time_to_0.8_min", "autonomous_success_last_window_mean", "final_rolling_autonomous_success",
                    "time_to_0.8_autonomous_min"):
            if isinstance(summary.get(key), int | float):
                client.log_metric(run.info.run_id, key.replace(".", "_"), float(summary[key]))
        for task, t in summary["tasks"].items():
            if t["success_last_window"] is not None:
                client.log_metric(run.info.run_id, f"success_{task}", float(t["success_last_window"]))
        client.log_artifacts(run.info.run_id, str(out), artifact_path="report")
        client.set_terminated(run.info.run_id)

    def run(self) -> dict:
        try:
            self.prepare()
            self.start()
            self.watch()
        finally:
            if self.children:
                try:
                    self.shutdown()
                except KeyboardInterrupt:  # a second Ctrl-C: no drain, every part is stopped now
                    self.console.print("[red]second Ctrl-C: stopping every part without draining[/]")
                    stop_together(list(self.children.values()), timeout_s=10)
                    raise
        summary = self.report()
        if not self.config.keep_stack:
            stack.down(self.settings)
        with contextlib.suppress(Exception):
            (self.settings.run_path / "last-run.json").write_text(json.dumps(
                {"started_at": self.started_at, "stop_reason": self.stop_reason, "summary": summary}, default=str))
        return summary
