"""A version's files, as data: the weights (``state_dict`` in safetensors, tensors only; the normalisation
statistics are buffers among them), ``config.json`` declaring the architecture and its settings, and the
instruction embeddings it was trained with (``.npz``, read without pickle); the builders that turn a verified
version back into a runtime; and the check that keeps a NaN/Inf model out of the registry.

    write_artifacts(tmp, kind="policy", model=model, config=model.config, embeddings=table,
                    extra={"condition": "positive", "cfg_beta": 1.0})
    runtime = policy_from_version(local)        # local: infra.model_versions.LocalVersion (hash-checked)

The architectures are ``sop-vla`` (:class:`~learner.model.VLAPolicy`) and ``sop-value``
(:class:`~learner.value.ValueModel`): the receiving process instantiates them from the declared config with this
code; ``infra.model_versions`` verifies every file's SHA-256 against the registry's tags first.

Versions of the first format (``weights.pt`` under ``artifacts/`` beside a pickled pyfunc) are read by
:func:`legacy_runtime` for ``sop registry convert`` and the learner's resume only: ``torch.load(weights_only=True)``
on the weights, the pickle is never opened. MiniLM is loaded only for an instruction the artifact has no
embedding for (``_embedding_fallback``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from infra.model_versions import WEIGHTS_FILE, LocalVersion, VersionRefused, write_config
from learner.config import ModelConfig, ValueConfig, from_dict, to_dict
from learner.model import PolicyRuntime, VLAPolicy
from learner.text import EmbeddingTable, SentenceEncoder
from learner.value import ValueModel, ValueRuntime

POLICY_ARCHITECTURE = "sop-vla"
VALUE_ARCHITECTURE = "sop-value"
ARCHITECTURES = {"policy": POLICY_ARCHITECTURE, "value": VALUE_ARCHITECTURE}
INSTRUCTIONS_FILE = "instructions.npz"
LEGACY_FORMAT_VERSION = 1
LEGACY_FILES = {"weights": "weights.pt", "config": "config.json", "instructions": "instructions.npz"}


def _embedding_fallback() -> SentenceEncoder:
    return SentenceEncoder()


def write_artifacts(directory: Path, *, kind: str, model: torch.nn.Module, config: ModelConfig | ValueConfig,
                    embeddings: Mapping[str, np.ndarray], extra: Mapping[str, Any] | None = None) -> None:
    """Write ``weights.safetensors``, ``config.json`` and ``instructions.npz`` of one version into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    write_config(directory, kind=kind, architecture=ARCHITECTURES[kind], config=to_dict(config), **(extra or {}))
    EmbeddingTable(embeddings).save(directory / INSTRUCTIONS_FILE)


def _load_state(model: torch.nn.Module, weights: Path) -> None:
    if weights.suffix == ".safetensors":
        state = load_file(str(weights), device="cpu")
    else:  # a first-format version: a state_dict, read without unpickling anything but tensors
        state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise VersionRefused(f"the weights do not fit the declared architecture: {exc}") from None
    model.eval()


def _policy(config: Mapping[str, Any], weights: Path, instructions: Path, version: str) -> PolicyRuntime:
    model = VLAPolicy(from_dict(ModelConfig, config["config"]))
    _load_state(model, weights)
    text = EmbeddingTable.load(instructions, fallback=_embedding_fallback)
    return PolicyRuntime(model, text, version=version, condition=config["condition"], cfg_beta=config["cfg_beta"])


def _value(config: Mapping[str, Any], weights: Path, instructions: Path, version: str) -> ValueRuntime:
    model = ValueModel(from_dict(ValueConfig, config["config"]))
    _load_state(model, weights)
    return ValueRuntime(model, EmbeddingTable.load(instructions, fallback=_embedding_fallback), version=version)


def policy_from_version(local: LocalVersion) -> PolicyRuntime:
    """The ``sop-vla`` builder: a verified policy version -> a runtime ready to act (``.act``, ``.version``)."""
    return _policy(local.config, local.file(WEIGHTS_FILE), local.file(INSTRUCTIONS_FILE), local.version)


def value_from_version(local: LocalVersion) -> ValueRuntime:
    """The ``sop-value`` builder: a verified value version -> ``values_for_rows`` / ``values``."""
    return _value(local.config, local.file(WEIGHTS_FILE), local.file(INSTRUCTIONS_FILE), local.version)


def legacy_runtime(directory: Path, *, version: str) -> PolicyRuntime | ValueRuntime:
    """A first-format version's runtime from its data files under ``directory/artifacts`` (never the pickle)."""
    files = {k: directory / "artifacts" / f for k, f in LEGACY_FILES.items()}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise VersionRefused(f"not a first-format SOP version: {', '.join(missing)} missing")
    meta = json.loads(files["config"].read_text())
    if meta.get("format") != LEGACY_FORMAT_VERSION or meta.get("kind") not in ARCHITECTURES:
        raise VersionRefused(f"not a first-format SOP version: config says format {meta.get('format')!r}, "
                             f"kind {meta.get('kind')!r}")
    build = _policy if meta["kind"] == "policy" else _value
    return build(meta, files["weights"], files["instructions"], version)


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
