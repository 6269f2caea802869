"""Registry roles against a real `mlflow server --app-name basic-auth` (the embedded profile's, as `sop up` starts it
with SOP_SECURITY=true): actors only read ``sop-policy``, the processor only reads ``sop-value``, the learner
registers and moves aliases, and nobody without credentials gets anything."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.model_versions import fetch_version
from infra.registry_auth import Credentials, add_user, as_user, remove_user
from producers.registry_source import RegistryPolicySource, RegistrySourceConfig, default_probe
from sim.expert_version import build_expert, register_expert_policy
from sim.tasks import DEFAULT_SUITE, instruction_for
from sop import stack
from sop.settings import Settings, resolve_profile

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


@dataclass
class SecureRegistry:
    url: str
    settings: Settings

    def creds(self, role: str) -> Credentials:
        return stack.registry_auth(self.settings).credentials(role)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureRegistry]:
    settings = Settings(run_dir=tmp_path_factory.mktemp("secure") / "run", security=True)
    url = stack.registry_up(settings)
    try:
        resolved = resolve_profile(settings)
        assert resolved.tracking_uri == url  # every process of this run directory finds the server
        yield SecureRegistry(url, resolved)
    finally:
        stack.local_registry_server(settings, auth=False).stop()


def denied(call: object) -> str:
    with pytest.raises(MlflowException) as caught:
        call()  # type: ignore[operator]
    message = str(caught.value)
    assert "403" in message or "401" in message, message
    return message


def test_credentials_are_generated_once_and_kept_private(registry: SecureRegistry) -> None:
    path = registry.settings.run_path / "security" / "registry" / "registry-users.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = json.loads(path.read_text())["users"]
    assert {u["role"] for u in users.values()} == {"learner", "processor", "actor"}
    assert stack.registry_up(registry.settings) == registry.url  # a second `sop up` keeps users and passwords
    assert json.loads(path.read_text())["users"] == users


def test_an_actor_reads_the_policy_but_cannot_register_a_version_or_move_the_alias(registry: SecureRegistry,
                                                                                    tmp_path: Path) -> None:
    with as_user(registry.creds("learner")):
        first = register_expert_policy(registry.url, noise_sigma=0.1)  # the learner registers, moves @champion
        second = register_expert_policy(registry.url, noise_sigma=0.2, alias=None)
    with as_user(registry.creds("actor")):
        client = MlflowClient(registry.url)
        assert str(client.get_model_version_by_alias("sop-policy", "champion").version) == first
        local = fetch_version(client, "sop-policy", first, dst=tmp_path / "dl")  # and downloads its files
        assert local.architecture == "scripted-expert"
        assert "403" in denied(lambda: register_expert_policy(registry.url, noise_sigma=0.0))
        assert "403" in denied(lambda: client.set_registered_model_alias("sop-policy", "champion", second))
        denied(lambda: client.set_model_version_tag("sop-policy", first, "sop.sha256.config.json", "0" * 64))
        denied(lambda: client.delete_model_version("sop-policy", first))
        denied(lambda: client.delete_registered_model_alias("sop-policy", "champion"))
        denied(lambda: client.get_registered_model("sop-value"))
        denied(lambda: client.create_run(client.get_experiment_by_name("sop").experiment_id))
    with as_user(registry.creds("admin")):
        assert str(MlflowClient(registry.url).get_model_version_by_alias("sop-policy", "champion").version) == first


def test_the_processor_reads_the_value_model_only(registry: SecureRegistry) -> None:
    with as_user(registry.creds("processor")):
        client = MlflowClient(registry.url)
        assert client.get_registered_model("sop-value").name == "sop-value"
        denied(lambda: client.get_model_version_by_alias("sop-policy", "champion"))
        denied(lambda: client.set_registered_model_alias("sop-value", "champion", "1"))


def test_no_or_wrong_credentials_get_nothing(registry: SecureRegistry) -> None:
    client = MlflowClient(registry.url)
    assert "401" in denied(lambda: client.get_registered_model("sop-policy"))  # no credentials
    with as_user(Credentials("sop-actor", "not-the-password")):
        assert "401" in denied(lambda: client.get_registered_model("sop-policy"))


def test_a_robot_of_its_own_follows_the_alias_until_it_is_removed(registry: SecureRegistry) -> None:
    robot = add_user(registry.url, registry.creds("admin"), "robot-17", role="actor")
    task = DEFAULT_SUITE[0]
    with as_user(robot):
        source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=registry.url,
                                                           architectures={"scripted-expert": build_expert}),
                                      probe=default_probe(task, instruction_for(task)))
        try:
            assert source.poll_once() is True and source.version is not None
            assert remove_user(registry.url, registry.creds("admin"), "robot-17")
            assert source.poll_once() is False and source.poll_errors == 1 and "401" in (source.last_poll_error or "")
        finally:
            source.close()
    assert not remove_user(registry.url, registry.creds("admin"), "robot-17")
