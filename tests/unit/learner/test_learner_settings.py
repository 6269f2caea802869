"""The learner commands' settings: SOP_ variables, validated, errors naming the variable to fix."""

import pytest

from sop.learner_settings import load_learner_settings
from sop.settings import SettingsError, load_settings


def test_defaults_build_valid_configs() -> None:
    settings = load_learner_settings()
    assert settings.train_config().algorithm == "hg-dagger"
    assert settings.sampler_config().batch_size == 64
    assert settings.recap_config(load_settings()).max_episode_length == 150
    assert settings.policy_config().encoder.image_size == 64


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_LEARN_ALGORITHM", "recap")
    monkeypatch.setenv("SOP_LEARN_SAMPLER", "fixed")
    monkeypatch.setenv("SOP_POLICY_MODEL", '{"hidden": [32], "encoder": {"image_size": 32}}')
    monkeypatch.setenv("SOP_LEARN_TASKS", '["drawer-open-v3"]')
    settings = load_learner_settings()
    assert settings.train_config().algorithm == "recap" and settings.sampler_config().mode == "fixed"
    assert settings.policy_config().hidden == (32,) and settings.policy_config().encoder.image_size == 32
    assert settings.tasks() == ("drawer-open-v3",)


@pytest.mark.parametrize(("variable", "value"), [
    ("SOP_LEARN_BATCH_SIZE", "0"), ("SOP_LEARN_ALGORITHM", "ppo"), ("SOP_LEARN_ALPHA", "0.5"),
    ("SOP_LEARN_PROMOTION", "sometimes"),
])
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_learner_settings()


def test_bad_model_json_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_POLICY_MODEL", '{"hiden": [32]}')
    with pytest.raises(SettingsError, match="SOP_POLICY_MODEL.*hiden"):
        load_learner_settings().policy_config()
