"""Actor throughput vs the bare simulator, and policy propagation latency across a fleet.

    .venv/bin/python -m benchmarks.actor [--seconds 15] [--rounds 2] [--actors 3] [--promotions 10]

1. Steps/s of one free-running `sop actor` (``run_actor``: MetaWorld physics + one 64×64 camera + the policy
   loaded from the registry + the gated operator + JPEG + Avro + publish to a real broker, acknowledged)
   against the simulator alone (physics + the same rendering) in the same run; rounds alternate the order.
2. Propagation: a fleet of N free-running `sop actor` processes (`sop fleet`) follows the alias; the
   benchmark moves the alias to a pre-registered version and measures, per actor, the time from the move to
   the first step acted by the new version (the ``event_time_us`` of that Step, as published). The fleet's
   latency for a promotion is the slowest actor's. Versions switch between episodes only, so the latency
   is registry poll + download/load + the rest of the episode in progress.

A broker is started unless SOP_KAFKA_BOOTSTRAP is set; MLflow is a fresh SQLite store in a temporary
directory. Targets on the 2-core machine: >= 100 steps/s per actor; fleet propagation p50 <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from benchmarks._stack import benchmark_kafka, fresh_topics

if TYPE_CHECKING:
    from sop.actor_settings import ActorSettings
    from sop.settings import Settings

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@dataclass(frozen=True)
class Rate:
    steps: int
    wall_s: float
    cpu_s: float  # CPU time of this process (all its threads) over the same window

    @property
    def per_s(self) -> float:
        return self.steps / self.wall_s

    @property
    def per_cpu_s(self) -> float:
        return self.steps / self.cpu_s


def sim_alone(tasks: list[str], *, image_size: int, seconds: float, max_steps: int) -> Rate:
    """Physics + rendering only: the floor of what an actor can do."""
    from sim.metaworld_robot import MetaWorldRobot, MetaWorldRobotConfig

    robots = [MetaWorldRobot(MetaWorldRobotConfig(task=t, image_size=image_size, max_steps=max_steps)) for t in tasks]
    actions = np.random.default_rng(0).uniform(-1, 1, size=(1024, 4)).astype(np.float32)
    steps, episode = 0, 0
    try:
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            robot = robots[episode % len(robots)]
            robot.reset(seed=10_000 + episode)
            episode += 1
            while True:
                result = robot.act(actions[steps % len(actions)])
                steps += 1
                if result.success or result.timeout or time.perf_counter() - start >= seconds:
                    break
        return Rate(steps, time.perf_counter() - start, time.process_time() - cpu)
    finally:
        for robot in robots:
            robot.close()


def one_actor(tasks: list[str], *, image_size: int, seconds: float, settings: Settings,
              actor_settings: ActorSettings) -> tuple[Rate, int]:
    """The full `sop actor` path (``run_actor``), free-running, measured over ``seconds`` of steady running
    between two of its status snapshots. Returns the rate and the messages delivered in the end."""
    from rich.console import Console

    from producers.fleet import ActorStatus
    from sop.commands.actor import ActorRun, run_actor

    stop = threading.Event()
    outcome: list = []
    status_file = Path(tempfile.mkdtemp(prefix="sop-bench-actor-")) / "status.json"

    def run() -> None:
        outcome.append(run_actor(
            ActorRun(actor_id=f"bench-{random.randrange(10**6)}", tasks=tuple(tasks), control_hz=None,
                     image_size=image_size, show_status=False, status_file=status_file),
            settings=settings, actor_settings=actor_settings, console=Console(quiet=True), stop_event=stop))

    def snapshot(after: float) -> tuple[ActorStatus, float]:
        while True:
            st = ActorStatus.read(status_file)
            if st is not None and st.steps > 0 and st.updated_at > after:
                return st, time.process_time()
            if not thread.is_alive():
                raise RuntimeError("the actor ended early")
            time.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    first, _ = snapshot(0.0)
    a, cpu_a = snapshot(first.updated_at + 1.0)  # past start-up: the first episode is under way
    time.sleep(seconds)
    b, cpu_b = snapshot(time.time())
    stop.set()
    thread.join(120)
    if not outcome or not outcome[0].ok:
        raise RuntimeError(f"actor failed: {outcome[0].error if outcome else 'no outcome'}")
    return Rate(b.steps - a.steps, b.updated_at - a.updated_at, cpu_b - cpu_a), outcome[0].status.delivered


def fleet_propagation(*, actors: int, promotions: int, tasks: list[str], image_size: int, env: dict[str, str],
                      uri: str, run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    """Returns per promotion: the fleet latency (slowest actor), every actor's latency, alias -> loaded (slowest)."""
    from infra.registry import registry_client
    from producers.fleet import ActorStatus
    from sim.expert_version import register_expert_policy

    register_expert_policy(uri, noise_sigma=0.2, seed=0)  # version 1 @champion
    versions = [register_expert_policy(uri, noise_sigma=0.2, seed=i, alias=None) for i in range(1, promotions + 1)]
    log = run_dir / "fleet.log"
    with open(log, "wb") as out:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "sop", "fleet", "--actors", str(actors), "--hz", "0", "--tasks", ",".join(tasks),
             "--image-size", str(image_size), "--id-prefix", "bench"],
            env=env, stdout=out, stderr=subprocess.STDOUT)

    def statuses() -> list[ActorStatus]:
        return [st for p in sorted(run_dir.glob("fleet/*/bench-*.json")) if (st := ActorStatus.read(p))]

    def wait(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if fleet.poll() is not None or time.monotonic() > deadline:
                fleet.kill()
                raise RuntimeError(f"fleet never got to {what}; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)

    client = registry_client(uri)
    fleet_latency, actor_latency, loaded_latency = [], [], []
    try:
        wait(lambda: len(statuses()) == actors and all(st.steps > 200 for st in statuses()), "steady running")
        for n, version in enumerate(versions, 1):
            time.sleep(random.uniform(0.3, 1.0))  # promotions land at random points of the episodes
            moved = time.time()
            client.set_registered_model_alias("sop-policy", "champion", version)
            wait(lambda v=version: all(v in st.first_step_of for st in statuses()), f"version {version}")
            final = statuses()
            lat = [st.first_step_of[version] - moved for st in final]
            loaded = [next(s["loaded_at"] for s in st.switches if s["version"] == version) - moved for st in final]
            fleet_latency.append(max(lat))
            actor_latency.extend(lat)
            loaded_latency.append(max(loaded))
            print(f"  promotion {n:>2} → v{version}: first step on every actor after {max(lat):.2f}s "
                  f"(actors {', '.join(f'{x:.2f}' for x in lat)}; loaded after {max(loaded):.2f}s)")
    finally:
        fleet.send_signal(signal.SIGTERM)
        try:
            code = fleet.wait(90)
        except subprocess.TimeoutExpired:
            fleet.kill()
            code = fleet.wait()
        if code != 0:
            print(f"fleet exited with {code}; log:\n{log.read_text()[-3000:]}")
    return fleet_latency, actor_latency, loaded_latency


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per throughput round and side")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--actors", type=int, default=2, help="fleet size for the propagation part")
    ap.add_argument("--promotions", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--tasks", default="pick-place-v3,assembly-v3,drawer-open-v3,box-close-v3")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-propagation", action="store_true")
    args = ap.parse_args()
    tasks = args.tasks.split(",")

    from infra.mlflow_local import ensure_experiment
    from sop.actor_settings import load_actor_settings
    from sop.commands.actor import quiet_mlflow
    from sop.settings import load_settings

    quiet_mlflow()
    with benchmark_kafka() as bootstrap, tempfile.TemporaryDirectory(prefix="sop-bench-actor-") as tmp:
        run_dir = Path(tmp)
        uri = f"sqlite:///{run_dir / 'mlflow.db'}"
        ensure_experiment(uri, run_dir / "mlartifacts")
        topics = fresh_topics(bootstrap)
        prefix = topics["Step"].removesuffix("steps")
        settings = load_settings(kafka_bootstrap=bootstrap, topic_prefix=prefix, mlflow_tracking_uri=uri,
                                 run_dir=run_dir)
        actor_settings = load_actor_settings(actor_status_interval_s=0.1)
        print(f"tasks {', '.join(tasks)}; one {args.image_size}×{args.image_size} corner camera; "
              f"episodes end at success or {settings.max_episode_steps} steps; {os.cpu_count()} CPUs")

        if not args.skip_throughput:
            from sim.expert_version import register_expert_policy

            register_expert_policy(uri, noise_sigma=0.2, seed=0)
            sims: list[Rate] = []
            acts: list[Rate] = []
            for rnd in range(args.rounds):
                for side in ("sim", "actor") if rnd % 2 == 0 else ("actor", "sim"):
                    if side == "sim":
                        sims.append(sim_alone(tasks, image_size=args.image_size, seconds=args.seconds,
                                              max_steps=settings.max_episode_steps))
                        print(f"  round {rnd + 1} simulator alone : {sims[-1].per_s:7.1f} steps/s "
                              f"({sims[-1].per_cpu_s:6.1f} per CPU-second)")
                    else:
                        rate, delivered = one_actor(tasks, image_size=args.image_size, seconds=args.seconds,
                                                    settings=settings, actor_settings=actor_settings)
                        acts.append(rate)
                        print(f"  round {rnd + 1} sop actor       : {rate.per_s:7.1f} steps/s "
                              f"({rate.per_cpu_s:6.1f} per CPU-second; {delivered:,} messages acknowledged)")
            sim = statistics.median(r.per_s for r in sims)
            act = statistics.median(r.per_s for r in acts)
            sim_cpu = statistics.median(r.per_cpu_s for r in sims)
            act_cpu = statistics.median(r.per_cpu_s for r in acts)
            print(f"simulator alone (physics + render)            : {sim:7.1f} steps/s  {sim_cpu:7.1f} per CPU-s")
            print(f"sop actor (+ policy, operator, JPEG, publish) : {act:7.1f} steps/s  {act_cpu:7.1f} per CPU-s"
                  "   (target >= 100 steps/s)")
            print(f"ratio actor / simulator                       : {act / sim:7.2f}        {act_cpu / sim_cpu:7.2f}")

        if not args.skip_propagation:
            uri2 = f"sqlite:///{run_dir / 'mlflow-fleet.db'}"
            ensure_experiment(uri2, run_dir / "mlartifacts-fleet")
            env = {**os.environ, "SOP_RUN_DIR": str(run_dir), "SOP_KAFKA_BOOTSTRAP": bootstrap,
                   "SOP_TOPIC_PREFIX": prefix, "SOP_MLFLOW_TRACKING_URI": uri2,
                   "SOP_ACTOR_STATUS_INTERVAL_S": "0.1"}
            print(f"policy propagation: fleet of {args.actors} free-running `sop actor` processes, "
                  f"{args.promotions} promotions, poll interval {actor_settings.actor_poll_interval_s}s")
            fleet, per_actor, loaded = fleet_propagation(actors=args.actors, promotions=args.promotions, tasks=tasks,
                                                         image_size=args.image_size, env=env, uri=uri2, run_dir=run_dir)
            print(f"alias moved → loaded on every actor           : p50 {pct(loaded, 50):.2f}s  p99 {pct(loaded, 99):.2f}s")
            print(f"alias moved → first step, every actor (fleet) : p50 {pct(fleet, 50):.2f}s  p99 {pct(fleet, 99):.2f}s"
                  "   (target p50 <= 2 s)")
            print(f"alias moved → first step, per actor           : p50 {pct(per_actor, 50):.2f}s  "
                  f"p99 {pct(per_actor, 99):.2f}s")
            print(json.dumps({"fleet_p50_s": round(pct(fleet, 50), 3), "fleet_p99_s": round(pct(fleet, 99), 3)}))
    print(f"reproduce: .venv/bin/python -m benchmarks.actor --seconds {args.seconds:g} --rounds {args.rounds} "
          f"--actors {args.actors} --promotions {args.promotions} --image-size {args.image_size}")


if __name__ == "__main__":
    main()
