"""Settings of the learner commands (``sop learn``, ``sop pretrain``, ``sop train-value``, promote/rollback).

Like :mod:`sop.settings`, every field maps to a ``SOP_…`` environment variable (``learn_algorithm`` ←
``SOP_LEARN_ALGORITHM``); command-line options override them. Model shapes take JSON with the fields of
``learner.config.ModelConfig`` / ``ValueConfig`` (``SOP_POLICY_MODEL='{"hidden": [128, 128],
"encoder": {"image_size": 64}}'``). A bad value stops the command with a message naming the variable.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from learner.config import (
    ConfigError,
    ModelConfig,
    RecapConfig,
    SamplerConfig,
    TrainConfig,
    ValueConfig,
    from_dict,
)
from sop.settings import MetricsPort, Settings, SettingsError, settings_error


class LearnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOP_", extra="ignore", frozen=True)

    # what is learned and how it is published
    learn_algorithm: Literal["hg-dagger", "recap"] = Field("hg-dagger", description="Online algorithm.")
    learn_publish_every: int = Field(25, ge=1, description="Learner steps between registered versions.")
    learn_promotion: Literal["auto", "gated"] = Field(
        "auto", description="auto: every version becomes champion; gated: candidate, promoted on live success.")
    gate_min_episodes: int = Field(20, ge=1, description="Live episodes of a candidate before the gate judges it.")
    gate_tolerance: float = Field(0.0, ge=0, lt=1, description=(
        "The margin: how much worse (autonomous success, takeover rate) a candidate may be and pass."))
    gate_alpha: float = Field(0.05, gt=0, lt=0.5, description="Level of the gate's one-sided test, per metric.")
    gate_check_s: float = Field(5.0, gt=0)
    registry_gc_keep_last: int = Field(50, ge=0, description=(
        "Gated mode: registry garbage collection keeps the newest N versions besides every champion, aliased and "
        "running one (0 = no collection)."))
    registry_gc_active_s: float = Field(900.0, ge=0, description=(
        "A version that played an episode, or that an alias moved to, this recently counts as running."))
    registry_gc_every_s: float = Field(60.0, gt=0, description="Seconds between collections.")
    candidate_alias: str = "candidate"

    # the sampler
    learn_batch_size: int = Field(64, ge=1, description="Global batch (split over torchrun processes).")
    learn_sampler: Literal["paper", "normalised", "fixed"] = Field("paper", description=(
        "paper = the paper's omega_on formula on the raw losses; normalised = the same on losses in units of the "
        "task's offline loss; fixed = the ablation (SOP_LEARN_FIXED_ONLINE_SHARE)."))
    learn_fixed_online_share: float = Field(0.5, ge=0, le=1)
    learn_alpha: float = Field(2.0, gt=1)
    learn_window_steps: int = Field(200, ge=1)
    learn_online_capacity: int = Field(20_000, ge=1, description="Online rows kept per task.")
    learn_offline_capacity: int = Field(50_000, ge=1, description="Offline rows kept per task.")
    learn_prefetch: int = Field(4, ge=1)
    learn_poll_s: float = Field(1.0, gt=0, description="Seconds between Delta polls.")
    learn_tasks: list[str] | None = Field(None, description="Tasks to learn (JSON list); unset = all found.")

    # optimisation
    learn_lr: float = Field(3e-4, gt=0)
    learn_ema_decay: float = Field(0.0, ge=0, lt=1)
    learn_device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when available).")
    learn_threads: int | None = Field(None, ge=1, description="torch CPU threads; unset = torch's default.")
    learn_seed: int = 0
    learn_log_every: int = Field(25, ge=1, description="Learner steps between MLflow metric logs.")
    learn_max_steps: int | None = Field(None, ge=0, description="Step budget of one `sop learn`; unset = none.")
    learn_duration_s: float | None = Field(None, gt=0)
    learn_metrics_port: MetricsPort = Field(0, description=(
        "Port of the learner's Prometheus endpoint (rank 0): N, 0 = any free port, or off."))

    # RECAP
    recap_target_positive_share: float = Field(0.3, gt=0, lt=1)
    recap_indicator_dropout: float = Field(0.3, ge=0, lt=1)
    recap_cfg_beta: float = Field(1.0, ge=1)

    # models (JSON overrides of learner.config.ModelConfig / ValueConfig)
    policy_model: dict[str, Any] = Field(default_factory=dict)
    value_model: dict[str, Any] = Field(default_factory=dict)

    # offline training
    pretrain_steps: int = Field(600, ge=1, description="Behaviour-cloning steps of the base policy.")
    pretrain_lr: float = Field(3e-4, gt=0)
    pretrain_ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA of the weights published.")
    value_steps: int = Field(2000, ge=1)
    value_lr: float = Field(3e-4, gt=0)
    eval_episodes: int = Field(50, ge=1, description="Held-out episodes per task of `--eval`.")

    # ---- learner configs built from the settings (and the shared ones) --------------------------------
    def device(self) -> str:
        if self.learn_device != "auto":
            return self.learn_device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def policy_config(self) -> ModelConfig:
        return _build("SOP_POLICY_MODEL", lambda: from_dict(ModelConfig, self.policy_model))

    def value_config(self) -> ValueConfig:
        return _build("SOP_VALUE_MODEL", lambda: from_dict(ValueConfig, self.value_model))

    def sampler_config(self) -> SamplerConfig:
        return _build("SOP_LEARN_BATCH_SIZE / SOP_LEARN_SAMPLER / SOP_LEARN_*", lambda: SamplerConfig(
            batch_size=self.learn_batch_size, mode=self.learn_sampler,
            fixed_online_share=self.learn_fixed_online_share, alpha=self.learn_alpha,
            window_steps=self.learn_window_steps, online_capacity=self.learn_online_capacity,
            offline_capacity=self.learn_offline_capacity, prefetch_batches=self.learn_prefetch, seed=self.learn_seed))

    def train_config(self, *, algorithm: str | None = None, lr: float | None = None,
                     ema_decay: float | None = None) -> TrainConfig:
        return _build("SOP_LEARN_*", lambda: TrainConfig(
            algorithm=algorithm or self.learn_algorithm,  # type: ignore[arg-type]
            lr=lr or self.learn_lr, publish_every=self.learn_publish_every,
            ema_decay=self.learn_ema_decay if ema_decay is None else ema_decay, device=self.device(),
            num_threads=self.learn_threads, seed=self.learn_seed))

    def recap_config(self, shared: Settings) -> RecapConfig:
        return _build("SOP_RECAP_* / SOP_MAX_EPISODE_STEPS", lambda: RecapConfig(
            n_step=shared.recap_advantage_horizon, c_fail=shared.recap_c_fail,
            max_episode_length=shared.max_episode_steps, target_positive_share=self.recap_target_positive_share,
            indicator_dropout=self.recap_indicator_dropout, cfg_beta=self.recap_cfg_beta))

    def tasks(self) -> tuple[str, ...] | None:
        return tuple(self.learn_tasks) if self.learn_tasks else None


def _build(variable: str, make: Any) -> Any:
    try:
        return make()
    except (ConfigError, TypeError, ValueError) as exc:
        raise SettingsError(f"{variable}: {exc}") from None


def load_learner_settings(**overrides: object) -> LearnerSettings:
    """Read the learner settings; raise :class:`SettingsError` naming the ``SOP_…`` variable on bad input."""
    try:
        return LearnerSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise settings_error(exc, "invalid learner settings") from None


# ---- what the learner commands share ---------------------------------------------------------------------
def open_lake(shared: Settings) -> Any:
    from lakehouse import Lakehouse

    return Lakehouse(shared.lake_root, storage_options=shared.lake_storage_options or None)


def text_encoder(shared: Settings) -> Any:
    """MiniLM with its embeddings cached under the run directory (BERT runs once per new instruction)."""
    from learner.text import SentenceEncoder

    return SentenceEncoder(cache_dir=shared.run_path / "embeddings")


def prepare_registry(shared: Settings) -> str:
    """The tracking URI, with the local store and its experiment created when the default local one is used."""
    if shared.mlflow_tracking_uri is None:
        from infra.mlflow_local import ensure_experiment

        shared.run_path.mkdir(parents=True, exist_ok=True)
        ensure_experiment(shared.tracking_uri, shared.artifact_root)
    return shared.tracking_uri


def quiet_mlflow() -> None:
    """No per-download progress bars or info logs from MLflow in the middle of a live view."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def value_version(shared: Settings, tracking_uri: str | None = None) -> str | None:
    """The ``sop-value`` version RECAP computes values with, as the stream processor picks it: the pinned
    ``SOP_VALUE_MODEL_VERSION`` (which must exist), else the ``champion`` alias, else the newest; None if none."""
    from mlflow.exceptions import MlflowException

    from infra.registry import registry_client

    client = registry_client(tracking_uri or shared.tracking_uri)
    name = shared.value_model_name
    if shared.value_model_version is not None:
        try:
            return str(client.get_model_version(name, str(shared.value_model_version)).version)
        except MlflowException:
            raise SettingsError(f"SOP_VALUE_MODEL_VERSION: {name} has no version {shared.value_model_version}") from None
    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        pass
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None
