"""The report of a run: success vs wall-clock per task, intervention rate and throughput over time.

Everything is computed from the Delta ``episodes`` table, so a report can be rebuilt for any run
directory afterwards (``sop run --report-only``) and the numbers match what SQL says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class Curves:
    t_min: np.ndarray  # minutes since the run started, one per episode (sorted by end time)
    task: np.ndarray
    success: np.ndarray
    intervened: np.ndarray
    version: np.ndarray


def curves(episodes: pa.Table, *, started_at_s: float) -> Curves:
    rows = sorted(episodes.select(["end_time", "task", "outcome", "num_interventions", "policy_version"]).to_pylist(),
                  key=lambda r: r["end_time"])
    return Curves(
        t_min=np.array([(r["end_time"].timestamp() - started_at_s) / 60 for r in rows]),
        task=np.array([r["task"] for r in rows]),
        success=np.array([r["outcome"] == "SUCCESS" for r in rows], dtype=float),
        intervened=np.array([r["num_interventions"] > 0 for r in rows], dtype=float),
        version=np.array([r["policy_version"] for r in rows]),
    )


def rolling(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (shorter at the start)."""
    if len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def time_to_target(t_min: np.ndarray, success: np.ndarray, *, target: float, window: int) -> float | None:
    """First time (minutes) the rolling success over ``window`` episodes reaches ``target`` (needs a full window)."""
    r = rolling(success, window)
    ok = np.nonzero((r >= target) & (np.arange(len(r)) >= window - 1))[0]
    return float(t_min[ok[0]]) if len(ok) else None


def summary(c: Curves, *, window: int = 20) -> dict:
    tasks = sorted(set(c.task.tolist()))
    per_task = {}
    for task in tasks:
        m = c.task == task
        per_task[task] = {
            "episodes": int(m.sum()),
            "success_last_window": float(c.success[m][-window:].mean()) if m.any() else None,
            "success_first_window": float(c.success[m][:window].mean()) if m.any() else None,
            "intervention_rate_last_window": float(c.intervened[m][-window:].mean()) if m.any() else None,
        }
    span_h = max(1e-9, (c.t_min[-1] - c.t_min[0]) / 60) if len(c.t_min) > 1 else None
    overall = rolling(c.success, window * max(1, len(tasks)))
    return {
        "episodes": len(c.t_min), "tasks": per_task,
        "success_last_window_mean": float(np.mean([v["success_last_window"] for v in per_task.values()])) if tasks else None,
        "episodes_per_hour": len(c.t_min) / span_h if span_h else None,
        "time_to_0.8_min": time_to_target(c.t_min, c.success, target=0.8, window=window * max(1, len(tasks))),
        "final_rolling_success": float(overall[-1]) if len(overall) else None,
        "versions": sorted(set(c.version.tolist()), key=lambda v: (not v.isdigit(), int(v) if v.isdigit() else 0, v)),
    }


def write_report(episodes: pa.Table, out_dir: Path, *, started_at_s: float, title: str, window: int = 20,
                 extra: dict | None = None) -> dict:
    """Write ``report.md``, ``summary.json`` and PNG plots into ``out_dir``; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    c = curves(episodes, started_at_s=started_at_s)
    s = summary(c, window=window)
    if extra:
        s.update(extra)
    tasks = sorted(s["tasks"])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for task in tasks:
        m = c.task == task
        ax.plot(c.t_min[m], rolling(c.success[m], window), label=task)
    ax.axhline(0.8, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="wall-clock time (min)", ylabel=f"success (rolling {window} episodes)", ylim=(-0.02, 1.02),
           title="Success rate per task")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "success_vs_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(c.t_min, rolling(c.intervened, window * max(1, len(tasks))), c="tab:red")
    ax.set(xlabel="wall-clock time (min)", ylabel="episodes with a takeover", ylim=(-0.02, 1.02),
           title="Intervention rate (rolling)")
    fig.tight_layout()
    fig.savefig(out_dir / "interventions_vs_time.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    if len(c.t_min):
        edges = np.arange(0, max(c.t_min.max(), 1) + 1, max(1.0, c.t_min.max() / 20))
        counts, _ = np.histogram(c.t_min, bins=edges)
        ax.bar(edges[:-1], counts * 60 / np.diff(edges), width=np.diff(edges), align="edge", color="tab:green")
    ax.set(xlabel="wall-clock time (min)", ylabel="episodes / hour", title="Throughput")
    fig.tight_layout()
    fig.savefig(out_dir / "episodes_per_hour.png", dpi=110)
    plt.close(fig)

    lines = [f"# {title}", "", f"Episodes: {s['episodes']}; policy versions: {', '.join(s['versions'])}", "",
             "| task | episodes | success (first window) | success (last window) | takeovers (last window) |",
             "|---|---|---|---|---|"]
    for task in tasks:
        t = s["tasks"][task]
        lines.append(f"| {task} | {t['episodes']} | {t['success_first_window']:.2f} | {t['success_last_window']:.2f} "
                     f"| {t['intervention_rate_last_window']:.2f} |")
    eph = f"{s['episodes_per_hour']:.0f}" if s["episodes_per_hour"] else "-"
    ttt = f"{s['time_to_0.8_min']:.1f} min" if s["time_to_0.8_min"] is not None else "not reached"
    lines += ["", f"Episodes per hour: {eph}. Time to rolling success 0.8: {ttt}.", "",
              "![success](success_vs_time.png)", "", "![interventions](interventions_vs_time.png)", "",
              "![throughput](episodes_per_hour.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    return s
