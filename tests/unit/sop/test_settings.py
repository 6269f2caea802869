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


def test_cluster_profile_replicates_and_takes_the_endpoints_it_started(monkeypatch, tmp_path) -> None:
    from sop.settings import endpoints_file, site_environment

    monkeypatch.setenv("SOP_RUN_DIR", str(tmp_path))
    s = load_settings(profile="cluster")
    assert (s.replication_factor, s.min_insync_replicas) == (3, 2)
    assert {(t.replication_factor, t.min_insync_replicas) for t in s.topic_specs()} == {(3, 2)}
    with pytest.raises(SettingsError, match="sop up --profile cluster"):
        s.bootstrap()
    endpoints_file(s).parent.mkdir(parents=True)
    endpoints_file(s).write_text(json.dumps({
        "kafka_bootstrap": "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "mlflow_tracking_uri": "http://127.0.0.1:5",
        "lake_uri": "s3://sop/lake", "lake_storage_options": {"AWS_ENDPOINT_URL": "http://127.0.0.1:6"}}))
    monkeypatch.setenv("SOP_LAKE_URI", "s3://other/lake")  # set explicitly: wins over the endpoints
    s = load_settings(profile="cluster")
    assert s.bootstrap() == "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3" and s.tracking_uri == "http://127.0.0.1:5"
    assert s.lake_root == "s3://other/lake" and s.lake_storage_options == {"AWS_ENDPOINT_URL": "http://127.0.0.1:6"}
    env = site_environment(s)
    assert env["SOP_TOPIC_REPLICATION_FACTOR"] == "3" and env["SOP_TOPIC_MIN_INSYNC_REPLICAS"] == "2"
    assert json.loads(env["SOP_LAKE_STORAGE_OPTIONS"]) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:6"}
    embedded = load_settings()  # the same run directory, the embedded profile: no endpoints taken over
    assert embedded.replication_factor == 1 and embedded.min_insync_replicas is None
    assert embedded.tracking_uri.startswith("sqlite:///")


def test_replication_settings_are_checked_together(monkeypatch) -> None:
    monkeypatch.setenv("SOP_TOPIC_REPLICATION_FACTOR", "2")
    monkeypatch.setenv("SOP_TOPIC_MIN_INSYNC_REPLICAS", "3")
    with pytest.raises(SettingsError, match="SOP_TOPIC_MIN_INSYNC_REPLICAS"):
        load_settings()


def test_a_client_setting_not_every_client_honours_is_refused_at_start(monkeypatch) -> None:
    monkeypatch.setenv("SOP_KAFKA_CLIENT_CONFIG", '{"debug": "all"}')
    with pytest.raises(SettingsError, match="SOP_KAFKA_CLIENT_CONFIG.*'debug'"):
        load_settings()


def test_the_client_config_may_be_a_file_and_security_picks_the_principals(monkeypatch, tmp_path) -> None:
    from sop.settings import Settings

    monkeypatch.setenv("SOP_RUN_DIR", str(tmp_path))
    cfg = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "r1",
           "sasl.password": "pw"}
    path = tmp_path / "r1.json"
    path.write_text(json.dumps(cfg))
    monkeypatch.setenv("SOP_KAFKA_CLIENT_CONFIG", str(path))
    assert load_settings().kafka_client_config == cfg
    monkeypatch.setenv("SOP_KAFKA_CLIENT_CONFIG", str(tmp_path / "missing.json"))
    with pytest.raises(SettingsError, match="SOP_KAFKA_CLIENT_CONFIG.*readable file"):
        load_settings()
    monkeypatch.delenv("SOP_KAFKA_CLIENT_CONFIG")

    monkeypatch.setenv("SOP_KAFKA_SECURITY", "scram-tls")
    assert load_settings().kafka_client_config == {}  # the admin's file is written by `sop up`
    with pytest.raises(SettingsError, match="sop robot add r1"):
        load_settings(default_principal="r1")
    sec = Settings(run_dir=tmp_path).kafka_auth
    sec.client_file("sop-processor").parent.mkdir(parents=True)
    sec.client_file("sop-processor").write_text(json.dumps({**cfg, "sasl.username": "sop-processor"}))
    sec.client_file("r1").write_text(json.dumps(cfg))
    sec.identity_file("r1").parent.mkdir(parents=True)
    sec.identity_file("r1").write_text(json.dumps({"principal": "r1", "key": "A" * 43 + "="}))
    assert load_settings(default_principal="sop-processor").kafka_client_config["sasl.username"] == "sop-processor"
    monkeypatch.setenv("SOP_KAFKA_PRINCIPAL", "r1")  # the principal setting wins over the command's default
    robot = load_settings(default_principal="sop-processor")
    assert robot.kafka_client_config == cfg and robot.publish_identity_file == sec.identity_file("r1")
    monkeypatch.setenv("SOP_KAFKA_SECURITY", "tls")
    with pytest.raises(SettingsError, match="SOP_KAFKA_SECURITY"):
        load_settings()
