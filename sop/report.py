"""The report of a run: success vs wall-clock per task, intervention rate and throughput over time.

Everything is computed from the Delta ``episodes`` table, so a report can be rebuilt for any run
directory afterwards (``sop run --report-only``) and the numbers match what SQL says.

Two success rates, because the operator is on during a run: *raw* success counts every successful episode,
also those the operator rescued; *autonomous* success counts only episodes that succeeded with no human step
(``human_steps = 0`` and no takeover). The headline is the autonomous one; the takeover rate (episodes with any
human step) is beside it, per task and per policy version. ABORTED episodes (a robot stopped mid-episode, e.g.
at the end of the run) say nothing about the policy: they are counted, not rated. Held-out success (operator
off, seeds the fleet never saw) is measured by ``sop eval --version V``, or during the run by ``sop run
--eval-every MIN`` (its checkpoints come in as ``extra={"held_out_checkpoints": [...], "held_out": {...}}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lakehouse import upgrade


@dataclass(frozen=True)
class Curves:
    t_min: np.ndarray  # minutes since the run started, one per episode (sorted by end time)
    task: np.ndarray
    success: np.ndarray
    intervened: np.ndarray
    autonomous: np.ndarray  # succeeded with no human step
    version: np.ndarray  # registry version number (None where the episode's policy had none)
    version_text: np.ndarray
    aborted: int = 0  # ABORTED episodes, left out of the arrays
    aborted_versions: tuple[tuple[int | None, str | None], ...] = ()  # (version, text) of each: they ran too


EPISODE_COLUMNS = ["end_time", "task", "outcome", "num_interventions", "human_steps", "policy_version",
                   "policy_version_text"]


def curves(episodes: pa.Table, *, started_at_s: float) -> Curves:
    every = sorted(upgrade(episodes).select(EPISODE_COLUMNS).to_pylist(), key=lambda r: r["end_time"])
    rows = [r for r in every if r["outcome"] != "ABORTED"]
    helped = [r["num_interventions"] > 0 or (r["human_steps"] or 0) > 0 for r in rows]
    return Curves(
        t_min=np.array([(r["end_time"].timestamp() - started_at_s) / 60 for r in rows]),
        task=np.array([r["task"] for r in rows]),
        success=np.array([r["outcome"] == "SUCCESS" for r in rows], dtype=float),
        intervened=np.array(helped, dtype=float),
        autonomous=np.array([r["outcome"] == "SUCCESS" and not h for r, h in zip(rows, helped, strict=True)],
                            dtype=float),
        version=np.array([r["policy_version"] for r in rows], dtype=object),
        version_text=np.array([r["policy_version_text"] for r in rows], dtype=object),
        aborted=len(every) - len(rows),
        aborted_versions=tuple((r["policy_version"], r["policy_version_text"]) for r in every
                               if r["outcome"] == "ABORTED"),
    )


def per_version(c: Curves, *, newest: int = 12) -> list[dict]:
    """The newest ``newest`` policy versions that ran (by their last episode): episodes, autonomous success,
    raw success, takeover rate."""
    last: dict[str, int] = {}
    for i, v in enumerate(c.version_text.tolist()):
        last[str(v)] = i
    out = []
    for v in sorted(last, key=last.__getitem__, reverse=True)[:newest]:
        m = c.version_text == v
        out.append({"version": v, "episodes": int(m.sum()), "autonomous_success": float(c.autonomous[m].mean()),
                    "success": float(c.success[m].mean()), "takeover_rate": float(c.intervened[m].mean())})
    return out


def version_range(c: Curves) -> dict:
    """The registry versions that ran (an ABORTED episode's too: the version did run): first, last, how many; and
    the other policies' names (e.g. "expert")."""
    ran = [*zip(c.version.tolist(), c.version_text.tolist(), strict=True), *c.aborted_versions]
    numbers = sorted({int(v) for v, _ in ran if v is not None})
    other = sorted({str(t) for v, t in ran if v is None})
    return {"first": numbers[0] if numbers else None, "last": numbers[-1] if numbers else None,
            "count": len(numbers), "other": other}


def describe_versions(v: dict) -> str:
    if not v["count"]:
        text = "none from the registry"
    elif v["count"] == 1:
        text = f"v{v['first']} (1 version)"
    else:
        text = f"v{v['first']}–v{v['last']} ({v['count']} versions)"
    return text + (f"; also {', '.join(v['other'])}" if v["other"] else "")


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
            "autonomous_success_last_window": float(c.autonomous[m][-window:].mean()) if m.any() else None,
            "intervention_rate_last_window": float(c.intervened[m][-window:].mean()) if m.any() else None,
        }
    span_h = max(1e-9, (c.t_min[-1] - c.t_min[0]) / 60) if len(c.t_min) > 1 else None  # rated episodes
    overall_window = window * max(1, len(tasks))
    overall = rolling(c.success, overall_window)
    autonomous = rolling(c.autonomous, overall_window)

    def mean_of(key: str) -> float | None:
        return float(np.mean([v[key] for v in per_task.values()])) if tasks else None

    return {
        "episodes": len(c.t_min) + c.aborted, "aborted": c.aborted, "tasks": per_task,
        "per_version": per_version(c),
        "success_last_window_mean": mean_of("success_last_window"),
        "autonomous_success_last_window_mean": mean_of("autonomous_success_last_window"),
        "episodes_per_hour": len(c.t_min) / span_h if span_h else None,
        # raw: the operator's rescues count as successes
        "time_to_0.8_min": time_to_target(c.t_min, c.success, target=0.8, window=overall_window),
        "time_to_0.8_autonomous_min": time_to_target(c.t_min, c.autonomous, target=0.8, window=overall_window),
        "final_rolling_success": float(overall[-1]) if len(overall) else None,
        "final_rolling_autonomous_success": float(autonomous[-1]) if len(autonomous) else None,
        "versions": version_range(c),
    }


def _minutes(t: float | None) -> str:
    return f"{t:.1f} min" if t is not None else "not reached"


def headline(s: dict, *, window: int) -> list[str]:
    """The report's first lines: autonomous success first, raw success (rescues counted) beside it."""
    def rate(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    held = s.get("held_out")
    if isinstance(held, dict) and held.get("success") is not None:
        held_text = f"**{rate(held['success'])}**" + (f" ({held['note']})" if held.get("note") else "")
    else:
        last = s["versions"].get("last")
        held_text = "not measured by this run" + (f" (`sop eval --version {last}`)" if last is not None else "")
    return [
        f"**Autonomous success** (no human step), last {window} episodes per task: "
        f"**{rate(s['autonomous_success_last_window_mean'])}**; raw success, the operator's rescues counted: "
        f"{rate(s['success_last_window_mean'])}.",
        "",
        f"Time to rolling autonomous success 0.8: **{_minutes(s['time_to_0.8_autonomous_min'])}** "
        f"(raw: {_minutes(s['time_to_0.8_min'])}). Held-out success (operator off): {held_text}.",
    ]


def tasks_of(checkpoints: list[dict]) -> list[str]:
    return sorted({t for cp in checkpoints for t in cp["per_task"]})


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


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
        (line,) = ax.plot(c.t_min[m], rolling(c.success[m], window), label=task)
        ax.plot(c.t_min[m], rolling(c.autonomous[m], window), ls=":", c=line.get_color())
    ax.axhline(0.8, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="wall-clock time (min)", ylabel=f"success (rolling {window} episodes)", ylim=(-0.02, 1.02),
           title="Success per task (solid: raw, dotted: autonomous, no human step)")
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

    lines = [f"# {title}", "", *headline(s, window=window), "",
             f"Episodes: {s['episodes']}; policy versions: {describe_versions(s['versions'])}", "",
             "| task | episodes | success (first window) | success (last window) | autonomous (last window) "
             "| takeovers (last window) |",
             "|---|---|---|---|---|---|"]
    for task in tasks:
        t = s["tasks"][task]
        lines.append(f"| {task} | {t['episodes']} | {t['success_first_window']:.2f} | {t['success_last_window']:.2f} "
                     f"| {t['autonomous_success_last_window']:.2f} | {t['intervention_rate_last_window']:.2f} |")
    lines += ["", "Per policy version (the newest that ran):", "",
              "| version | episodes | autonomous success | raw success | takeover rate |", "|---|---|---|---|---|"]
    lines += [f"| {v['version']} | {v['episodes']} | {v['autonomous_success']:.2f} | {v['success']:.2f} "
              f"| {v['takeover_rate']:.2f} |" for v in s["per_version"]]
    checkpoints = s.get("held_out_checkpoints") or []
    if checkpoints:
        lines += ["", "Held-out checkpoints (operator off, held-out seeds, `sop eval`), the champion at the time:", "",
                  "| minute | version | " + " | ".join(tasks_of(checkpoints)) + " | mean |",
                  "|---|---|" + "---|" * (len(tasks_of(checkpoints)) + 1)]
        for cp in checkpoints:
            lines.append(f"| {cp['t_min']:.1f} | v{cp['version']} | " + " | ".join(
                _rate(cp["per_task"].get(t)) for t in tasks_of(checkpoints)) + f" | {_rate(cp['mean'])} |")
    eph = f"{s['episodes_per_hour']:.0f}" if s["episodes_per_hour"] else "-"
    lines += ["", f"Episodes per hour: {eph}. Raw success counts the episodes the operator rescued; autonomous "
              "success only those that succeeded with no human step; the takeover rate counts episodes with any "
              f"human step. ABORTED episodes (not rated): {s['aborted']}.", "",
              "![success](success_vs_time.png)", "", "![interventions](interventions_vs_time.png)", "",
              "![throughput](episodes_per_hour.png)", ""]
    (out_dir / "report.md").write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps(s, indent=2, default=str))
    return s
