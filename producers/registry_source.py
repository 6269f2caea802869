"""The registry-following :class:`~producers.interfaces.PolicySource`: the fleet follows an MLflow alias.

    source = RegistryPolicySource(RegistrySourceConfig(tracking_uri=uri, architectures={"sop-vla": build}),
                                  probe=robot.reset(seed=1)).start()
    policy = source.wait_ready(timeout_s=60)       # the first version (blocks once, at start-up)
    policy = source.current()                      # then: the newest loaded version, never blocks
    source.version, source.history, source.refused # what runs, every switch, every refused version

A background thread resolves ``models:/NAME@ALIAS`` every ``poll_interval_s`` (or, while that alias is unset,
``fallback_alias``: a canary robot follows ``candidate`` and plays the champion until there is one). When the alias points at
a version that is neither running nor refused, the thread downloads it, checks the SHA-256 of every file
against the version's tags (a tampered, incomplete or pickled version is refused before any file is read),
builds it with this process's own code for its declared architecture (``RegistrySourceConfig.architectures``;
an unknown architecture is refused), then *vets* it: the object must be a policy (``act`` and ``version``), carry the version it was loaded as, and answer
``act(probe)`` with a finite action of shape ``(action_dim,)``. Only then does :meth:`current` answer
it; the actor picks it up at its next episode. A version that fails any of that is refused: logged,
counted, its error kept, and remembered so the poller does not reload it on every poll (unless
``retry_refused_after_s``); the actor keeps the version it has. Registry outages are counted and
retried at the next poll — also one that cuts a download short: a version is refused for what it is, never
because the registry did not answer (:func:`registry_unreachable`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from infra.model_versions import Builder
from infra.registry import registry_client
from producers.interfaces import Observation, Policy
from producers.policies import DEFAULT_ALIAS, DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

LOG = logging.getLogger("sop.actor.registry")

PROBE_STATE_DIM = 39  # MetaWorld's state vector; a real robot passes its own observation as the probe


class NoPolicyYetError(RuntimeError):
    """No version has been loaded yet (the alias is unset, unreachable, or every version was refused)."""


class PolicyRefusedError(RuntimeError):
    """A registered version could not be loaded or failed the checks on its behaviour."""


@dataclass(frozen=True, kw_only=True)
class RegistrySourceConfig:
    tracking_uri: str
    registry_uri: str | None = None  # None: the tracking URI
    model_name: str = DEFAULT_MODEL_NAME
    alias: str = DEFAULT_ALIAS
    # followed while ``alias`` is not set (a canary follows ``candidate``, and ``champion`` before any candidate)
    fallback_alias: str | None = None
    poll_interval_s: float = 0.5
    action_dim: int = 4
    download_root: str | None = None  # None: a temporary directory, removed by close()
    retry_refused_after_s: float | None = None  # None: a refused version is never loaded again
    # architecture name -> this process's builder (a verified version -> a Policy); `sop actor` passes SOP's own
    architectures: Mapping[str, Builder] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tracking_uri:
            raise ValueError("RegistrySourceConfig.tracking_uri is empty: set SOP_MLFLOW_TRACKING_URI or run `sop up`")
        if not self.model_name or not self.alias:
            raise ValueError(
                f"RegistrySourceConfig.model_name and alias must be non-empty, got {self.model_name!r}@{self.alias!r}"
            )
        if self.fallback_alias is not None and self.fallback_alias in ("", self.alias):
            raise ValueError(f"RegistrySourceConfig.fallback_alias must be another alias than {self.alias!r}, got "
                             f"{self.fallback_alias!r}")
        if not self.poll_interval_s > 0:
            raise ValueError(f"RegistrySourceConfig.poll_interval_s must be > 0, got {self.poll_interval_s}")
        if self.action_dim < 1:
            raise ValueError(f"RegistrySourceConfig.action_dim must be >= 1, got {self.action_dim}")
        if self.retry_refused_after_s is not None and not self.retry_refused_after_s > 0:
            raise ValueError(
                f"RegistrySourceConfig.retry_refused_after_s must be > 0 or None, got {self.retry_refused_after_s}"
            )

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


@dataclass(frozen=True)
class Switch:
    """The source started answering ``version`` (times are wall-clock seconds, ``time.time()``)."""

    version: str
    previous: str | None
    seen_at: float  # the poll that saw the alias on this version
    loaded_at: float  # when current() started answering it
    load_s: float  # download + load + checks


@dataclass(frozen=True)
class Refusal:
    version: str
    error: str
    at: float


def default_probe(task: str, instruction: str, *, image_size: int = 64, camera: str = "corner") -> Observation:
    """A neutral observation of ``task`` to vet a version with when no robot observation is at hand."""
    return Observation(
        images={camera: np.zeros((image_size, image_size, 3), dtype=np.uint8)},
        proprio=np.zeros(PROBE_STATE_DIM, dtype=np.float32),
        instruction=instruction,
        task=task,
    )


def registry_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the registry not answering — connection refused or reset, a
    timeout, retries exhausted — rather than something wrong with the version it served."""
    import requests
    import urllib3

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout
                      | urllib3.exceptions.HTTPError):
            return True
        # MLflow's client reports exhausted retries as MlflowException("API request to ... failed with exception
        # HTTPConnectionPool(...): Max retries exceeded ...") without chaining the requests error
        if type(cause).__name__ == "MlflowException" and "Max retries exceeded" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def vet_policy(policy: object, *, version: str, probe: Observation, action_dim: int) -> Policy:
    """``policy`` if it acts like version ``version`` of a policy on ``probe``; else PolicyRefusedError."""
    if not callable(getattr(policy, "act", None)) or not hasattr(policy, "version"):
        raise PolicyRefusedError(f"{type(policy).__name__} is not a policy: it needs act(observation) and .version")
    if str(policy.version) != version:
        raise PolicyRefusedError(f"loaded as version {version} but says it is version {policy.version!r}")
    try:
        action = np.asarray(policy.act(probe), dtype=np.float32)
    except Exception as exc:
        raise PolicyRefusedError(f"act() on a probe observation raised {type(exc).__name__}: {exc}") from exc
    if action.shape != (action_dim,):
        raise PolicyRefusedError(f"act() returned shape {action.shape}, the robot needs ({action_dim},)")
    if not np.all(np.isfinite(action)):
        raise PolicyRefusedError(f"act() returned non-finite values {action.tolist()}")
    return policy  # type: ignore[return-value]


Loader = Callable[[str, str], Policy]  # (version, download dir) -> loaded policy
Resolver = Callable[[], "str | None"]  # the version the alias points at now; None: no such alias (yet)


class RegistryPolicySource:
    """Implements :class:`~producers.interfaces.PolicySource` by following a registry alias (see module doc).

    ``loader`` and ``resolver`` default to MLflow (``load_policy_from_registry`` of ``models:/NAME/N``, and
    the alias lookup); tests pass their own. ``clock`` gives the wall-clock times in :attr:`history`.
    """

    def __init__(
        self,
        config: RegistrySourceConfig,
        *,
        probe: Observation,
        loader: Loader | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.probe = probe  # the robot's own first observation, or default_probe(task, instruction)
        self._loader = loader or self._load_from_mlflow
        self._resolver = resolver or self._resolve_with_mlflow
        self._clock = clock
        self._client: MlflowClient | None = None
        self._root: Path | None = None if config.download_root is None else Path(config.download_root)
        self._own_root = config.download_root is None
        self._dirs: dict[str, Path] = {}  # version -> its download directory
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._policy: Policy | None = None
        self._history: list[Switch] = []
        self._refusals: list[Refusal] = []
        self._refused: dict[str, Refusal] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0
        self.poll_errors = 0
        self.last_poll_error: str | None = None
        self.alias_version: str | None = None  # what the alias pointed at on the last successful poll

    # -- PolicySource ------------------------------------------------------------------------------------------
    def current(self) -> Policy:
        policy = self._policy
        if policy is None:
            raise NoPolicyYetError(self._not_ready_reason())
        return policy

    # -- life cycle --------------------------------------------------------------------------------------------
    def start(self) -> RegistryPolicySource:
        """Start polling in a daemon thread (the first poll happens at once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"policy-poller-{self.config.alias}", daemon=True)
            self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> Policy:
        """Block until a version is loaded (start-up only); NoPolicyYetError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._ready:
            while self._policy is None:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise NoPolicyYetError(self._not_ready_reason())
                self._ready.wait(min(left, 0.2))
            return self._policy

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop polling and delete the downloads (when the source owns the directory)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._own_root and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> RegistryPolicySource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it runs --------------------------------------------------------------------------------------------
    @property
    def version(self) -> str | None:
        """The version :meth:`current` answers (None before the first load)."""
        policy = self._policy
        return None if policy is None else str(policy.version)

    @property
    def history(self) -> list[Switch]:
        with self._lock:
            return list(self._history)

    @property
    def refusals(self) -> list[Refusal]:
        """Every refusal, oldest first (a version retried after ``retry_refused_after_s`` may appear twice)."""
        with self._lock:
            return list(self._refusals)

    @property
    def refused(self) -> dict[str, str]:
        """Version -> the error it was refused with."""
        with self._lock:
            return {v: r.error for v, r in self._refused.items()}

    @property
    def refused_count(self) -> int:
        return len(self._refusals)

    @property
    def last_error(self) -> str | None:
        """The latest refusal as ``"version N: error"`` (None if none)."""
        with self._lock:
            last = self._refusals[-1] if self._refusals else None
        return None if last is None else f"version {last.version}: {last.error}"

    # -- polling -------------------------------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """One poll: resolve the alias and, for a new version, load and vet it. True if the source switched."""
        self.polls += 1
        seen_at = self._clock()
        try:
            version = self._resolver()
        except Exception as exc:  # registry down, network: try again at the next poll
            self.poll_errors += 1
            message = f"{type(exc).__name__}: {exc}"
            if message != self.last_poll_error:
                LOG.warning("cannot resolve %s (will keep polling): %s", self.config.model_uri, message)
            self.last_poll_error = message
            return False
        self.last_poll_error = None
        self.alias_version = version
        if version is None or version == self.version or not self._should_try(version):
            return False
        return self._switch_to(version, seen_at)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug here must not kill the poller: the fleet would silently stop following
                LOG.exception("policy poller failed; it keeps polling")
            self._stop.wait(self.config.poll_interval_s)

    def _should_try(self, version: str) -> bool:
        refusal = self._refused.get(version)
        if refusal is None:
            return True
        retry = self.config.retry_refused_after_s
        return retry is not None and self._clock() - refusal.at >= retry

    def _switch_to(self, version: str, seen_at: float) -> bool:
        started = time.perf_counter()
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="sop-policies-"))
        directory = self._root / f"v{version}-{uuid.uuid4().hex[:6]}"
        directory.mkdir(parents=True, exist_ok=True)
        try:
            loaded = self._loader(version, str(directory))
            policy = vet_policy(loaded, version=version, probe=self.probe, action_dim=self.config.action_dim)
        except Exception as exc:
            shutil.rmtree(directory, ignore_errors=True)
            if registry_unreachable(exc):  # the download failed, not the version: try again at the next poll
                self.poll_errors += 1
                self.last_poll_error = f"downloading version {version}: {type(exc).__name__}: {exc}"
                LOG.warning("could not download %s version %s, keeping version %s (will try again): %s",
                            self.config.model_name, version, self.version, exc)
                return False
            self._refuse(version, exc)
            return False
        load_s = time.perf_counter() - started
        with self._ready:
            previous = self.version
            self._policy = policy
            self._history.append(Switch(version, previous, seen_at, self._clock(), load_s))
            self._refused.pop(version, None)
            self._ready.notify_all()
        self._dirs[version] = directory
        self._forget_downloads(keep={version, previous})
        LOG.info("now acting with %s version %s (was %s; loaded in %.2fs)", self.config.model_name, version,
                 previous, load_s)
        return True

    def _refuse(self, version: str, exc: Exception) -> None:
        error = str(exc) if isinstance(exc, PolicyRefusedError) else f"{type(exc).__name__}: {exc}"
        refusal = Refusal(version, error, self._clock())
        with self._lock:
            self._refused[version] = refusal
            self._refusals.append(refusal)
        LOG.error("refused %s version %s, keeping version %s: %s", self.config.model_name, version, self.version,
                  error)

    def _forget_downloads(self, *, keep: set[str | None]) -> None:
        for version in [v for v in self._dirs if v not in keep]:
            shutil.rmtree(self._dirs.pop(version), ignore_errors=True)

    def _not_ready_reason(self) -> str:
        parts = [f"no version of {self.config.model_uri} is loaded yet"]
        if self.last_poll_error:
            parts.append(f"the registry did not answer: {self.last_poll_error}")
        elif self.polls and self.alias_version is None:
            parts.append("the alias is not set: register a policy (e.g. `sop actor --register-expert-if-missing`)")
        if self._refusals:
            parts.append(f"refused {self.last_error}")
        return "; ".join(parts)

    # -- MLflow ------------------------------------------------------------------------------------------------
    def _mlflow_client(self) -> MlflowClient:
        if self._client is None:

            uri = self.config.tracking_uri
            self._client = registry_client(uri, self.config.registry_uri)
        return self._client

    def _resolve_with_mlflow(self) -> str | None:
        version = self._resolve_alias(self.config.alias)
        if version is None and self.config.fallback_alias is not None:
            return self._resolve_alias(self.config.fallback_alias)
        return version

    def _resolve_alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self._mlflow_client().get_model_version_by_alias(self.config.model_name, alias)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc):
                return None  # nothing registered under that name or alias yet
            raise
        return str(found.version)

    def _load_from_mlflow(self, version: str, directory: str) -> Policy:
        from producers.policies import load_policy_from_registry

        return load_policy_from_registry(
            f"models:/{self.config.model_name}/{version}",
            architectures=self.config.architectures,
            tracking_uri=self.config.tracking_uri,
            registry_uri=self.config.registry_uri,
            dst_path=directory,
        )
