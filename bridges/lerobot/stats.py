"""Feature statistics as LeRobot stores them: per episode in ``meta/episodes/…`` (columns
``stats/<feature>/<stat>``) and over the whole dataset in ``meta/stats.json``.

Each feature gets ``min``, ``max``, ``mean``, ``std``, ``count`` and the quantiles ``q01 q10 q50 q90 q99``
(LeRobot's ``compute_stats.get_feature_stats``; LeRobot estimates quantiles from histograms, here they are
exact). Vectors are reduced over frames (one value per dimension); camera frames per channel over a sample of
frames (LeRobot's ``sample_indices``), scaled to [0, 1] and shaped ``(3, 1, 1)``. The dataset statistics
aggregate the episodes' as LeRobot's ``aggregate_stats`` does (count-weighted means and quantiles, pooled
variance), kept as running sums so an export of any size holds one accumulator per feature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
QUANTILE_KEYS = tuple(f"q{int(q * 100):02d}" for q in QUANTILES)
STAT_KEYS = ("min", "max", "mean", "std", "count", *QUANTILE_KEYS)

Stats = dict[str, np.ndarray]


def sample_indices(n: int) -> list[int]:
    """The frames LeRobot samples for image statistics: all up to 100, then ``n ** 0.75`` (at most 10,000)."""
    num = n if n < 100 else max(100, min(int(n ** 0.75), 10_000))
    return np.round(np.linspace(0, n - 1, num)).astype(int).tolist()


def vector_stats(values: np.ndarray) -> Stats:
    """Statistics of ``(frames,)`` or ``(frames, dim)`` values, one entry per dimension."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.shape[0] == 0:
        raise ValueError("statistics need at least one frame")
    stats = {"min": array.min(axis=0), "max": array.max(axis=0), "mean": array.mean(axis=0),
             "std": array.std(axis=0), "count": np.array([array.shape[0]])}
    quantiles = np.quantile(array, QUANTILES, axis=0)
    stats.update({key: quantiles[i] for i, key in enumerate(QUANTILE_KEYS)})
    return stats


def image_stats(frames: np.ndarray) -> Stats:
    """Per-channel statistics of ``(frames, H, W, 3)`` uint8 images, in [0, 1], each shaped ``(3, 1, 1)``.

    Computed from each channel's 256-bin histogram: the same numbers as :func:`vector_stats` over the pixels
    (quantiles interpolated linearly between the sorted values, as ``np.quantile``), without sorting them.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"image statistics need (frames, H, W, 3) uint8 images, got {frames.shape} {frames.dtype}")
    step = int(max(frames.shape[1:3]) / 150) if max(frames.shape[1:3]) >= 300 else 1  # LeRobot's downsampling
    pixels = frames[:, ::step, ::step, :].reshape(-1, 3)
    levels = np.arange(256, dtype=np.float64)
    out: dict[str, list[float]] = {k: [] for k in STAT_KEYS if k != "count"}
    for c in range(3):
        hist = np.bincount(pixels[:, c], minlength=256).astype(np.float64)
        n = hist.sum()
        present = np.flatnonzero(hist)
        mean = float(hist @ levels / n)
        out["min"].append(float(present[0]))
        out["max"].append(float(present[-1]))
        out["mean"].append(mean)
        out["std"].append(float(np.sqrt(max(hist @ (levels - mean) ** 2 / n, 0.0))))
        cumulative = np.cumsum(hist)
        for key, q in zip(QUANTILE_KEYS, QUANTILES, strict=True):
            rank = (n - 1) * q
            low = int(np.floor(rank))
            below = float(np.searchsorted(cumulative, low, side="right"))
            above = float(np.searchsorted(cumulative, min(low + 1, n - 1), side="right"))
            out[key].append(below + (rank - low) * (above - below))
    stats = {k: np.asarray(v).reshape(3, 1, 1) / 255.0 for k, v in out.items()}
    stats["count"] = np.array([frames.shape[0]])
    return stats


def episode_columns(stats: Mapping[str, Stats]) -> dict[str, Any]:
    """``stats/<feature>/<stat>`` columns of one ``meta/episodes`` row (nested lists, as LeRobot writes them)."""
    return {f"stats/{feature}/{key}": value.tolist() for feature, s in stats.items() for key, value in s.items()}


class StatsAccumulator:
    """The dataset statistics of many episodes, aggregated as LeRobot's ``aggregate_stats`` does."""

    def __init__(self) -> None:
        self._sums: dict[str, dict[str, np.ndarray]] = {}

    def add(self, stats: Mapping[str, Stats]) -> None:
        for feature, s in stats.items():
            count = float(s["count"][0])
            mean = np.asarray(s["mean"], np.float64)
            acc = self._sums.get(feature)
            moments = {"count": np.array([count]), "mean": count * mean,
                       "square": count * (np.asarray(s["std"], np.float64) ** 2 + mean ** 2),
                       **{q: count * np.asarray(s[q], np.float64) for q in QUANTILE_KEYS}}
            if acc is None:
                self._sums[feature] = {**moments, "min": np.asarray(s["min"], np.float64).copy(),
                                       "max": np.asarray(s["max"], np.float64).copy()}
                continue
            for key, value in moments.items():
                acc[key] = acc[key] + value
            acc["min"] = np.minimum(acc["min"], s["min"])
            acc["max"] = np.maximum(acc["max"], s["max"])

    def result(self) -> dict[str, Stats]:
        out: dict[str, Stats] = {}
        for feature, acc in self._sums.items():
            total = acc["count"][0]
            mean = acc["mean"] / total
            out[feature] = {"min": acc["min"], "max": acc["max"], "mean": mean,
                            "std": np.sqrt(np.maximum(acc["square"] / total - mean ** 2, 0.0)),
                            "count": np.array([int(total)]),
                            **{q: acc[q] / total for q in QUANTILE_KEYS}}
        return out


def to_json(stats: Mapping[str, Stats]) -> dict[str, dict[str, Any]]:
    """``meta/stats.json``'s content: every array as (nested) lists."""
    return {feature: {key: value.tolist() for key, value in s.items()} for feature, s in stats.items()}
