"""Settings of the learner: frozen, keyword-only, validated on construction, round-trippable through JSON.

This module imports nothing heavy (no torch). ``RecapConfig`` and ``ConfigError`` live in ``rewards.config``
(the simulated demonstrations writer needs the reward settings too, and may not import the learner);
they are re-exported here because every learner setting is importable from one place.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from rewards.config import ConfigError, RecapConfig

__all__ = ["ConfigError", "RecapConfig"]  # and the configs below

ImageEncoderKind = Literal["cnn", "vit"]
SamplerMode = Literal["paper", "normalised", "fixed"]
AlgorithmName = Literal["hg-dagger", "recap"]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive_ints(name: str, values: tuple[int, ...], *, allow_empty: bool = False) -> None:
    _require(allow_empty or len(values) > 0, f"{name} must list at least one size; got an empty tuple")
    _require(all(isinstance(v, int) and v > 0 for v in values),
             f"{name} must hold positive integers; got {values!r}")


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """How an observation (camera images + proprio + instruction embedding) becomes one feature vector."""

    cameras: tuple[str, ...] = ("corner",)
    image_size: int = 64  # images are resized to image_size x image_size before the encoder
    image_encoder: ImageEncoderKind = "cnn"
    cnn_channels: tuple[int, ...] = (32, 64, 64, 64)  # 3x3 convolutions, stride 2 each
    vit_patch: int = 8
    vit_dim: int = 192
    vit_depth: int = 4
    vit_heads: int = 3
    image_features: int = 128  # per camera
    text_dim: int = 384  # MiniLM sentence embedding
    text_features: int = 64
    proprio_dim: int = 39
    proprio_features: int = 128
    proprio_clip: float = 5.0  # normalised proprio is clipped to +-proprio_clip
    augment_shift: int = 4  # +-pixels of random shift in training; 0 turns augmentation off

    def __post_init__(self) -> None:
        _require(len(self.cameras) > 0 and all(isinstance(c, str) and c for c in self.cameras),
                 f"EncoderConfig.cameras must name at least one camera, e.g. ('corner',); got {self.cameras!r}")
        _require(len(set(self.cameras)) == len(self.cameras),
                 f"EncoderConfig.cameras must not repeat a camera; got {self.cameras!r}")
        _require(self.image_size >= 16, f"EncoderConfig.image_size must be >= 16 pixels; got {self.image_size}")
        _require(self.image_encoder in ("cnn", "vit"),
                 f"EncoderConfig.image_encoder must be 'cnn' or 'vit'; got {self.image_encoder!r}")
        _positive_ints("EncoderConfig.cnn_channels", self.cnn_channels)
        _require(2 ** len(self.cnn_channels) <= self.image_size,
                 f"EncoderConfig.cnn_channels has {len(self.cnn_channels)} stride-2 layers, too many for "
                 f"image_size={self.image_size}; use fewer layers or larger images")
        if self.image_encoder == "vit":
            _require(self.vit_patch > 0 and self.image_size % self.vit_patch == 0,
                     f"EncoderConfig.vit_patch must divide image_size={self.image_size}; got {self.vit_patch}")
            _require(self.vit_heads > 0 and self.vit_dim % self.vit_heads == 0,
                     f"EncoderConfig.vit_dim ({self.vit_dim}) must be a multiple of vit_heads ({self.vit_heads})")
            _require(self.vit_depth > 0, f"EncoderConfig.vit_depth must be >= 1; got {self.vit_depth}")
        for name in ("image_features", "text_dim", "text_features", "proprio_dim", "proprio_features"):
            _require(getattr(self, name) > 0, f"EncoderConfig.{name} must be > 0; got {getattr(self, name)}")
        _require(self.proprio_clip > 0, f"EncoderConfig.proprio_clip must be > 0; got {self.proprio_clip}")
        _require(0 <= self.augment_shift < self.image_size // 2,
                 f"EncoderConfig.augment_shift must be in [0, image_size/2); got {self.augment_shift}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The VLA policy: encoders, the RECAP indicator input, and an action head predicting ``chunk`` actions."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    action_dim: int = 4
    chunk: int = 1  # H actions predicted per observation; act() executes the first
    hidden: tuple[int, ...] = (256, 256)
    indicator_features: int = 32

    def __post_init__(self) -> None:
        _require(isinstance(self.encoder, EncoderConfig),
                 f"ModelConfig.encoder must be an EncoderConfig; got {type(self.encoder).__name__}")
        _require(self.action_dim > 0, f"ModelConfig.action_dim must be > 0; got {self.action_dim}")
        _require(self.chunk >= 1, f"ModelConfig.chunk must be >= 1 (1 = single action); got {self.chunk}")
        _positive_ints("ModelConfig.hidden", self.hidden)
        _require(self.indicator_features > 0,
                 f"ModelConfig.indicator_features must be > 0; got {self.indicator_features}")


@dataclass(frozen=True, kw_only=True)
class ValueConfig:
    """The distributional value model: a categorical distribution over the normalised return in [v_min, v_max]."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    hidden: tuple[int, ...] = (256, 256)
    bins: int = 201
    v_min: float = -1.0
    v_max: float = 0.0

    def __post_init__(self) -> None:
        _require(isinstance(self.encoder, EncoderConfig),
                 f"ValueConfig.encoder must be an EncoderConfig; got {type(self.encoder).__name__}")
        _positive_ints("ValueConfig.hidden", self.hidden)
        _require(self.bins >= 2, f"ValueConfig.bins must be >= 2 (the paper uses 201); got {self.bins}")
        _require(self.v_min < self.v_max,
                 f"ValueConfig.v_min ({self.v_min}) must be below v_max ({self.v_max})")


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """The adaptive online/offline sampler of the SOP paper, its buffers and its prefetching."""

    batch_size: int = 64
    # paper: omega_on from the losses as they are; normalised: from the losses in units of the task's offline
    # loss (meaningful at any loss scale); fixed: a constant share (the ablation)
    mode: SamplerMode = "paper"
    fixed_online_share: float = 0.5  # used when mode == "fixed" (the ablation)
    alpha: float = 2.0
    share_clip: tuple[float, float] = (0.2, 0.8)
    window_steps: int = 200  # learner steps over which l_on, l_off are averaged
    online_capacity: int = 20_000  # rows per task
    offline_capacity: int = 50_000  # rows per task
    prefetch_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"SamplerConfig.batch_size must be >= 1; got {self.batch_size}")
        _require(self.mode in ("paper", "normalised", "fixed"),
                 f"SamplerConfig.mode must be 'paper', 'normalised' or 'fixed'; got {self.mode!r}")
        _require(0.0 <= self.fixed_online_share <= 1.0,
                 f"SamplerConfig.fixed_online_share must be in [0, 1]; got {self.fixed_online_share}")
        _require(self.alpha > 1.0,
                 f"SamplerConfig.alpha must be > 1 (it tilts sampling towards online data); got {self.alpha}")
        lo, hi = self.share_clip
        _require(0.0 <= lo <= hi <= 1.0,
                 f"SamplerConfig.share_clip must be (low, high) with 0 <= low <= high <= 1; got {self.share_clip}")
        _require(self.window_steps >= 1, f"SamplerConfig.window_steps must be >= 1; got {self.window_steps}")
        _require(self.online_capacity >= 1 and self.offline_capacity >= 1,
                 "SamplerConfig.online_capacity and offline_capacity must be >= 1 rows per task; got "
                 f"{self.online_capacity}, {self.offline_capacity}")
        _require(self.prefetch_batches >= 1,
                 f"SamplerConfig.prefetch_batches must be >= 1; got {self.prefetch_batches}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The optimisation loop and how often it publishes a policy version."""

    algorithm: AlgorithmName = "hg-dagger"
    lr: float = 3e-4
    weight_decay: float = 1e-4
    grad_clip: float | None = 1.0
    publish_every: int = 25  # learner steps between registered versions (the paper's value)
    proprio_stats_steps: int = 1_000  # proprio normalisation statistics are updated, then frozen
    ema_decay: float = 0.0  # 0 = publish the raw weights; e.g. 0.995 publishes an EMA of them
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads on the CPU; None leaves torch's default
    retain_memory: bool = True  # keep freed heap memory for the next step (trainer.retain_freed_memory)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.algorithm in ("hg-dagger", "recap"),
                 f"TrainConfig.algorithm must be 'hg-dagger' or 'recap'; got {self.algorithm!r}")
        _require(self.lr > 0, f"TrainConfig.lr must be > 0; got {self.lr}")
        _require(self.weight_decay >= 0, f"TrainConfig.weight_decay must be >= 0; got {self.weight_decay}")
        _require(self.grad_clip is None or self.grad_clip > 0,
                 f"TrainConfig.grad_clip must be > 0 or None (no clipping); got {self.grad_clip}")
        _require(self.publish_every >= 1, f"TrainConfig.publish_every must be >= 1; got {self.publish_every}")
        _require(self.proprio_stats_steps >= 0,
                 f"TrainConfig.proprio_stats_steps must be >= 0; got {self.proprio_stats_steps}")
        _require(0.0 <= self.ema_decay < 1.0,
                 f"TrainConfig.ema_decay must be in [0, 1) (0 turns the EMA off); got {self.ema_decay}")
        _require(self.num_threads is None or self.num_threads >= 1,
                 f"TrainConfig.num_threads must be >= 1 or None; got {self.num_threads}")


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (nested configs become dicts, tuples lists)."""
    return dataclasses.asdict(config, dict_factory=lambda items: {k: _plain(v) for k, v in items})


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config from ``to_dict`` output; unknown keys are an error so typos do not pass silently."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__} has no setting(s) {sorted(unknown)}; known: {sorted(names)}")
    return cls(**{k: _typed(hints[k], v) for k, v in data.items()})


def _typed(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
        return from_dict(hint, value)  # type: ignore[arg-type]
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is not type(None) and (dataclasses.is_dataclass(arg) or typing.get_origin(arg) is tuple):
                return _typed(arg, value)
    return value
