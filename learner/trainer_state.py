"""What a resumed learner needs besides the weights: Adam's moments and the sampler's loss windows.

A registered version holds the weights only (actors download every file of it), so the rest is kept beside the
learner's status file, tagged with the version it belongs to: ``<dir>/trainer-state.safetensors`` (the optimizer's
tensors, no pickle) and ``<dir>/trainer-state.json`` (its param groups, the loss windows, the version and step),
rewritten after every registration. A learner resuming from that version restores both; from another version
(another learner's, an older one after a crash) it starts them afresh, as before, and says so in its status.

    state = snapshot(learner, sampler)            # on the training thread, when a version is handed over
    save(directory, state, version="12")          # on the publishing thread, once the version is registered
    restored = restore(directory, learner, sampler, version="12")   # at start: True if it applied
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from learner.sampler import AdaptiveSampler
from learner.trainer import Learner

log = logging.getLogger("sop.learner")

TENSORS_FILE = "trainer-state.safetensors"
META_FILE = "trainer-state.json"


@dataclass(frozen=True)
class TrainerState:
    step: int
    optimizer: dict[str, Any]  # torch.optim state_dict (copied)
    windows: dict[str, Any]  # AdaptiveSampler.window_state()


def snapshot(learner: Learner, sampler: AdaptiveSampler | None) -> TrainerState:
    """A copy of the optimizer state and the loss windows now (cheap: ~2x the weights)."""
    optimizer = copy.deepcopy(learner.optimizer.state_dict())
    return TrainerState(step=learner.steps, optimizer=optimizer,
                        windows=sampler.window_state() if sampler is not None else {})


def save(directory: Path, state: TrainerState, *, version: str) -> None:
    """Write ``state`` as belonging to ``version`` (the JSON, naming the version, last: a reader never pairs one
    version's tensors with another's metadata)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict[str, Any]] = {}
    for index, entries in state.optimizer["state"].items():
        per_param[str(index)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                per_param[str(index)][key] = "tensor"
            else:
                per_param[str(index)][key] = value
    meta = {"version": version, "step": state.step, "param_groups": state.optimizer["param_groups"],
            "state": per_param, "windows": state.windows}
    for path, write in ((directory / TENSORS_FILE, lambda p: save_file(tensors, str(p))),
                        (directory / META_FILE, lambda p: p.write_text(json.dumps(meta)))):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)


def load(directory: Path) -> tuple[str, TrainerState] | None:
    """``(version, state)`` saved in ``directory``, or None when there is none or it does not read."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        tensors = load_file(str(directory / TENSORS_FILE))
        state = {int(index): {key: tensors[f"{index}.{key}"] if kind == "tensor" else kind
                              for key, kind in entries.items()}
                 for index, entries in meta["state"].items()}
        optimizer = {"state": state, "param_groups": meta["param_groups"]}
        return str(meta["version"]), TrainerState(step=int(meta["step"]), optimizer=optimizer,
                                                  windows=meta["windows"])
    except (OSError, ValueError, KeyError) as exc:
        if (directory / META_FILE).exists():
            log.warning("the trainer state in %s does not read (%s): Adam's moments and the loss windows start "
                        "afresh", directory, exc)
        return None


def restore(directory: Path, learner: Learner, sampler: AdaptiveSampler | None, *, version: str | None) -> bool:
    """Restore the optimizer state and loss windows saved for ``version``; False (nothing changed) when the saved
    state belongs to another version, does not fit the model, or there is none."""
    found = load(directory) if version is not None else None
    if found is None:
        return False
    saved_version, state = found
    if saved_version != version:
        log.info("the trainer state in %s is of version %s, not %s: Adam's moments and the loss windows start "
                 "afresh", directory, saved_version, version)
        return False
    try:
        learner.optimizer.load_state_dict(state.optimizer)
    except (ValueError, RuntimeError, KeyError) as exc:
        log.warning("the trainer state of version %s does not fit the model (%s): not restored", version, exc)
        return False
    # The moments were saved contiguous; a channels-last weight needs them in its own layout: the fused update
    # walks weight and moments as flat memory, so mismatched strides would mix up their elements.
    for param, entries in learner.optimizer.state.items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                entries[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
    if sampler is not None:
        sampler.restore_windows(state.windows)
    return True
