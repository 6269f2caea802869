"""Settings are validated on construction with messages that say what to change, and survive JSON."""

import json

import pytest

from learner.config import (
    ConfigError,
    EncoderConfig,
    ModelConfig,
    RecapConfig,
    SamplerConfig,
    TrainConfig,
    ValueConfig,
    from_dict,
    to_dict,
)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: SamplerConfig(alpha=0.9), "alpha must be > 1"),
    (lambda: SamplerConfig(share_clip=(0.8, 0.2)), "share_clip"),
    (lambda: SamplerConfig(mode="sometimes"), "'paper', 'normalised' or 'fixed'"),
    (lambda: RecapConfig(target_positive_share=1.5), "target_positive_share must be in"),
    (lambda: RecapConfig(cfg_beta=0.5), "cfg_beta must be >= 1"),
    (lambda: RecapConfig(task_max_episode_length={"reach": 0}), "task_max_episode_length"),
    (lambda: ModelConfig(chunk=0), "chunk must be >= 1"),
    (lambda: EncoderConfig(image_encoder="vit", vit_patch=7), "vit_patch must divide"),
    (lambda: EncoderConfig(cameras=()), "at least one camera"),
    (lambda: EncoderConfig(image_size=16, cnn_channels=(8,) * 5), "too many"),
    (lambda: ValueConfig(v_min=0.0, v_max=-1.0), "must be below"),
    (lambda: TrainConfig(algorithm="ppo"), "'hg-dagger' or 'recap'"),
    (lambda: TrainConfig(ema_decay=1.0), "ema_decay"),
])
def test_invalid_settings_say_what_to_fix(make: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()  # type: ignore[operator]


def test_configs_are_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplerConfig().alpha = 3.0  # type: ignore[misc]


@pytest.mark.parametrize("config", [
    ModelConfig(encoder=EncoderConfig(image_encoder="vit", cameras=("corner", "wrist")), chunk=4),
    ValueConfig(bins=51), RecapConfig(task_max_episode_length={"reach-v3": 80}, c_fail=10.0),
    SamplerConfig(share_clip=(0.1, 0.9)), TrainConfig(num_threads=2, grad_clip=None),
])
def test_json_round_trip(config: object) -> None:
    data = json.loads(json.dumps(to_dict(config)))
    assert from_dict(type(config), data) == config


def test_unknown_keys_are_rejected() -> None:
    with pytest.raises(ConfigError, match="no setting"):
        from_dict(SamplerConfig, {"alpah": 2.0})


def test_recap_per_task_lengths() -> None:
    cfg = RecapConfig(task_max_episode_length={"reach-v3": 80})
    assert cfg.max_steps("reach-v3") == 80 and cfg.max_steps("other") == 150
    assert cfg.failure_penalty("reach-v3") == 80.0
    assert RecapConfig(c_fail=5).failure_penalty("reach-v3") == 5.0
