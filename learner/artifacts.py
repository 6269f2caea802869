"""A version's files: the weights (``state_dict``), the model config as JSON (normalisation statistics are
buffers inside the weights) and the instruction embeddings it was trained with; and the check that keeps
a NaN/Inf model out of the registry.

    paths = write_artifacts(tmp, kind="policy", model=model, config=model.config, embeddings=table,
                            extra={"condition": "positive", "cfg_beta": 1.0})
    runtime = policy_from_artifacts(paths, version="3")      # PolicyRuntime, ready to act

MiniLM is loaded only for an instruction the artifact has no embedding for (``_embedding_fallback``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learner.config import ModelConfig, ValueConfig, from_dict, to_dict
from learner.model import PolicyRuntime, VLAPolicy
from learner.text import EmbeddingTable, SentenceEncoder
from learner.value import ValueModel, ValueRuntime

FORMAT_VERSION = 1

WEIGHTS = "weights"
CONFIG = "config"
INSTRUCTIONS = "instructions"
FILES = {WEIGHTS: "weights.pt", CONFIG: "config.json", INSTRUCTIONS: "instructions.npz"}


def _embedding_fallback() -> SentenceEncoder:
    return SentenceEncoder()


def artifact_paths(directory: Path) -> dict[str, str]:
    """MLflow's artifact map (name -> path) for the files of one version in ``directory``."""
    return {key: str(directory / file) for key, file in FILES.items()}


def write_artifacts(directory: Path, *, kind: str, model: torch.nn.Module, config: ModelConfig | ValueConfig,
                    embeddings: Mapping[str, np.ndarray], extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write weights, config JSON and instruction embeddings into ``directory``; returns MLflow's artifact map."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = artifact_paths(directory)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, paths[WEIGHTS])
    meta = {"format": FORMAT_VERSION, "kind": kind, "config": to_dict(config), **(extra or {})}
    Path(paths[CONFIG]).write_text(json.dumps(meta, indent=2, sort_keys=True))
    EmbeddingTable(embeddings).save(Path(paths[INSTRUCTIONS]))
    return paths


def artifact_kind(artifacts: Mapping[str, str]) -> str:
    """``"policy"`` or ``"value"``: what the files in ``artifacts`` hold."""
    return str(json.loads(Path(artifacts[CONFIG]).read_text())["kind"])


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
