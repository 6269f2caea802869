import json

import pytest

from sop.settings import SettingsError, load_settings


def test_defaults_and_derived_names(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SOP_RUN_DIR", str(tmp_path))
    s = load_settings()
    assert s.topics == {"Step": "sop.steps", "EpisodeEvent": "sop.episodes", "InterventionEvent": "sop.interventions",
                        "deadletter": "sop.deadletter"}
    assert s.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert s.lake_root == str(tmp_path.resolve() / "lake")
    assert {t.name for t in s.topic_specs()} == set(s.topics.values())


def test_environment_overrides(monkeypatch) -> None:
    monkeypatch.setenv("SOP_TOPIC_PREFIX", "fleet7.")
    sasl = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "u",
            "sasl.password": "p"}
    monkeypatch.setenv("SOP_KAFKA_CLIENT_CONFIG", json.dumps(sasl))
    monkeypatch.setenv("SOP_TOPIC_PARTITIONS", "12")
    s = load_settings()
    assert s.topic("steps") == "fleet7.steps"
    assert s.kafka_client_config == sasl
    assert all(t.partitions == 12 for t in s.topic_specs())


@pytest.mark.parametrize(("var", "value"), [("SOP_KAFKA_PORT", "70000"), ("SOP_PUBLISH_COMPRESSION", "brotli"),
                                            ("SOP_TOPIC_PREFIX", "bad prefix"), ("SOP_MAX_EPISODE_STEPS", "0")])
def test_bad_values_name_the_variable(monkeypatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=var):
        load_settings()


def test_no_broker_says_what_to_do(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SOP_RUN_DIR", str(tmp_path))
    monkeypatch.delenv("SOP_KAFKA_BOOTSTRAP", raising=False)
    with pytest.raises(SettingsError, match="sop up"):
        load_settings().bootstrap()
