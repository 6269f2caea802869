"""From stored step rows to training tensors: labels, lazy image decoding, collation.

A *row* is a dict with the fields of the ``Step`` wire record (``schemas/avsc/Step.avsc``: ``task``,
``instruction``, ``step_index``, ``images`` as compressed bytes, ``proprio``, ``action``,
``policy_action``, ``controller``, ...) plus, when the stream processor filled them, ``advantage``,
``indicator`` and ``normalised_return``. Rows keep their images compressed; they are decoded only when
a batch is built.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from learner.config import EncoderConfig
from learner.quarantine import MISSING_CAMERA, RejectedRows, RowRejected, decode_row_image
from learner.text import TextEmbedder
from rewards.recap import UNKNOWN

Row = dict[str, Any]
Source = Literal["online", "offline"]
SOURCES: tuple[Source, ...] = ("online", "offline")

# Keys the learner adds to a row when it enters a buffer.
LABEL = "_label"  # [chunk, action_dim] float32
LABEL_MASK = "_label_mask"  # [chunk] bool
HUMAN = "_human"  # bool


class ObservationLike(Protocol):
    """What a robot sees (structurally the actors' ``producers.interfaces.Observation``)."""

    images: Mapping[str, np.ndarray]  # camera -> HxWx3 uint8
    proprio: np.ndarray
    instruction: str
    task: str


@dataclass
class Batch:
    """One training batch. Unknown advantages / returns are NaN, unknown indicators ``recap.UNKNOWN``."""

    images: torch.Tensor  # [B, cameras, 3, H, W] uint8
    proprio: torch.Tensor  # [B, P] float32
    text: torch.Tensor  # [B, 384] float32
    actions: torch.Tensor  # [B, chunk, A] float32 labels
    action_mask: torch.Tensor  # [B, chunk] bool
    human: torch.Tensor  # [B] bool: a human drove this step
    online: torch.Tensor  # [B] bool: from the online buffer (else an offline demonstration)
    advantage: torch.Tensor  # [B] float32
    indicator: torch.Tensor  # [B] int64
    returns: torch.Tensor  # [B] float32 normalised return-to-go
    tasks: list[str]

    @property
    def size(self) -> int:
        return len(self.tasks)

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return Batch(**moved)


@runtime_checkable
class BatchSource(Protocol):
    """Where the trainer gets batches (the sampler, a prefetcher in front of it, a fixed list in tests)."""

    def next_batch(self) -> Batch:
        ...


def label_of(row: Mapping[str, Any], source: Source) -> np.ndarray:
    """The action to imitate: the clean expert action for demonstrations, the executed action online."""
    if source == "offline" and row.get("policy_action") is not None:
        return np.asarray(row["policy_action"], dtype=np.float32)
    return np.asarray(row["action"], dtype=np.float32)


def prepare_episode(rows: Sequence[Mapping[str, Any]], *, source: Source, chunk: int) -> list[Row]:
    """Copies of one episode's rows with their (chunked) labels attached, ordered by ``step_index``.

    The chunk of step t holds the labels of t..t+chunk-1; entries past the episode's end, past a missing
    step (e.g. a quarantined row), or where control changed hands since t (a human label must not be
    continued with the policy's actions), are masked out.
    """
    ordered = sorted(rows, key=lambda r: r["step_index"])
    labels = [label_of(r, source) for r in ordered]
    controllers = [r.get("controller", "POLICY") for r in ordered]
    steps = [int(r["step_index"]) for r in ordered]
    prepared: list[Row] = []
    for t, row in enumerate(ordered):
        out = dict(row)
        label = np.zeros((chunk, labels[t].shape[0]), dtype=np.float32)
        mask = np.zeros(chunk, dtype=bool)
        for k in range(chunk):
            if t + k >= len(ordered) or controllers[t + k] != controllers[t] or steps[t + k] != steps[t] + k:
                break
            label[k] = labels[t + k]
            mask[k] = True
        out[LABEL] = label
        out[LABEL_MASK] = mask
        out[HUMAN] = controllers[t] == "HUMAN"
        out["proprio"] = np.asarray(row["proprio"], dtype=np.float32)
        prepared.append(out)
    return prepared


def decode_image(image: Mapping[str, Any] | np.ndarray, size: int) -> np.ndarray:
    """An ``HxWx3`` uint8 image of ``size x size`` from a stored ``CameraImage`` (jpeg/png) or an array."""
    if isinstance(image, np.ndarray):
        array = image
    else:
        data = image["data"]
        if isinstance(data, np.ndarray):
            array = data
        else:
            with Image.open(io.BytesIO(data)) as im:
                array = np.asarray(im.convert("RGB"))
    if array.shape[:2] != (size, size):
        array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
    return array


def row_images(row: Mapping[str, Any], encoder: EncoderConfig) -> np.ndarray:
    """``[cameras, H, W, 3]`` uint8 in the encoder's camera order."""
    by_camera = {im["camera"]: im for im in row["images"]}
    missing = [c for c in encoder.cameras if c not in by_camera]
    if missing:
        raise KeyError(f"row of episode {row.get('episode_id')!r} has no image from camera(s) {missing}; "
                       f"it has {sorted(by_camera)}")
    return np.stack([decode_image(by_camera[c], encoder.image_size) for c in encoder.cameras])


def observation_images(observation: ObservationLike, encoder: EncoderConfig) -> np.ndarray:
    missing = [c for c in encoder.cameras if c not in observation.images]
    if missing:
        raise KeyError(f"observation has no image from camera(s) {missing}; it has {sorted(observation.images)}")
    return np.stack([decode_image(observation.images[c], encoder.image_size) for c in encoder.cameras])


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[B, cameras, H, W, 3]`` uint8 -> ``[B, cameras, 3, H, W]`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 1, 4, 2, 3).contiguous()


def row_observation_tensors(rows: Sequence[Mapping[str, Any]], encoder: EncoderConfig,
                            text: TextEmbedder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, proprio and instruction embeddings of stored rows, as model inputs."""
    images = images_to_tensor(np.stack([row_images(r, encoder) for r in rows]))
    proprio = torch.from_numpy(np.stack([np.asarray(r["proprio"], dtype=np.float32) for r in rows]))
    return images, proprio, torch.from_numpy(text.embed([r["instruction"] for r in rows]))


class BatchBuilder:
    """Collates prepared rows into a ``Batch`` (decoding images and looking up instruction embeddings).

    Images of another size than the encoder's are resized (bilinear). Rows whose images do not decode make it raise ``quarantine.RejectedRows`` naming all of them, after trying
    every row; the sampler quarantines those and samples again.
    """

    def __init__(self, encoder: EncoderConfig, text: TextEmbedder, *, chunk: int, action_dim: int) -> None:
        self.encoder = encoder
        self.text = text
        self.chunk = chunk
        self.action_dim = action_dim

    def __call__(self, rows: Sequence[Mapping[str, Any]], online: Sequence[bool]) -> Batch:
        if not rows:
            raise ValueError("cannot build an empty batch")
        decoded: list[np.ndarray] = []
        rejected: list[tuple[int, str, str]] = []
        for i, row in enumerate(rows):
            try:
                decoded.append(self._images(row))
            except RowRejected as exc:
                rejected.append((i, exc.reason, exc.detail))
        if rejected:
            raise RejectedRows(rejected)
        images = images_to_tensor(np.stack(decoded))
        proprio = torch.from_numpy(np.stack([np.asarray(r["proprio"], dtype=np.float32) for r in rows]))
        text = torch.from_numpy(self.text.embed([r["instruction"] for r in rows]))
        labels = np.stack([self._label(r) for r in rows])
        masks = np.stack([r[LABEL_MASK] for r in rows])
        return Batch(
            images=images,
            proprio=proprio,
            text=text,
            actions=torch.from_numpy(labels),
            action_mask=torch.from_numpy(masks),
            human=torch.tensor([bool(r[HUMAN]) for r in rows]),
            online=torch.tensor([bool(o) for o in online]),
            advantage=torch.tensor([_number(r.get("advantage")) for r in rows], dtype=torch.float32),
            indicator=torch.tensor([_indicator(r.get("indicator")) for r in rows], dtype=torch.int64),
            returns=torch.tensor([_number(r.get("normalised_return")) for r in rows], dtype=torch.float32),
            tasks=[str(r["task"]) for r in rows],
        )

    def _images(self, row: Mapping[str, Any]) -> np.ndarray:
        by_camera = {im["camera"]: im for im in row.get("images") or ()}
        missing = [c for c in self.encoder.cameras if c not in by_camera]
        if missing:
            raise RowRejected(MISSING_CAMERA, f"no image from camera(s) {missing}; it has {sorted(by_camera)}")
        size = self.encoder.image_size
        return np.stack([decode_row_image(by_camera[c], size) for c in self.encoder.cameras])

    def _label(self, row: Mapping[str, Any]) -> np.ndarray:
        label = row[LABEL]
        if label.shape != (self.chunk, self.action_dim):
            raise ValueError(f"row label has shape {label.shape}, the model expects ({self.chunk}, "
                             f"{self.action_dim}); prepare rows with prepare_episode(chunk={self.chunk})")
        return label


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _indicator(value: Any) -> int:
    return UNKNOWN if value is None else int(value)
