"""Which credentials each child of `sop run` gets: its registry role (SOP_SECURITY) and its object-store keys
(cluster profile): the processor writes, the learner reads, the robots get no lake keys."""

from __future__ import annotations

import json
from pathlib import Path

from sop.loop import ClosedLoop, LoopConfig
from sop.processes import SopProcess
from sop.settings import Settings, endpoints_file
from sop.stack import lake_role_options, registry_auth

ROLE_KEYS = {role: {"AWS_ACCESS_KEY_ID": f"key-{role}"} for role in ("processor", "learner", "analyst")}


def cluster_settings(tmp_path: Path, **kw: object) -> Settings:
    settings = Settings(run_dir=tmp_path / "run", profile="cluster", lake_uri="s3://sop/lake",
                        mlflow_tracking_uri="http://127.0.0.1:1", kafka_bootstrap="127.0.0.1:2", **kw)
    path = endpoints_file(settings)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"lake_role_options": ROLE_KEYS}))
    return settings


def test_each_child_gets_its_roles_object_store_keys(tmp_path: Path) -> None:
    loop = ClosedLoop(cluster_settings(tmp_path), LoopConfig())
    keys = {name: json.loads(loop._lake_role(name).get("SOP_LAKE_STORAGE_OPTIONS", "null"))
            for name in ("processor-0", "processor-1", "learner", "pretrain", "actor-00", "demos")}
    assert keys == {"processor-0": ROLE_KEYS["processor"], "processor-1": ROLE_KEYS["processor"],
                    "learner": ROLE_KEYS["learner"], "pretrain": ROLE_KEYS["learner"], "actor-00": {},
                    "demos": None}  # demos (set-up, by the operator) keeps the site's keys
    assert loop._registry_role("learner") == {}  # security off: no registry users


def test_role_keys_cover_only_the_clusters_own_lake(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path)
    assert lake_role_options(settings, "analyst") == ROLE_KEYS["analyst"]
    assert lake_role_options(settings.model_copy(update={"lake_uri": "s3://sop/lake/sub"}), "analyst") is not None
    for elsewhere in ("s3://sop/lakehouse", "s3://other/lake", "/tmp/lake"):
        assert lake_role_options(settings.model_copy(update={"lake_uri": elsewhere}), "analyst") is None
    assert lake_role_options(Settings(run_dir=tmp_path / "e"), "analyst") is None  # embedded: no roles


def test_with_security_each_child_runs_as_its_registry_user(tmp_path: Path) -> None:
    settings = cluster_settings(tmp_path, security=True)
    loop = ClosedLoop(settings, LoopConfig())
    users = {name: loop._registry_role(name).get("MLFLOW_TRACKING_USERNAME")
             for name in ("processor", "learner", "pretrain", "actor-01", "demos")}
    assert users == {"processor": "sop-processor", "learner": "sop-learner", "pretrain": "sop-learner",
                     "actor-01": "sop-actor", "demos": ""}
    auth = registry_auth(settings)
    assert loop._registry_role("actor-01")["MLFLOW_TRACKING_PASSWORD"] == auth.credentials("actor").password
    assert auth.credentials("actor").password != auth.credentials("learner").password


def test_with_both_switches_each_child_gets_its_principal_registry_user_keys_and_metrics_port(
        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001 - pytest's MonkeyPatch
    """`sop up --secure` turns on Kafka security and the registry's roles: every child of `sop run` must then get
    all of its own at once (its Kafka principal, its registry user, its object-store keys, its metrics port)."""
    for var in ("SOP_PROCESSOR_METRICS_PORT", "SOP_LEARN_METRICS_PORT", "SOP_ACTOR_METRICS_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(SopProcess, "start", lambda self: self)  # nothing runs: only what each would be given
    settings = cluster_settings(tmp_path, security=True, kafka_security="scram-tls", processor_metrics_port=9300)
    monkeypatch.setenv("SOP_ACTOR_METRICS_PORT", "9400")
    loop = ClosedLoop(settings, LoopConfig(actors=2, processors=2))
    loop.start()
    env = {name: child.env for name, child in loop.children.items()}
    assert set(env) == {"processor-0", "processor-1", "learner", "actor-00", "actor-01"}
    expect = {"processor-0": ("sop-processor", "sop-processor", ROLE_KEYS["processor"], "9300"),
              "processor-1": ("sop-processor", "sop-processor", ROLE_KEYS["processor"], "9301"),
              "learner": ("sop-tools", "sop-learner", ROLE_KEYS["learner"], None),
              "actor-00": ("actor-00", "sop-actor", {}, "9400"),
              "actor-01": ("actor-01", "sop-actor", {}, "9401")}
    for name, (principal, user, keys, port) in expect.items():
        e = env[name]
        assert e["SOP_KAFKA_SECURITY"] == "scram-tls" and e["SOP_SECURITY"] == "true", name
        assert (e["SOP_KAFKA_PRINCIPAL"], e["MLFLOW_TRACKING_USERNAME"]) == (principal, user), name
        assert json.loads(e["SOP_LAKE_STORAGE_OPTIONS"]) == keys, name
        port_var = "SOP_PROCESSOR_METRICS_PORT" if name.startswith("processor") else "SOP_ACTOR_METRICS_PORT"
        if port is not None:
            assert e[port_var] == port, name
