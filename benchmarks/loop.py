"""The paper's experiments in simulation, each from the same demonstrations and the same base policy.

    .venv/bin/python -m benchmarks.loop methods --minutes 30 --eval-episodes 50
    .venv/bin/python -m benchmarks.loop fleet   --minutes 30 --fleet 1 2 4
    .venv/bin/python -m benchmarks.loop sampler --minutes 30 --checkpoint-min 10 --alphas 2 20

methods  base policy, SOP + HG-DAgger, SOP + RECAP, and offline iterations (the same actors, operator and
         wall-clock budget collecting with the frozen base policy, then the same learner trained on what was
         collected): success per task on held-out seeds and episodes per hour. The RECAP arm starts from RECAP's
         own base (same demonstrations): the value model trained on them (`sop train-value`), the policy pretrained
         on its advantages (`sop pretrain --algorithm recap`); its run keeps that value model frozen.
fleet    SOP + HG-DAgger with 1, 2 and 4 actors: time until the rolling success reaches 0.8, speed-up.
sampler  the adaptive online/offline mix (one arm per --alphas) against a fixed 50/50 mix.

Every arm runs `sop run` in its own run directory (own Kafka broker, Delta tables and MLflow registry)
cloned from one prepared base directory, one arm after the other; results go to ``--out`` as JSON,
Markdown and PNG. Base and arms are evaluated with `sop eval` on the same held-out seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUITE_DEFAULT = None  # the actors' default suite


def sop(args: list[str], run_dir: Path, *, env: dict | None = None, timeout: float | None = None) -> None:
    full_env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_PORT": "0", **(env or {})}
    log = run_dir / "logs" / f"bench-{args[0]}-{int(time.time())}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ SOP_RUN_DIR={run_dir} sop {' '.join(args)}", flush=True)
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "sop", *args], env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"`sop {' '.join(args)}` failed ({proc.returncode}); log: {log}")


def prepare(base: Path, *, demos: int | None, tasks: list[str] | None) -> None:
    """Demonstrations and base policy once, shared by every arm: by default the calibrated per-task counts
    that `sop run` uses (``sim.demos_io.BASE_DEMOS_PER_TASK``), so the base is the README's base."""
    if (base / "prepared").exists():
        return
    t = ["--tasks", ",".join(tasks)] if tasks else []
    sop(["up"], base)
    if demos is not None:
        sop(["demos", "--episodes-per-task", str(demos), *t], base)
    else:
        from lakehouse.lake import Lakehouse
        from sim.demos_io import BASE_DEMOS_PER_TASK, make_demonstrations

        counts = {task: BASE_DEMOS_PER_TASK.get(task, 10) for task in (tasks or BASE_DEMOS_PER_TASK)}
        make_demonstrations(Lakehouse(str(base / "lake")), episodes_per_task=counts, progress=True)
    sop(["pretrain", "--algorithm", "hg-dagger", "--no-eval"], base)
    sop(["down"], base)
    (base / "prepared").touch()


def prepare_recap(base: Path, recap_base: Path) -> None:
    """RECAP's base from the shared base's demonstrations: the distributional value model trained on them and
    registered, then the policy pretrained conditioned on that model's advantages (as `sop run --algorithm recap`
    prepares a fresh run directory)."""
    if (recap_base / "prepared").exists():
        return
    if recap_base.exists():
        shutil.rmtree(recap_base)
    recap_base.mkdir(parents=True)
    shutil.copytree(base / "lake", recap_base / "lake")
    sop(["train-value"], recap_base)
    sop(["pretrain", "--algorithm", "recap", "--no-eval"], recap_base)
    (recap_base / "prepared").touch()


def clone(base: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copytree(base / "lake", dst / "lake")
    shutil.copy(base / "mlflow.db", dst / "mlflow.db")  # artifacts stay under the base run (absolute paths)
    return dst


RESUME = False  # --resume: keep what earlier (interrupted) runs of the experiment left in --out


def evaluate(run_dir: Path, *, episodes: int, tasks: list[str] | None) -> dict[str, float]:
    out = run_dir / "eval.json"
    t = ["--tasks", ",".join(tasks)] if tasks else []
    sop(["eval", "--episodes-per-task", str(episodes), "--no-paraphrases", "-o", str(out), *t], run_dir)
    return json.loads(out.read_text())["canonical"]


def run_arm(run_dir: Path, *, minutes: float, actors: int, extra: list[str], tasks: list[str] | None,
            env: dict[str, str] | None = None) -> dict:
    t = ["--tasks", ",".join(tasks)] if tasks else []
    sop(["run", "--minutes", str(minutes), "--actors", str(actors), *t, *extra], run_dir, env=env,
        timeout=minutes * 60 + 1800)
    return json.loads((run_dir / "last-run.json").read_text())["summary"]


def done(run_dir: Path, file: str) -> bool:
    """With --resume, a step whose output is already there is not run again."""
    return RESUME and (run_dir / file).exists()


def checkpoints_of(args: argparse.Namespace) -> list[float]:
    """The minutes at which each arm's running policy is evaluated: every --checkpoint-min within --minutes."""
    return [args.checkpoint_min * (k + 1) for k in range(int(args.minutes // args.checkpoint_min))]


def base_mean_success(base: Path) -> float | None:
    """Mean held-out success of the shared base policy (the curves' point at t = 0), if it was evaluated."""
    if not (base / "eval.json").exists():
        return None
    success = json.loads((base / "eval.json").read_text())["canonical"]
    return sum(success.values()) / len(success)


def methods(args: argparse.Namespace, base: Path, out: Path) -> dict:
    recap_base = out / "base_recap"
    prepare_recap(base, recap_base)
    results = {}
    for name, b in (("base", base), ("base_recap", recap_base)):
        if not done(b, "eval.json"):
            evaluate(b, episodes=args.eval_episodes, tasks=args.tasks)
        results[name] = {"success": json.loads((b / "eval.json").read_text())["canonical"]}
    for name, extra, start in (("sop_hg_dagger", ["--algorithm", "hg-dagger"], base),
                               ("sop_recap", ["--algorithm", "recap"], recap_base)):
        d = out / name
        if not done(d, "last-run.json"):
            run_arm(clone(start, d), minutes=args.minutes, actors=args.actors, extra=extra, tasks=args.tasks)
        if not done(d, "eval.json"):
            evaluate(d, episodes=args.eval_episodes, tasks=args.tasks)
        summary = json.loads((d / "last-run.json").read_text())["summary"]
        results[name] = {"success": json.loads((d / "eval.json").read_text())["canonical"],
                         "episodes_per_hour": summary.get("episodes_per_hour"), "run": summary}
    d = out / "offline_iterations"
    if not done(d, "last-run.json"):
        run_arm(clone(base, d), minutes=args.minutes, actors=args.actors, extra=["--no-learn"], tasks=args.tasks)
    # the same number of learner steps as the SOP + HG-DAgger arm took online (compute parity), unless given
    steps = args.offline_steps or json.loads((out / "sop_hg_dagger" / "learner" / "status.json").read_text())["step"]
    if not done(d, "eval.json"):
        sop(["learn", "--algorithm", "hg-dagger", "--max-steps", str(steps), "--quiet"], d)
        evaluate(d, episodes=args.eval_episodes, tasks=args.tasks)
    summary = json.loads((d / "last-run.json").read_text())["summary"]
    results["offline_iterations"] = {"success": json.loads((d / "eval.json").read_text())["canonical"],
                                     "episodes_per_hour": summary.get("episodes_per_hour"),
                                     "learner_steps": steps, "run": summary}
    return results


def success_over_time(run_dir: Path, *, checkpoints_min: list[float], episodes: int,
                      tasks: list[str] | None) -> dict[float, float]:
    """Held-out success (operator off) of the policy the fleet was running at each checkpoint: the newest
    registered version created before ``start + t``. The online success (operator on) is no measure of
    the policy alone — the operator's rescues keep even the frozen base near 0.8."""
    from infra.registry import registry_client

    started = json.loads((run_dir / "last-run.json").read_text())["started_at"]
    client = registry_client(f"sqlite:///{run_dir / 'mlflow.db'}")
    versions = sorted((v.creation_timestamp / 1000, v.version) for v in client.search_model_versions("name = 'sop-policy'"))
    curve = {}
    for t in checkpoints_min:
        version = [v for created, v in versions if created <= started + t * 60][-1]
        out = run_dir / f"eval-t{t:g}min-v{version}-{episodes}per-task.json"
        if not out.exists():
            sop(["eval", "--version", str(version), "--episodes-per-task", str(episodes), "--no-paraphrases",
                 "-o", str(out), *(["--tasks", ",".join(tasks)] if tasks else [])], run_dir)
        success = json.loads(out.read_text())["canonical"]
        curve[t] = sum(success.values()) / len(success)
        print(f"    t={t:g} min: v{version} held-out success {curve[t]:.2f}", flush=True)
    return curve


def fleet(args: argparse.Namespace, base: Path, out: Path) -> dict:
    results = {}
    reused = dict(item.split("=", 1) for item in args.reuse)
    for n in args.fleet:
        if str(n) in reused:  # an arm already run with this many actors (e.g. the methods experiment's SOP arm)
            d = Path(reused[str(n)]).resolve()
            summary = json.loads((d / "last-run.json").read_text())["summary"]
        else:
            d = clone(base, out / f"fleet_{n}")
            summary = run_arm(d, minutes=args.minutes, actors=n, extra=["--algorithm", "hg-dagger"], tasks=args.tasks)
        curve = success_over_time(d, checkpoints_min=checkpoints_of(args), episodes=args.checkpoint_episodes, tasks=args.tasks)
        reached = [t for t, v in curve.items() if v >= 0.8]
        results[f"{n}_actors"] = {"time_to_0.8_min": reached[0] if reached else None,
                                  "held_out_success_over_time": curve,
                                  "online_time_to_0.8_min": summary.get("time_to_0.8_min"),
                                  "final_rolling_success": summary.get("final_rolling_success"),
                                  "episodes_per_hour": summary.get("episodes_per_hour"), "run_dir": str(d),
                                  "run": summary}
    first = results.get(f"{args.fleet[0]}_actors", {}).get("time_to_0.8_min")
    base_success = base_mean_success(base)
    for r in results.values():
        if base_success is not None:
            r["base_success"] = base_success
        t = r["time_to_0.8_min"]
        r["speedup"] = first / t if first and t else None
    return results


def sampler_arms(alphas: list[float]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Arm name -> (`sop run` options, environment): per alpha one arm of the paper's formula and one of the
    normalised mix, and the fixed 50/50 mix."""
    arms = {f"adaptive_alpha{a:g}": (["--sampler", "paper"], {"SOP_LEARN_ALPHA": str(a)}) for a in alphas}
    arms.update({f"normalised_alpha{a:g}": (["--sampler", "normalised"], {"SOP_LEARN_ALPHA": str(a)})
                 for a in alphas})
    arms["fixed_50_50"] = (["--sampler", "fixed"], {"SOP_LEARN_FIXED_ONLINE_SHARE": "0.5"})
    return arms


def sampler(args: argparse.Namespace, base: Path, out: Path) -> dict:
    results = {}
    reused = dict(item.split("=", 1) for item in args.reuse)
    base_success = base_mean_success(base)
    for name, (options, env) in sampler_arms(args.alphas).items():
        d = Path(reused[name]).resolve() if name in reused else out / f"sampler_{name}"
        if name not in reused and not done(d, "last-run.json"):
            run_arm(clone(base, d), minutes=args.minutes, actors=args.actors,
                    extra=["--algorithm", "hg-dagger", *options], tasks=args.tasks, env=env)
        if not done(d, "eval.json"):
            evaluate(d, episodes=args.eval_episodes, tasks=args.tasks)
        summary = json.loads((d / "last-run.json").read_text())["summary"]
        curve = success_over_time(d, checkpoints_min=checkpoints_of(args), episodes=args.checkpoint_episodes,
                                  tasks=args.tasks)
        status = json.loads((d / "learner" / "status.json").read_text())
        results[name] = {"success": json.loads((d / "eval.json").read_text())["canonical"],
                         "held_out_success_over_time": curve, "omega_on": omega_history(d),
                         "final_losses": status.get("losses"), "learner_steps": status["step"],
                         "episodes_per_hour": summary.get("episodes_per_hour"), "run_dir": str(d), "run": summary}
        if base_success is not None:
            results[name]["base_success"] = base_success
    return results


def omega_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The online share per task the learner sampled with, by learner step (its MLflow ``omega_on/<task>``)."""
    from infra.registry import registry_client

    client = registry_client(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.data.tags.get("sop.role") == "learner"]
    history: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        for key in (k for k in run.data.metrics if k.startswith("omega_on/")):
            history.setdefault(key.removeprefix("omega_on/"), []).extend(
                (m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
    return {task: sorted(points) for task, points in history.items()}


def arm_dirs(experiment: str, results: dict, out: Path) -> dict[str, Path]:
    if experiment in ("fleet", "sampler"):
        return {arm: Path(r["run_dir"]) for arm, r in results.items()}
    return {arm: out / arm for arm in results if (out / arm / "last-run.json").exists()}


def plot(experiment: str, results: dict, out: Path, *, window: int = 20) -> list[Path]:
    """PNGs next to the tables: held-out success per task and arm (bars), and each arm's rolling online
    success over wall-clock time, read back from the arm's Delta ``episodes`` table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from lakehouse import Lakehouse
    from sop.report import curves, rolling

    written = []
    if experiment in ("methods", "sampler"):
        arms = list(results)
        tasks = sorted(next(iter(results.values()))["success"])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            ax.bar(np.arange(len(tasks)) + i * width, [results[arm]["success"][t] for t in tasks], width, label=arm)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [t.removesuffix("-v3") for t in tasks])
        ax.set(ylabel="success, held-out seeds (operator off)", ylim=(0, 1.05), title=f"{experiment}: success per task")
        ax.axhline(0.9, ls="--", c="grey", lw=0.8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{experiment}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if experiment in ("fleet", "sampler"):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for arm, r in results.items():
            curve = {float(t): v for t, v in r["held_out_success_over_time"].items()}
            ax.plot([0, *curve], [r.get("base_success", np.nan), *curve.values()], marker="o", label=arm)
        ax.axhline(0.8, ls="--", c="grey", lw=0.8)
        ax.set(xlabel="wall-clock time (min)", ylabel="held-out success of the running version", ylim=(0, 1.02),
               title=f"{experiment}: success of the policy the fleet ran (operator off)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / f"{experiment}{'_over_time' if experiment == 'sampler' else ''}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if experiment == "sampler":
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for (arm, r), style in zip(results.items(), ("-", "--", ":", "-."), strict=False):
            for i, (task, points) in enumerate(sorted(r["omega_on"].items())):
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, c=f"C{i}", label=f"{arm}: {task.removesuffix('-v3')}")
        ax.set(xlabel="learner step", ylabel="omega_on (online share of the batch)", ylim=(0, 1),
               title="sampler: online share per task")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out / "sampler_omega.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for arm, d in arm_dirs(experiment, results, out).items():
        lake = Lakehouse(str(d / "lake"))
        if not lake.exists("episodes"):
            continue
        started = json.loads((d / "last-run.json").read_text())["started_at"]
        c = curves(lake.table("episodes").to_pyarrow_table(), started_at_s=started)
        c_window = window * max(1, len(set(c.task.tolist())))
        ax.plot(c.t_min, rolling(c.success, c_window), label=arm)
    ax.axhline(0.8, ls="--", c="grey", lw=0.8)
    ax.set(xlabel="wall-clock time (min)", ylabel="online success (rolling, all tasks)", ylim=(-0.02, 1.02),
           title=f"{experiment}: online success while learning (operator on)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / f"{experiment}_online.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def table(experiment: str, results: dict) -> str:
    lines = []
    if experiment in ("methods", "sampler"):
        tasks = sorted(next(iter(results.values()))["success"])
        lines.append("| arm | " + " | ".join(tasks) + " | mean | episodes/h |")
        lines.append("|---" * (len(tasks) + 3) + "|")
        for arm, r in results.items():
            s = r["success"]
            eph = r.get("episodes_per_hour")
            eph_text = f"{eph:.0f}" if eph else "-"
            cells = " | ".join(f"{s[t]:.2f}" for t in tasks)
            lines.append(f"| {arm} | {cells} | {sum(s.values()) / len(s):.2f} | {eph_text} |")
        if experiment == "sampler":
            checkpoints = list(next(iter(results.values()))["held_out_success_over_time"])
            lines += ["", "| mix | " + " | ".join(f"held-out @ {t:g} min" for t in checkpoints)
                      + " | final | learner steps | mean omega_on (last 20%) |", "|---" * (len(checkpoints) + 4) + "|"]
            for arm, r in results.items():
                curve = " | ".join(f"{r['held_out_success_over_time'][c]:.2f}" for c in checkpoints)
                s = r["success"]
                tail = [value for points in r["omega_on"].values() for _, value in points[int(0.8 * len(points)):]]
                omega = f"{sum(tail) / len(tail):.2f}" if tail else "-"
                lines.append(f"| {arm} | {curve} | {sum(s.values()) / len(s):.2f} | {r['learner_steps']} | {omega} |")
    else:
        checkpoints = list(next(iter(results.values()))["held_out_success_over_time"])
        lines += ["| actors | " + " | ".join(f"held-out @ {t:g} min" for t in checkpoints)
                  + " | time to 0.8 (min) | speed-up | online time to 0.8 (operator on) | episodes/h |",
                  "|---" * (len(checkpoints) + 5) + "|"]
        for arm, r in results.items():
            t, eph, online = r["time_to_0.8_min"], r.get("episodes_per_hour"), r.get("online_time_to_0.8_min")
            curve = " | ".join(f"{r['held_out_success_over_time'][c]:.2f}" for c in checkpoints)
            speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
            lines.append(f"| {arm} | {curve} | {f'≤ {t:g}' if t else 'not reached'} | {speed} | "
                         f"{f'{online:.1f}' if online else '-'} | {f'{eph:.0f}' if eph else '-'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", choices=["methods", "fleet", "sampler"])
    ap.add_argument("--minutes", type=float, default=30.0, help="Wall-clock budget of each arm's online phase.")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--fleet", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--checkpoint-min", type=float, default=3.0,
                    help="fleet, sampler: evaluate the running policy on held-out seeds every this many minutes of "
                         "each arm.")
    ap.add_argument("--checkpoint-episodes", type=int, default=10,
                    help="fleet, sampler: episodes per task per checkpoint.")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="ARM=DIR",
                    help="Take an arm from an earlier run directory instead of running it: fleet N=DIR (N actors), "
                         "sampler adaptive_alphaA=DIR, normalised_alphaA=DIR or fixed_50_50=DIR.")
    ap.add_argument("--alphas", type=float, nargs="+", default=[2.0],
                    help="sampler: one adaptive arm per alpha of omega_on = exp(a*l_on) / (exp(a*l_on) + exp(l_off)).")
    ap.add_argument("--eval-episodes", type=int, default=50)
    ap.add_argument("--demos", type=int, default=None,
                    help="Demonstrations per task of the shared base (default: the calibrated counts per task).")
    ap.add_argument("--offline-steps", type=int, default=None,
                    help="Learner steps after collection (offline arm); default: as many as the SOP + HG-DAgger arm took.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep arms and evaluations already in --out (an interrupted experiment goes on where it stopped).")
    ap.add_argument("--tasks", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--base", type=Path, default=None,
                    help="The prepared shared base (default: OUT/base), e.g. to add arms to an earlier experiment.")
    args = ap.parse_args()
    global RESUME
    RESUME = args.resume
    base = (args.base or args.out / "base").resolve()
    out = args.out.resolve()
    print(f"preparing the shared base in {base}")
    prepare(base, demos=args.demos, tasks=args.tasks)
    t0 = time.time()
    results = {"methods": methods, "fleet": fleet, "sampler": sampler}[args.experiment](args, base, out)
    md = table(args.experiment, results)
    (out / f"{args.experiment}.json").write_text(json.dumps(results, indent=2, default=str))
    (out / f"{args.experiment}.md").write_text(md + "\n")
    print(md)
    for png in plot(args.experiment, results, out):
        print(f"plot: {png}")
    extra = {"fleet": f" --fleet {' '.join(map(str, args.fleet))}",
             "sampler": f" --alphas {' '.join(f'{a:g}' for a in args.alphas)}"}.get(args.experiment, "")
    if args.experiment != "methods":
        extra += f" --checkpoint-min {args.checkpoint_min:g} --checkpoint-episodes {args.checkpoint_episodes}"
    print(f"({(time.time() - t0) / 60:.0f} min) reproduce: .venv/bin/python -m benchmarks.loop {args.experiment} "
          f"--minutes {args.minutes:g} --actors {args.actors} --eval-episodes {args.eval_episodes}{extra}")


if __name__ == "__main__":
    main()
