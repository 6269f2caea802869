"""The online learner: runs until stopped, learning from Delta and publishing policy versions to MLflow.

``run_learning`` wires the parts together:

1. resume from the newest loadable ``sop-policy`` version (weights + ``learner_step`` from its lineage), or
   start a fresh policy when none is registered;
2. ``DeltaFeeder`` fills the ``AdaptiveSampler`` (offline demonstrations, online closed episodes) from a
   background thread; a ``Prefetcher`` builds batches ahead so the trainer never waits on data;
3. ``Learner.step()`` in a loop; every ``publish_every`` steps an ``AsyncPublisher`` registers a version with
   its metrics and lineage (Delta versions read, algorithm, learner step, omega_on per task, losses, parent
   version) and then either moves ``champion`` (``promotion="auto"``) or offers it to the ``PromotionGate``
   (``"gated"``), all off the training thread;
4. metrics go to an MLflow run (``learn-<algorithm>``) every ``log_every`` steps (from the publishing thread; one
   left waiting on the registry makes the next ones be skipped and counted), and a small JSON status
   (step, loss, omega_on per task, last version, samples/s ...) is rewritten every ``status_every_s`` for the
   live view;
5. it stops on ``stop`` (Ctrl-C / SIGTERM in the command), a step budget or a duration, and registers the last
   steps before leaving.

Under ``torchrun`` (``learner.ddp``) every rank runs this function; only rank 0 registers, logs and writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from deltalake.exceptions import DeltaError
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from infra.registry import experiment_id, registry_client, version_complete, versions_tagged
from lakehouse import Lakehouse, LakehouseError, is_transient_storage_error, storage_backoff
from learner import registry, trainer_state
from learner.algorithms import Recap, make_algorithm
from learner.batch import BatchBuilder
from learner.config import ConfigError, ModelConfig, RecapConfig, SamplerConfig, TrainConfig, to_dict
from learner.ddp import DDPPolicy, DistInfo, any_rank, barrier, broadcast
from learner.feeder import DeltaFeeder, FeederConfig, wait_for_rows
from learner.metrics import LearnerMetrics
from learner.model import VLAPolicy
from learner.promotion import GateConfig, PromotionGate, promote_unless_pinned
from learner.quarantine import RowSpec
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.text import TextEmbedder
from learner.trainer import AsyncPublisher, Learner

log = logging.getLogger("sop.learner")

Promotion = Literal["auto", "gated"]


@dataclass(frozen=True, kw_only=True)
class LearnConfig:
    """Everything ``run_learning`` needs to know besides where the tables and the registry are."""

    model: ModelConfig = field(default_factory=ModelConfig)  # for a fresh policy; a resumed one keeps its own
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    recap: RecapConfig = field(default_factory=RecapConfig)
    feeder: FeederConfig = field(default_factory=FeederConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promotion: Promotion = "auto"
    max_steps: int | None = None  # learner steps of this run; None = until stopped
    duration_s: float | None = None
    log_every: int = 25
    status_every_s: float = 2.0
    refresh_epsilons_every: int = 100
    wait_for_data_s: float = 600.0
    policy_name: str = registry.POLICY_NAME
    champion_alias: str = "champion"
    candidate_alias: str = "candidate"
    experiment: str = "sop"

    def __post_init__(self) -> None:
        if self.promotion not in ("auto", "gated"):
            raise ConfigError(f"LearnConfig.promotion must be 'auto' or 'gated'; got {self.promotion!r}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"LearnConfig.max_steps must be >= 0 or None (until stopped); got {self.max_steps}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ConfigError(f"LearnConfig.duration_s must be > 0 or None; got {self.duration_s}")
        for name in ("log_every", "refresh_epsilons_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LearnConfig.{name} must be >= 1; got {getattr(self, name)}")
        if not self.status_every_s > 0 or not self.wait_for_data_s > 0:
            raise ConfigError("LearnConfig.status_every_s and wait_for_data_s must be > 0")
        if self.champion_alias == self.candidate_alias:
            raise ConfigError(f"LearnConfig.champion_alias and candidate_alias must differ; both are "
                              f"{self.champion_alias!r}")


@dataclass
class LearnSummary:
    start_step: int
    final_step: int
    resumed_from: str | None
    versions: list[str]
    stopped_by: str
    status: dict[str, Any]


class NoTrainingData(RuntimeError):
    """Neither demonstrations nor online episodes arrived within ``wait_for_data_s``."""


@dataclass(frozen=True)
class Resumed:
    model: VLAPolicy
    version: str | None
    step: int


def load_resumable(name: str, *, tracking_uri: str | None, max_tries: int = 5) -> registry.RegisteredVersion | None:
    """The newest version of ``name`` that loads; a version whose upload a crash cut short is skipped."""
    client = registry_client(tracking_uri)
    try:
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")), reverse=True)
    except Exception:  # no registered model yet
        return None
    for version in versions[:max_tries]:
        try:
            return registry.load_version(name, str(version), tracking_uri=tracking_uri, allow_legacy=True)
        except Exception as exc:  # noqa: BLE001 - any broken artifact means: try the one before
            log.warning("%s version %s does not load (%s); trying the one before", name, version, exc)
    return None


def _resume(config: LearnConfig, tracking_uri: str | None, info: DistInfo | None) -> Resumed:
    found = None
    if info is None or info.is_main:
        found = load_resumable(config.policy_name, tracking_uri=tracking_uri)
    version, step = broadcast((found.version, int(found.lineage.get("learner_step", 0))) if found else (None, 0), info)
    if found is None and version is not None:  # other ranks load exactly what rank 0 resumed from
        found = registry.load_version(config.policy_name, version, tracking_uri=tracking_uri, allow_legacy=True)
    if found is None:
        log.warning("no %s version registered: starting a fresh policy (run `sop pretrain` for a base policy)",
                    config.policy_name)
        torch.manual_seed(config.train.seed)
        return Resumed(model=VLAPolicy(config.model), version=None, step=0)
    model = found.model
    if model.config != config.model:
        log.info("resuming %s v%s with its own model config (the configured one applies to fresh policies)",
                 config.policy_name, version)
    return Resumed(model=model.train(), version=version, step=step)


def write_status(path: Path, status: Mapping[str, Any]) -> None:
    """Atomically replace the status file (readers never see half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


class _Publishing:
    """Registers versions and moves aliases (runs on the AsyncPublisher's thread).

    A registration that fails (the registry restarting, an upload cut short) is retried ``retries`` times with a
    backoff; MLflow's HTTP client already retries each request for minutes, so what is left are failures in the
    middle of the sequence of calls one registration makes. Each attempt first looks for a version of this
    learner run and step (tags ``lineage.run_id`` and ``lineage.learner_step``): a complete one is adopted, an
    incomplete one is deleted, so a step is never registered twice — also not when MLflow's client re-sent a
    ``create_model_version`` whose answer a dying server never sent (the extra copy is deleted and counted).
    """

    retries = 3
    backoff_s = 2.0

    def __init__(self, *, config: LearnConfig, tracking_uri: str | None, text: TextEmbedder,
                 lineage: Callable[[], dict[str, Any]], condition: str, cfg_beta: float, run_id: str | None,
                 gate: PromotionGate | None, parent: str | None, state_dir: Path | None = None) -> None:
        self.config = config
        self.state_dir = state_dir
        self.pending_states: dict[int, trainer_state.TrainerState] = {}  # learner step -> snapshot taken with it
        self.tracking_uri = tracking_uri
        self.text = text
        self.lineage = lineage
        self.condition = condition
        self.cfg_beta = cfg_beta
        self.run_id = run_id
        self.gate = gate
        self.parent = parent
        self.versions: list[str] = []
        self.failures = 0  # registrations given up (after every retry)
        self.retried = 0  # attempts that failed and were retried
        self.adopted = 0  # a retry found the step already registered completely
        self.removed = 0  # incomplete or duplicate versions of one step deleted
        self.refused_non_finite = 0  # versions never registered because a weight was NaN/Inf
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def __call__(self, model: VLAPolicy, step: int, metrics: Mapping[str, float]) -> str | None:
        with self._lock:
            state = self.pending_states.pop(step, None)
        lineage = {**self.lineage(), "learner_step": step, "parent_version": self.parent}
        if self.run_id is not None:
            lineage["run_id"] = self.run_id  # with the step, what makes a retried registration find its own
        version: str | None = None
        for attempt in range(self.retries + 1):
            try:
                version = self._register(model, step, metrics, lineage, retry=attempt > 0)
                break
            except registry.NonFiniteWeights as exc:
                with self._lock:
                    self.refused_non_finite += 1
                    self.last_error = str(exc)
                log.error("not registering the policy at step %d: %s (the alias stays where it is)", step, exc)
                return None
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop training; retried, counted
                with self._lock:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    if attempt == self.retries:
                        self.failures += 1
                    else:
                        self.retried += 1
                if attempt == self.retries:
                    log.warning("registering the policy at step %d failed %d times, giving up on this step "
                                "(the next version is registered as usual): %s", step, attempt + 1, exc)
                    return None
                wait = self.backoff_s * 2 ** attempt
                log.warning("registering the policy at step %d failed (%s); retrying in %.0f s", step, exc, wait)
                time.sleep(wait)
        assert version is not None
        with self._lock:
            self.versions.append(version)
            self.parent = version
        if state is not None and self.state_dir is not None:
            try:
                trainer_state.save(self.state_dir, state, version=version)
            except OSError as exc:  # the version is registered; a resume would start Adam afresh
                log.warning("saving the trainer state of version %s failed: %s", version, exc)
        try:
            if self.config.promotion == "auto":
                promote_unless_pinned(version, name=self.config.policy_name, tracking_uri=self.tracking_uri,
                                      alias=self.config.champion_alias, reason=f"auto: learner step {step}")
            elif self.gate is not None:
                self.gate.offer(version)
        except Exception as exc:  # noqa: BLE001 - the version is registered; the next one moves the alias
            with self._lock:
                self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("version %s (step %d) is registered but promoting it failed: %s", version, step, exc)
        return version

    def _step_tags(self, step: int) -> dict[str, str]:
        return {"lineage.learner_step": str(step), "lineage.run_id": str(self.run_id)}

    def _register(self, model: VLAPolicy, step: int, metrics: Mapping[str, float], lineage: Mapping[str, Any],
                  *, retry: bool) -> str:
        name = self.config.policy_name
        client = registry_client(self.tracking_uri)
        if retry and self.run_id is not None:  # an earlier attempt may have got (part of) the way
            found = versions_tagged(client, name, self._step_tags(step))
            complete = [v for v in found if version_complete(client, v)]
            keep = str(complete[0].version) if complete else None
            self._remove(client, [v for v in found if str(v.version) != keep], step)
            if keep is not None:
                with self._lock:
                    self.adopted += 1
                log.info("step %d is already registered as version %s: adopting it", step, keep)
                return keep
        embeddings = self.text.table() if hasattr(self.text, "table") else {}
        version = registry.register_policy(
            model, name=name, alias=None, metrics=metrics, lineage=lineage, tracking_uri=self.tracking_uri,
            embeddings=embeddings, condition=self.condition,  # type: ignore[arg-type]
            cfg_beta=self.cfg_beta, experiment=self.config.experiment, run_id=self.run_id, step=step)
        if self.run_id is not None:
            # MLflow's HTTP client re-sends a request whose answer was lost: a create_model_version that reached a
            # server killed before it answered leaves a second version of this step
            self._remove(client, [v for v in versions_tagged(client, name, self._step_tags(step))
                                  if str(v.version) != version], step)
        return version

    def _remove(self, client: MlflowClient, versions: list, step: int) -> None:
        for v in versions:
            log.warning("deleting version %s: an incomplete or second registration of learner step %d", v.version,
                        step)
            client.delete_model_version(self.config.policy_name, str(v.version))
            with self._lock:
                self.removed += 1

    def check_gate(self) -> None:
        if self.gate is None:
            return
        try:
            self.gate.check()
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("promotion gate check failed: %s", exc)


def run_learning(config: LearnConfig, *, lake: Lakehouse, tracking_uri: str | None, text: TextEmbedder,
                 status_path: Path | None = None, stop: threading.Event | None = None,
                 dist_info: DistInfo | None = None,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 prometheus: LearnerMetrics | None = None, state_dir: Path | None = None) -> LearnSummary:
    """Learn until stopped (see the module doc); returns what happened. ``prometheus``: observed after every step
    and given every status (rank 0's is what `sop learn` serves). ``state_dir``: where Adam's moments and the
    loss windows are kept with the version they belong to (``learner.trainer_state``); default beside the status
    file, none without one."""
    if state_dir is None and status_path is not None:
        state_dir = status_path.parent
    stop = stop or threading.Event()
    info = dist_info
    main = info is None or info.is_main
    world = 1 if info is None else info.world
    rank = 0 if info is None else info.rank
    if config.sampler.batch_size < world:
        raise ConfigError(f"SamplerConfig.batch_size ({config.sampler.batch_size}) is the global batch; it must be "
                          f">= the number of processes ({world})")
    # Ranks sample different batches (sampler seed) and augment differently (torch seed).
    train_cfg = config.train if info is None else replace(config.train, device=info.device,
                                                          seed=config.train.seed + info.rank)
    if train_cfg.num_threads is not None:
        torch.set_num_threads(train_cfg.num_threads)

    resumed = _resume(config, tracking_uri, info)
    model = resumed.model
    model_cfg = model.config
    algorithm = make_algorithm(train_cfg.algorithm, config.recap, seed=train_cfg.seed + rank)
    build = BatchBuilder(model_cfg.encoder, text, chunk=model_cfg.chunk, action_dim=model_cfg.action_dim)
    sampler_cfg = replace(config.sampler, batch_size=config.sampler.batch_size // world,
                          seed=config.sampler.seed + rank)
    sampler = AdaptiveSampler(sampler_cfg, build, chunk=model_cfg.chunk, accept=algorithm.accepts,
                              spec=RowSpec.for_policy(model_cfg))
    feeder = DeltaFeeder(lake, sampler, config.feeder)

    client = registry_client(tracking_uri) if main else None
    run_id: str | None = None
    if client is not None:
        exp_id = experiment_id(client, config.experiment)
        run = client.create_run(exp_id, run_name=f"learn-{train_cfg.algorithm}",
                                tags={"sop.role": "learner", "sop.resumed_from": str(resumed.version),
                                      "sop.world_size": str(world)})
        run_id = run.info.run_id
        params = {"algorithm": train_cfg.algorithm, "promotion": config.promotion, "world_size": world,
                  "sampler": json.dumps(to_dict(config.sampler)), "train": json.dumps(to_dict(train_cfg)),
                  "model": json.dumps(to_dict(model_cfg)), "start_step": resumed.step}
        for key, value in params.items():
            client.log_param(run_id, key, str(value)[:6000])

    started = time.monotonic()
    status: dict[str, Any] = {"state": "starting", "pid": os.getpid(), "algorithm": train_cfg.algorithm,
                              "promotion": config.promotion, "world_size": world, "resumed_from": resumed.version,
                              "step": resumed.step, "run_id": run_id, "last_version": resumed.version}

    def emit() -> None:
        if main and status_path is not None:
            write_status(status_path, status)
        if main and on_status is not None:
            on_status(dict(status))
        if main and prometheus is not None:
            prometheus.publish(status)

    emit()
    _load_initial(feeder, timeout_s=config.wait_for_data_s, stop=stop)
    feeder.start()
    prefetcher: Prefetcher | None = None
    publisher: AsyncPublisher | None = None
    publishing: _Publishing | None = None
    stopped_by = "budget"
    learner: Learner | None = None
    try:
        has_data = wait_for_rows(sampler, timeout_s=config.wait_for_data_s, stop=stop)
        if any_rank(not has_data, info):
            if stop.is_set():
                if client is not None and run_id is not None:
                    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
                    run_id = None
                return LearnSummary(resumed.step, resumed.step, resumed.version, [], "signal", status)
            raise NoTrainingData(f"no demonstrations or online episodes in {lake.root} after "
                                 f"{config.wait_for_data_s:.0f} s: write demonstrations first (`sop demos`)")
        if isinstance(algorithm, Recap):
            algorithm.refresh_epsilons(sampler.advantages())
        barrier(info)

        def lineage() -> dict[str, Any]:
            losses = sampler.losses()
            return {"algorithm": train_cfg.algorithm, "delta_versions": feeder.versions(),
                    "omega_on": sampler.omega(), "sampler_mode": sampler_cfg.mode, "world_size": world,
                    "run_id": run_id, "phase": "online", "promotion": config.promotion,
                    "losses": {t: {"online": on, "offline": off} for t, (on, off) in losses.items()},
                    "epsilons": dict(getattr(algorithm, "epsilons", {}))}

        if main:
            gate = (PromotionGate(lake, name=config.policy_name, tracking_uri=tracking_uri, config=config.gate,
                                  champion_alias=config.champion_alias, candidate_alias=config.candidate_alias)
                    if config.promotion == "gated" else None)
            publishing = _Publishing(config=config, tracking_uri=tracking_uri, text=text, lineage=lineage,
                                     condition=algorithm.condition, cfg_beta=config.recap.cfg_beta, run_id=run_id,
                                     gate=gate, parent=resumed.version, state_dir=state_dir)
            publisher = AsyncPublisher(publishing)
        prefetcher = Prefetcher(sampler, depth=sampler_cfg.prefetch_batches).start()
        model.to(train_cfg.device)  # DDP wraps a module already on its device
        forward = DDPPolicy(model, info) if info is not None else None
        publish: Callable[..., Any] | None = None
        if publisher is not None:
            async_publish = publisher

            def publish(policy: VLAPolicy, step: int, step_metrics: Mapping[str, float]) -> Any:
                if publishing is not None and publishing.state_dir is not None:  # with the weights, same step
                    publishing.pending_states[step] = trainer_state.snapshot(learner_ref[0], sampler)
                return async_publish(policy, step, step_metrics)

        learner = Learner(model, algorithm, prefetcher, train_cfg, feedback=sampler, publish=publish,
                          omega=sampler.omega, start_step=resumed.step, forward_model=forward)
        learner_ref = [learner]
        # every rank restores the same moments (rank 0 wrote them; ranks share the run's directory)
        restored = state_dir is not None and trainer_state.restore(state_dir, learner, sampler,
                                                                   version=resumed.version)
        status["trainer_state_restored"] = restored
        if resumed.version is not None:
            log.info("resumed from %s v%s at step %d; optimizer state and loss windows %s", config.policy_name,
                     resumed.version, resumed.step, "restored" if restored else "start afresh")
        status["state"] = "running"
        train_start = last_status = last_gate = time.monotonic()
        window_start, window_steps = time.monotonic(), 0
        steps_per_s = 0.0
        done = 0
        metrics_logged: Future[Any] | None = None
        metric_logs_skipped = 0
        metrics: dict[str, float] = {}
        while True:
            want_stop = stop.is_set()
            if config.max_steps is not None and done >= config.max_steps:
                stopped_by, want_stop = "budget", True
            elif config.duration_s is not None and time.monotonic() - started >= config.duration_s:
                stopped_by, want_stop = "duration", True
            elif stop.is_set():
                stopped_by = "signal"
            if any_rank(want_stop, info):
                if not want_stop:
                    stopped_by = "another rank"
                break
            metrics = learner.step()
            done += 1
            if prometheus is not None:
                prometheus.on_step(metrics)
            window_steps += 1
            if isinstance(algorithm, Recap) and learner.steps % config.refresh_epsilons_every == 0:
                algorithm.refresh_epsilons(sampler.advantages())
            if not main:
                continue
            now = time.monotonic()
            if done % config.log_every == 0 and client is not None and run_id is not None:
                log_call = partial(_log_metrics, client, run_id, dict(metrics), learner.steps, prefetcher,
                                   health=_health(sampler, publishing))
                if publisher is None:
                    log_call()
                elif metrics_logged is None or metrics_logged.done():
                    # on the publishing thread: a registry that does not answer must not stall training
                    metrics_logged = publisher.submit(log_call)
                else:
                    metric_logs_skipped += 1  # the previous one still waits on the registry
                    status["metric_logs_skipped"] = metric_logs_skipped
            if now - last_status >= config.status_every_s:
                steps_per_s = window_steps / max(1e-9, now - window_start)
                window_start, window_steps = now, 0
                status.update(_status_fields(learner, sampler, feeder, prefetcher, publishing, metrics,
                                             steps_per_s=steps_per_s, batch=config.sampler.batch_size))
                emit()
                last_status = now
            if publisher is not None and publishing is not None and publishing.gate is not None and \
                    now - last_gate >= config.gate.check_interval_s:
                publisher.submit(publishing.check_gate)
                last_gate = now
        if publish is not None and learner.steps % train_cfg.publish_every and done > 0:
            publish(learner.policy_to_publish(), learner.steps, metrics)  # the last steps are not lost
        if publisher is not None:
            publisher.close()
            publisher = None
        if client is not None and run_id is not None and done > 0:
            _log_metrics(client, run_id, metrics, learner.steps, prefetcher, health=_health(sampler, publishing))
        steps_per_s = done / max(1e-9, time.monotonic() - train_start)  # over the whole run
        status.update(_status_fields(learner, sampler, feeder, prefetcher, publishing, metrics,
                                     steps_per_s=steps_per_s, batch=config.sampler.batch_size))
        status["state"] = f"stopped ({stopped_by})"
        emit()
        if client is not None and run_id is not None:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
            run_id = None
        return LearnSummary(start_step=resumed.step, final_step=learner.steps, resumed_from=resumed.version,
                            versions=list(publishing.versions) if publishing else [], stopped_by=stopped_by,
                            status=dict(status))
    finally:
        if publisher is not None:
            publisher.close()
        if prefetcher is not None:
            prefetcher.close()
        feeder.close()
        if client is not None and run_id is not None:
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


def _load_initial(feeder: DeltaFeeder, *, timeout_s: float, stop: threading.Event) -> None:
    """The feeder's first read, retried while the object store does not answer (a learner starting while S3
    restarts crashed here); a permanent error, or storage still away after ``timeout_s``, is raised."""
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while True:
        try:
            feeder.load_initial()
            return
        except (OSError, DeltaError, LakehouseError) as exc:
            cause = exc.__cause__ if isinstance(exc, LakehouseError) and exc.__cause__ is not None else exc
            wait = storage_backoff(attempt, cap_s=10.0)
            if not is_transient_storage_error(cause) or time.monotonic() + wait > deadline or stop.is_set():
                raise
            log.warning("reading the tables failed (%s); retrying in %.1f s", exc, wait)
            attempt += 1
            stop.wait(wait)


def _health(sampler: AdaptiveSampler, publishing: _Publishing | None) -> dict[str, float]:
    """The learner's defences as metrics: ``quarantined`` and ``quarantined/<reason>`` (rows refused), and
    ``publish_refused_non_finite`` (versions not registered). ``skipped_steps`` comes with the step metrics."""
    values = sampler.quarantine.metrics()
    if publishing is not None:
        values["publish_refused_non_finite"] = float(publishing.refused_non_finite)
    return values


def _log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                 prefetcher: Prefetcher | None, *, health: Mapping[str, float] | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = {k: float(v) for k, v in {**metrics, **(health or {})}.items() if np.isfinite(v)}
    if prefetcher is not None:
        values["prefetch_waits"] = float(prefetcher.waits)
    try:
        client.log_batch(run_id, metrics=[Metric(_metric_key(k), v, now, step) for k, v in values.items()])
    except Exception as exc:  # noqa: BLE001 - metrics are best effort
        log.warning("logging metrics failed: %s", exc)


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def _status_fields(learner: Learner, sampler: AdaptiveSampler, feeder: DeltaFeeder, prefetcher: Prefetcher | None,
                   publishing: _Publishing | None, metrics: Mapping[str, float], *, steps_per_s: float,
                   batch: int) -> dict[str, Any]:
    feed = feeder.stats()
    omega = sampler.omega()
    fields: dict[str, Any] = {
        "time": time.time(),
        "step": learner.steps,
        "loss": metrics.get("loss"),
        "omega_on": omega,
        "omega": omega,  # the name `sop run`'s live view reads
        "losses": {t: {"online": on, "offline": off} for t, (on, off) in sampler.losses().items()},
        "buffers": sampler.sizes(),
        "delta_versions": feeder.versions(),
        "feeder": {t: {"episodes": p.episodes_added, "rows": p.rows_added, "version": p.version}
                   for t, p in feed.tables.items()},
        "feeder_errors": feed.errors,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * batch,
        "prefetch_waits": prefetcher.waits if prefetcher is not None else 0,
        "quarantined": sampler.quarantine.counts(),  # rows refused, by reason (learner.quarantine.REASONS)
        "skipped_steps": learner.skipped_steps,  # non-finite loss or gradient: no update
    }
    if publishing is not None:
        fields.update(last_version=publishing.parent,
                      versions_registered=len(publishing.versions), publish_failures=publishing.failures,
                      publish_retried=publishing.retried, publish_adopted=publishing.adopted,
                      publish_removed=publishing.removed, publish_refused_non_finite=publishing.refused_non_finite)
        if publishing.gate is not None:
            fields["gate"] = dict(publishing.gate.last, pending=publishing.gate.pending)
    return fields
