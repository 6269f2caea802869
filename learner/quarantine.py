"""Rows the learner refuses to learn from: the checks, their reasons, and the counter an operator sees.

A stored step can be broken in ways the stream processor did not catch (or from before it checked): a
corrupt JPEG, a camera missing, a frame of another size than the model takes, a proprio / action vector
of the wrong length, NaN or Inf in a number column. Such a row must never crash the learner (a crash
reloads the same rows on restart: a crash loop) nor reach a batch (one NaN in proprio poisons the running
normaliser and every later version). So rows are checked twice:

- when they enter the sampler's buffers (``row_problem``: cheap, the image *headers* only), and
- when a batch decodes their images in full (``decode_row_image`` raises ``RowRejected``).

A refused row is counted by reason in a ``Quarantine`` and logged (rate-limited) with its episode and step::

    spec = RowSpec.for_policy(model_config)
    problem = row_problem(row, spec)          # None, or (reason, detail), e.g. ("proprio_non_finite", "...")
    quarantine = Quarantine()
    quarantine.record(row, *problem, source="online")
    quarantine.counts()                       # {"proprio_non_finite": 1}

No torch here: the checks are plain numpy / PIL and unit-testable on their own.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from learner.config import EncoderConfig, ModelConfig
from schemas.images import image_dimensions

log = logging.getLogger("sop.learner.quarantine")

# The reasons a row is refused: the keys of ``Quarantine.counts()`` (and of the learner's metrics
# ``quarantined/<reason>``).
MISSING_FIELD = "missing_field"  # task / instruction / step_index / episode_id absent
MISSING_CAMERA = "missing_camera"
IMAGE_UNDECODABLE = "image_undecodable"
IMAGE_SIZE = "image_size"
PROPRIO_LENGTH = "proprio_length"
ACTION_LENGTH = "action_length"
POLICY_ACTION_LENGTH = "policy_action_length"
PROPRIO_NON_FINITE = "proprio_non_finite"
ACTION_NON_FINITE = "action_non_finite"
POLICY_ACTION_NON_FINITE = "policy_action_non_finite"
REWARD_NON_FINITE = "reward_non_finite"
RETURN_NON_FINITE = "mc_return_non_finite"
VALUE_NON_FINITE = "value_non_finite"
ADVANTAGE_NON_FINITE = "advantage_non_finite"
REASONS: tuple[str, ...] = (
    MISSING_FIELD, MISSING_CAMERA, IMAGE_UNDECODABLE, IMAGE_SIZE, PROPRIO_LENGTH, ACTION_LENGTH,
    POLICY_ACTION_LENGTH, PROPRIO_NON_FINITE, ACTION_NON_FINITE, POLICY_ACTION_NON_FINITE, REWARD_NON_FINITE,
    RETURN_NON_FINITE, VALUE_NON_FINITE, ADVANTAGE_NON_FINITE,
)

_REQUIRED = ("episode_id", "task", "instruction", "step_index")
# Number columns that may be null (unknown) but, when set, must be finite.
_SCALARS = (("reward", REWARD_NON_FINITE), ("mc_return", RETURN_NON_FINITE), ("value", VALUE_NON_FINITE),
            ("advantage", ADVANTAGE_NON_FINITE))


class RowRejected(ValueError):
    """One row cannot be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class RejectedRows(Exception):
    """Rows of a batch that could not be decoded: ``(index in the batch, reason, detail)`` each.

    The batch builder raises it after looking at every row, so the sampler can quarantine them all at once
    and sample again.
    """

    def __init__(self, rejected: list[tuple[int, str, str]]) -> None:
        super().__init__(f"{len(rejected)} row(s) of the batch rejected: "
                         + "; ".join(f"#{i} {r}: {d}" for i, r, d in rejected[:3]))
        self.rejected = rejected


@dataclass(frozen=True, kw_only=True)
class RowSpec:
    """What a model takes from a row: its cameras, their side in pixels, proprio and action lengths.

    ``action_dim=None`` skips the action-length checks (the value model ignores actions).
    """

    cameras: tuple[str, ...]
    image_size: int
    proprio_dim: int
    action_dim: int | None

    @classmethod
    def for_policy(cls, config: ModelConfig) -> RowSpec:
        return cls.for_encoder(config.encoder, action_dim=config.action_dim)

    @classmethod
    def for_encoder(cls, encoder: EncoderConfig, *, action_dim: int | None = None) -> RowSpec:
        return cls(cameras=tuple(encoder.cameras), image_size=encoder.image_size, proprio_dim=encoder.proprio_dim,
                   action_dim=action_dim)


def _vector_problem(value: Any, length: int | None, *, length_reason: str, finite_reason: str,
                    name: str) -> tuple[str, str] | None:
    if value is None:
        return length_reason, f"{name} is missing"
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        return length_reason, f"{name} is not a vector of numbers ({exc})"
    if arr.ndim != 1 or (length is not None and arr.shape[0] != length):
        return length_reason, f"{name} has shape {arr.shape}, the model expects ({length},)"
    if not np.isfinite(arr).all():
        return finite_reason, f"{name} holds non-finite values"
    return None


def image_header_problem(image: Mapping[str, Any], size: int) -> tuple[str, str] | None:
    """A stored ``CameraImage`` whose bytes do not open as an image, or whose real size differs from the size
    it declares (``width`` / ``height``), cheaply: only the header is read here (a body cut short is found when
    the batch decodes it, ``decode_row_image``). A well-formed frame of another size than the model's
    ``size`` is fine: it is resized when decoded (a fleet may run its cameras at another resolution)."""
    data = image.get("data")
    if isinstance(data, np.ndarray):
        if data.ndim != 3 or data.shape[2] != 3 or data.dtype != np.uint8:
            return IMAGE_SIZE, f"array of shape {data.shape} {data.dtype}, the model expects (h, w, 3) uint8"
        return None
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        return IMAGE_UNDECODABLE, "no image bytes"
    found = image_dimensions(data)
    if found is None:  # not a JPEG/PNG header we read ourselves: ask PIL (other formats, odd files)
        try:
            with Image.open(io.BytesIO(data)) as im:
                found = im.size
        except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for garbage; all mean "cannot decode"
            return IMAGE_UNDECODABLE, f"{type(exc).__name__}: {exc}"
    declared = (image.get("width"), image.get("height"))
    if None not in declared and tuple(found) != declared:
        return IMAGE_SIZE, f"{found[0]}x{found[1]} image, declared {declared[0]}x{declared[1]}"
    return None


def row_problem(row: Mapping[str, Any], spec: RowSpec) -> tuple[str, str] | None:
    """Why ``row`` cannot be learned from, as ``(reason, detail)``, or None when it passes the cheap checks.

    >>> row_problem({"episode_id": "e", "task": "t", "instruction": "i", "step_index": 0, "images": [],
    ...              "proprio": [0.0], "action": [0.0]}, RowSpec(cameras=("corner",), image_size=8,
    ...              proprio_dim=1, action_dim=1))
    ('missing_camera', "no image from camera(s) ['corner']; the row has []")
    """
    for name in _REQUIRED:
        if row.get(name) is None:
            return MISSING_FIELD, f"{name} is missing"
    images = row.get("images") or []
    by_camera = {im.get("camera"): im for im in images if isinstance(im, Mapping)}
    missing = [c for c in spec.cameras if c not in by_camera]
    if missing:
        return MISSING_CAMERA, f"no image from camera(s) {missing}; the row has {sorted(map(str, by_camera))}"
    for camera in spec.cameras:
        problem = image_header_problem(by_camera[camera], spec.image_size)
        if problem is not None:
            return problem[0], f"camera {camera!r}: {problem[1]}"
    problem = _vector_problem(row.get("proprio"), spec.proprio_dim, length_reason=PROPRIO_LENGTH,
                              finite_reason=PROPRIO_NON_FINITE, name="proprio")
    if problem is not None:
        return problem
    if spec.action_dim is not None or row.get("action") is not None:
        problem = _vector_problem(row.get("action"), spec.action_dim, length_reason=ACTION_LENGTH,
                                  finite_reason=ACTION_NON_FINITE, name="action")
        if problem is not None:
            return problem
    if row.get("policy_action") is not None:
        problem = _vector_problem(row["policy_action"], spec.action_dim, length_reason=POLICY_ACTION_LENGTH,
                                  finite_reason=POLICY_ACTION_NON_FINITE, name="policy_action")
        if problem is not None:
            return problem
    for name, reason in _SCALARS:
        value = row.get(name)
        if value is None:
            continue
        try:
            finite = math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            return reason, f"{name} is {value!r}"
    return None


def decode_row_image(image: Mapping[str, Any], size: int) -> np.ndarray:
    """The ``size`` x ``size`` x 3 uint8 pixels of a stored ``CameraImage``; ``RowRejected`` if it cannot be."""
    data = image.get("data")
    if isinstance(data, np.ndarray):
        array = data
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:  # type: ignore[arg-type]
                array = np.asarray(im.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - as in image_header_problem
            raise RowRejected(IMAGE_UNDECODABLE, f"{type(exc).__name__}: {exc}") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise RowRejected(IMAGE_SIZE, f"decoded to {array.shape} {array.dtype}, the model expects (h, w, 3) uint8")
    if array.shape[:2] != (size, size):
        array = np.asarray(Image.fromarray(array).resize((size, size), Image.BILINEAR))
    return array


class Quarantine:
    """Counts refused rows by reason and logs them without flooding the log.

    The first ``log_first`` rows of each reason get a line each (episode, step, reason, detail); after that
    at most one summary line per ``log_every_s`` says how many more there were. Thread-safe: the feeder's
    thread and the prefetch thread both record.
    """

    def __init__(self, *, log_first: int = 5, log_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        self.log_first = log_first
        self.log_every_s = log_every_s
        self._clock = clock
        self._log = logger
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._unlogged = 0
        self._last_summary: float | None = None
        self.lines_logged = 0

    def record(self, row: Mapping[str, Any], reason: str, detail: str, *, source: str = "") -> None:
        with self._lock:
            n = self._counts.get(reason, 0) + 1
            self._counts[reason] = n
            if n <= self.log_first:
                line: tuple[Any, ...] | None = (
                    "quarantined %s row: episode %s step %s: %s (%s)%s", source or "a", row.get("episode_id"),
                    row.get("step_index"), reason, detail,
                    "; later rows of this reason are only counted" if n == self.log_first else "")
            else:
                self._unlogged += 1
                now = self._clock()
                line = None
                if self._last_summary is None or now - self._last_summary >= self.log_every_s:
                    line = ("quarantined %d more rows (total by reason: %s); last: episode %s step %s: %s",
                            self._unlogged, dict(self._counts), row.get("episode_id"), row.get("step_index"), reason)
                    self._unlogged = 0
                    self._last_summary = now
            if line is not None:
                self.lines_logged += 1
        if line is not None:
            self._log.warning(*line)

    def counts(self) -> dict[str, int]:
        """Rows refused so far, by reason (only reasons seen)."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def metrics(self) -> dict[str, float]:
        """``quarantined`` (all) and ``quarantined/<reason>``: what the learner logs to MLflow."""
        counts = self.counts()
        return {"quarantined": float(sum(counts.values())), **{f"quarantined/{r}": float(n) for r, n in counts.items()}}
