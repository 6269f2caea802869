"""The registry-following policy source: switching, refusing broken versions, riding out registry outages.

The first tests drive ``poll_once`` with a scripted registry (resolver + loader); the last ones use a real
SQLite MLflow registry with real versions (data: a declared architecture, files pinned by hashes), including
broken, tampered and pickled ones.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from producer_fakes import ConstantPolicy

from infra.model_versions import LocalVersion
from producers.policies import register_policy_config
from producers.registry_source import (
    NoPolicyYetError,
    PolicyRefusedError,
    RegistryPolicySource,
    RegistrySourceConfig,
    default_probe,
    registry_unreachable,
    vet_policy,
)
from sim.expert import ExpertPolicy
from sim.expert_version import build_expert, register_expert_policy
from sim.tasks import DEFAULT_SUITE, instruction_for

PROBE = default_probe(DEFAULT_SUITE[0], instruction_for(DEFAULT_SUITE[0]))

pytestmark = pytest.mark.filterwarnings("ignore")


class FakeRegistry:
    """An alias that tests move, and versions that load into whatever the test registered."""

    def __init__(self) -> None:
        self.alias: str | None = None
        self.versions: dict[str, object] = {}
        self.loads: list[str] = []
        self.down = False

    def resolve(self) -> str | None:
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.alias

    def load(self, version: str, directory: str) -> object:
        self.loads.append(version)
        made = self.versions[version]
        if isinstance(made, Exception):
            raise made
        return made

    def promote(self, version: str, policy: object) -> None:
        self.versions[version] = policy
        self.alias = version


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source_for(registry: FakeRegistry, **config: object) -> RegistryPolicySource:
    return RegistryPolicySource(RegistrySourceConfig(tracking_uri="unused", **config),  # type: ignore[arg-type]
                                probe=PROBE,
                                loader=registry.load, resolver=registry.resolve, clock=FakeClock())


def test_nothing_to_answer_before_the_alias_exists() -> None:
    registry = FakeRegistry()
    source = source_for(registry)
    assert source.poll_once() is False
    with pytest.raises(NoPolicyYetError, match="alias is not set"):
        source.current()
    assert source.version is None and source.history == []


def test_switches_to_each_new_version_and_back_on_rollback() -> None:
    registry = FakeRegistry()
    source = source_for(registry)
    registry.promote("1", ConstantPolicy(version="1"))
    assert source.poll_once() is True
    assert source.current().version == source.version == "1"
    assert source.poll_once() is False  # same version: no reload
    registry.promote("2", ConstantPolicy(version="2"))
    assert source.poll_once() is True and source.version == "2"
    registry.alias = "1"  # rollback
    assert source.poll_once() is True and source.version == "1"
    assert [(s.version, s.previous) for s in source.history] == [("1", None), ("2", "1"), ("1", "2")]
    assert registry.loads == ["1", "2", "1"]
    assert all(s.loaded_at >= s.seen_at and s.load_s >= 0 for s in source.history)


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        (RuntimeError("load_context exploded"), "RuntimeError: load_context exploded"),
        (ConstantPolicy(action=(0.0, 0.0, 0.0), version="2"), r"shape \(3,\)"),
        (ConstantPolicy(action=(0.0, np.nan, 0.0, 0.0), version="2"), "non-finite"),
        (ConstantPolicy(version="7"), "says it is version '7'"),
        (object(), "not a policy"),
    ],
    ids=["load-raises", "wrong-shape", "nan", "wrong-version", "not-a-policy"],
)
def test_a_broken_version_is_refused_once_and_the_current_one_kept(broken: object, why: str) -> None:
    registry = FakeRegistry()
    source = source_for(registry)
    registry.promote("1", ConstantPolicy(version="1"))
    source.poll_once()
    registry.promote("2", broken)
    for _ in range(5):
        assert source.poll_once() is False
    assert source.current().version == "1"
    assert registry.loads == ["1", "2"]  # refused once, not reloaded at every poll
    assert source.refused_count == 1 and list(source.refused) == ["2"]
    assert source.last_error is not None and source.last_error.startswith("version 2: ")
    assert re.search(why, source.last_error)
    registry.promote("3", ConstantPolicy(version="3"))  # the next good version is taken
    assert source.poll_once() is True and source.version == "3"


def test_act_raising_on_the_probe_is_refused() -> None:
    class Raises(ConstantPolicy):
        def act(self, observation):  # type: ignore[no-untyped-def]
            raise KeyError("camera 'wrist' missing")

    with pytest.raises(PolicyRefusedError, match="act\\(\\) on a probe observation raised KeyError"):
        vet_policy(Raises(version="1"), version="1", probe=PROBE, action_dim=4)


def test_a_refused_version_is_retried_after_the_configured_delay() -> None:
    registry = FakeRegistry()
    source = source_for(registry, retry_refused_after_s=30.0)
    registry.promote("1", RuntimeError("artifact store hiccup"))
    source.poll_once()
    source._clock.now += 10  # type: ignore[attr-defined]
    source.poll_once()
    assert registry.loads == ["1"]
    registry.versions["1"] = ConstantPolicy(version="1")
    source._clock.now += 25  # type: ignore[attr-defined]
    assert source.poll_once() is True and source.version == "1" and source.refused == {}


def test_registry_outage_is_counted_and_the_policy_kept() -> None:
    registry = FakeRegistry()
    source = source_for(registry)
    registry.promote("1", ConstantPolicy(version="1"))
    source.poll_once()
    registry.down = True
    for _ in range(3):
        assert source.poll_once() is False
    assert source.poll_errors == 3 and "unreachable" in (source.last_poll_error or "")
    assert source.current().version == "1"
    registry.down = False
    registry.promote("2", ConstantPolicy(version="2"))
    assert source.poll_once() is True and source.last_poll_error is None


def test_a_download_the_registry_cut_short_is_tried_again_not_refused() -> None:
    import requests
    from mlflow.exceptions import MlflowException

    registry = FakeRegistry()
    source = source_for(registry)
    registry.promote("1", ConstantPolicy(version="1"))
    source.poll_once()
    try:  # as MLflow reports a download whose retries ran out while the server restarted
        raise requests.ConnectionError("Connection refused")
    except requests.ConnectionError:
        try:
            raise MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/... failed")
        except MlflowException as exc:
            cut_short = exc
    registry.promote("2", cut_short)
    assert source.poll_once() is False
    assert source.refused == {} and source.poll_errors == 1 and "downloading version 2" in source.last_poll_error
    assert source.current().version == "1"
    registry.versions["2"] = ConstantPolicy(version="2")  # the registry is back
    assert source.poll_once() is True and source.current().version == "2"
    assert registry.loads == ["1", "2", "2"]


def test_what_counts_as_the_registry_not_answering() -> None:
    import requests
    import urllib3
    from mlflow.exceptions import MlflowException

    assert registry_unreachable(ConnectionRefusedError(111, "refused"))
    assert registry_unreachable(requests.ReadTimeout("read timed out"))
    assert registry_unreachable(urllib3.exceptions.ProtocolError("Connection aborted"))
    assert registry_unreachable(MlflowException("API request to http://h/api failed with exception "
                                                "HTTPConnectionPool(host='h', port=1): Max retries exceeded"))
    assert not registry_unreachable(MlflowException("RESOURCE_DOES_NOT_EXIST: version 9"))
    assert not registry_unreachable(ValueError("weights of the wrong shape"))
    assert not registry_unreachable(PolicyRefusedError("act returned NaN"))


def test_background_thread_follows_the_alias_and_current_never_blocks() -> None:
    registry = FakeRegistry()
    gate = threading.Event()
    downloading = threading.Event()

    def slow_load(version: str, directory: str) -> object:
        if version == "2":
            downloading.set()
            gate.wait(10)  # a long download
        return registry.load(version, directory)

    source = RegistryPolicySource(RegistrySourceConfig(tracking_uri="unused", poll_interval_s=0.01), probe=PROBE,
                                  loader=slow_load, resolver=registry.resolve)
    with pytest.raises(NoPolicyYetError):
        source.wait_ready(0.05)
    registry.promote("1", ConstantPolicy(version="1"))
    with source:
        assert source.wait_ready(10).version == "1"
        registry.promote("2", ConstantPolicy(version="2"))
        assert downloading.wait(10)
        for _ in range(20):  # while version 2 downloads, current() keeps answering version 1 at once
            assert source.current().version == "1"
        gate.set()
        deadline = time.monotonic() + 10
        while source.version != "2" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert source.version == "2"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="poll_interval_s"):
        RegistrySourceConfig(tracking_uri="x", poll_interval_s=0)
    with pytest.raises(ValueError, match="tracking_uri"):
        RegistrySourceConfig(tracking_uri="")
    with pytest.raises(ValueError, match="retry_refused_after_s"):
        RegistrySourceConfig(tracking_uri="x", retry_refused_after_s=-1)


# -- a real MLflow registry ----------------------------------------------------------------------------------

class WrongShape:
    def __init__(self, version: str) -> None:
        self.version = version

    def act(self, observation):  # type: ignore[no-untyped-def]
        return np.zeros(7, np.float32)


def corrupt_weights(local: LocalVersion) -> object:
    raise RuntimeError(f"weights file is corrupt ({local.file('weights.bin').stat().st_size} bytes)")


ARCHITECTURES = {"scripted-expert": build_expert, "corrupt": corrupt_weights,
                 "wrong-shape": lambda local: WrongShape(local.version)}


def test_follows_a_real_mlflow_alias_and_refuses_broken_versions(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    art = str(tmp_path / "art")
    source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=uri, download_root=str(tmp_path / "dl"),
                                                       architectures=ARCHITECTURES), probe=PROBE)
    assert source.poll_once() is False  # no registered model yet
    assert register_expert_policy(uri, noise_sigma=0.0, artifact_location=art) == "1"
    assert source.poll_once() is True
    assert isinstance(source.current(), ExpertPolicy) and source.version == "1"
    weights = lambda d: (d / "weights.bin").write_bytes(b"\0" * 64)  # noqa: E731
    assert register_policy_config("corrupt", {}, uri, files=weights) == "2"
    assert source.poll_once() is False and "weights file is corrupt (64 bytes)" in source.refused["2"]
    assert register_policy_config("wrong-shape", {}, uri) == "3"
    assert source.poll_once() is False and "shape (7,)" in source.refused["3"]
    assert register_policy_config("their-net", {}, uri) == "4"
    assert source.poll_once() is False and "'their-net', which this process has no code for" in source.refused["4"]
    assert register_expert_policy(uri, noise_sigma=0.0, alias=None) == "5"
    client = MlflowClient(uri)
    config = Path(client.get_model_version_download_uri("sop-policy", "5").removeprefix("file://")) / "config.json"
    config.write_text(config.read_text().replace('"noise_sigma": 0.0', '"noise_sigma": 1.0'))  # in the store
    client.set_registered_model_alias("sop-policy", "champion", "5")
    assert source.poll_once() is False and "config.json has SHA-256" in source.refused["5"]
    assert source.current().version == "1"
    assert register_expert_policy(uri, noise_sigma=0.0) == "6"
    assert source.poll_once() is True and source.version == "6"
    # only the running version and the one before it stay on disk
    kept = sorted(p.name.split("-")[0] for p in (tmp_path / "dl").iterdir())
    assert kept == ["v1", "v6"]


def test_a_canary_follows_the_candidate_and_the_champion_while_there_is_none(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert register_expert_policy(uri, noise_sigma=0.0, artifact_location=str(tmp_path / "art")) == "1"  # champion
    source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=uri, alias="candidate", fallback_alias="champion",
                                                       download_root=str(tmp_path / "dl"),
                                                       architectures=ARCHITECTURES), probe=PROBE)
    assert source.poll_once() is True and source.version == "1"  # no candidate yet: the champion
    assert register_expert_policy(uri, noise_sigma=0.0, alias="candidate") == "2"
    assert source.poll_once() is True and source.version == "2"
    assert register_expert_policy(uri, noise_sigma=0.0, alias="champion") == "3"
    assert source.poll_once() is False and source.version == "2"  # the candidate is set: the champion is not followed
    with pytest.raises(ValueError, match="fallback_alias"):
        RegistrySourceConfig(tracking_uri="x", alias="candidate", fallback_alias="candidate")
