"""Trainer steps/s fed by the real sampler (Delta -> DeltaFeeder -> AdaptiveSampler -> Prefetcher) vs fed one
in-memory batch, in the same run, and the sampler's own batch-building rate; and the trainer step against the
physical limit of the core it runs on.

    .venv/bin/python -m benchmarks.learner [--rounds 4] [--steps 150] [--threads 1]

*Core limit.* The model's FLOPs per training step (forward + backward, counted by
``torch.utils.flop_counter.FlopCounterMode`` on one real step) divided by the rate this core reaches on a large
float32 matmul (``--matmul-size``, the same threads) is the shortest step the hardware allows; the figure is that
time over the measured step time of the trainer fed one in-memory batch (1.0 = at the matmul peak). Matmul and
trainer steps alternate in every round, so load from other processes hits both; the per-round fractions' median
and range are printed with the load average.

A temporary Delta lake is filled with loadgen-like rows (64x64 JPEG frames, 39-d state, 4-d actions, human
takeovers) in ``demonstrations`` and ``steps``; the feeder keeps polling it while the trainer runs, and a
writer process (standing in for the stream processor) keeps appending one closed 100-step episode per second
to ``steps``, so the feeder ingests while the trainer trains, as in production. Rounds alternate which side
goes first; medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lakehouse import Lakehouse
from learner.algorithms import make_algorithm
from learner.batch import Batch, BatchBuilder
from learner.config import ModelConfig, SamplerConfig, TrainConfig
from learner.feeder import DeltaFeeder, FeederConfig
from learner.model import VLAPolicy
from learner.quarantine import RowSpec
from learner.sampler import AdaptiveSampler, Prefetcher
from learner.synthetic import HashEmbedder, fill_tables, synthetic_episode, write_rows
from learner.trainer import Learner, retain_freed_memory
from schemas.images import jpeg_pool

TASKS = ("pick-place-v3", "assembly-v3", "drawer-open-v3", "box-close-v3")


class OneBatch:
    """The in-memory side: the same batch again and again (no decoding, no sampling)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def next_batch(self) -> Batch:
        return self.batch


def keep_writing(root: str, stop: Any, image_size: int = 64, cameras: tuple[str, ...] = ("corner",)) -> None:
    """One closed episode per second into ``steps``, from another process (as the stream processor would)."""
    torch.set_num_threads(1)
    lake = Lakehouse(root)
    frames = jpeg_pool(32, image_size, seed=9)
    rng = np.random.default_rng(5)
    i = 0
    while not stop.wait(1.0):
        write_rows(lake, "steps", synthetic_episode(TASKS[i % len(TASKS)], 100, rng, episode_id=f"bench-live-{i}",
                                                    demo=False, frames=frames, human_steps=range(20, 50),
                                                    image_size=image_size, cameras=cameras))
        i += 1


def matmul_flops_per_s(n: int, reps: int = 3) -> float:
    """The best of ``reps`` ``n x n`` float32 matmuls, in FLOP/s (2 n^3 per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def step_flops(learner: Learner) -> float:
    """FLOPs of one training step (forward, loss, backward; the optimizer's elementwise update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        learner.step()
    return float(counter.get_total_flops())


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def core_limit(learner: Learner, *, rounds: int, steps: int, matmul_size: int) -> None:
    """Print the trainer step against the matmul peak of this core (see the module doc).

    Within a round, single matmuls and pairs of trainer steps alternate (``steps`` of each kind of slot), so a load
    that comes and goes hits both alike; each round's figure is its median step against its median matmul."""
    learner.run(3)
    flops = step_flops(learner)
    a, b = torch.randn(matmul_size, matmul_size), torch.randn(matmul_size, matmul_size)
    torch.mm(a, b)
    fractions, step_ms, peaks = [], [], []
    print(f"core limit (load average {load_average()}):")
    for rnd in range(rounds):
        mm_s, st_s = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            t1 = time.perf_counter()
            learner.run(2)
            mm_s.append(t1 - t0)
            st_s.append((time.perf_counter() - t1) / 2)
        peak = 2 * matmul_size**3 / statistics.median(mm_s)
        seconds = statistics.median(st_s)
        fractions.append(flops / peak / seconds)
        step_ms.append(1e3 * seconds)
        peaks.append(peak)
        print(f"  round {rnd + 1}: matmul {peak / 1e9:5.1f} GFLOP/s, step {1e3 * seconds:5.1f} ms -> "
              f"{flops / seconds / 1e9:5.1f} GFLOP/s = {fractions[-1]:.2f} of the limit")
    peak = statistics.median(peaks)
    print(f"model FLOPs per step              : {flops / 1e9:.2f} GFLOP (batch {learner.batches.next_batch().size})")
    print(f"float32 matmul {matmul_size}x{matmul_size}        : {peak / 1e9:.1f} GFLOP/s (median over rounds, "
          f"{torch.get_num_threads()} thread(s)) -> limit {1e3 * flops / peak:.1f} ms per step")
    print(f"trainer step (one in-memory batch): {statistics.median(step_ms):.1f} ms -> "
          f"{statistics.median(fractions):.2f} of the limit (rounds {min(fractions):.2f}-{max(fractions):.2f}; "
          f"target >= 0.75); load average {load_average()}")


def timed_steps(learner: Learner, steps: int) -> float:
    learner.run(5)  # warm-up (allocator, first batches)
    t0 = time.perf_counter()
    learner.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150, help="Trainer steps per side and round.")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--episodes", type=int, default=10, help="Demonstration and online episodes per task.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the trainer.")
    ap.add_argument("--algorithm", choices=["hg-dagger", "recap"], default="hg-dagger")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run (s).")
    ap.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n float32 matmul (core limit).")
    ap.add_argument("--limit-only", action="store_true", help="Only the core-limit figure (no Delta lake).")
    ap.add_argument("--cameras", type=int, default=1, help="JPEG frames per row (MetaWorld's first N cameras); the "
                                                            "model sees every one.")
    ap.add_argument("--image-size", type=int, default=64,
                    help="Side of the stored JPEG frames; the model's input stays 64 (frames are resized when built).")
    ap.add_argument("--in-loop", type=Path, default=None, metavar="RUN_DIR",
                    help="The learner inside the loop: `sop run --no-learn` in RUN_DIR (kept, reused), then `sop learn` "
                         "variants alternated against it.")
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL[@CHECKOUT][:VAR=VALUE,...] (--in-loop; repeatable; the first is the reference).")
    ap.add_argument("--window", type=float, default=60.0, help="Seconds measured per learner (--in-loop).")
    ap.add_argument("--warmup", type=float, default=20.0, help="Seconds of training before a window (--in-loop).")
    ap.add_argument("--actors", type=int, default=2, help="Actors of the loop (--in-loop).")
    args = ap.parse_args()
    if args.in_loop is not None:
        from benchmarks.learner_loop import Variant, in_loop

        here = Path(__file__).resolve().parents[1]
        variants = [Variant.parse(v, here) for v in args.variant or ["default"]]
        print(f"load average {load_average()}")
        in_loop(run_dir=args.in_loop.resolve(), variants=variants, rounds=args.rounds, seconds=args.window,
                warmup_s=args.warmup, actors=args.actors, checkout=here)
        print(f"reproduce: .venv/bin/python -m benchmarks.learner --in-loop {args.in_loop} --rounds {args.rounds} "
              f"--window {args.window:.0f} --warmup {args.warmup:.0f} --actors {args.actors} "
              + " ".join(f"--variant '{v}'" for v in args.variant))
        return
    torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the trainer does (TrainConfig.retain_memory)
    if args.limit_only:
        limit_only(args)
        return
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    with tempfile.TemporaryDirectory(prefix="sop-bench-learner-") as tmp:
        lake = Lakehouse(Path(tmp) / "lake")
        t0 = time.perf_counter()
        from dataclasses import replace

        from sop.actor_settings import CAMERAS

        cameras = CAMERAS[:args.cameras]
        fill_tables(lake, tasks=TASKS, demos_per_task=args.episodes, online_per_task=args.episodes, length=100,
                    image_size=args.image_size, cameras=cameras)
        rows = 2 * len(TASKS) * args.episodes * 100
        print(f"Delta lake filled: {rows:,} rows ({args.cameras} × {args.image_size}x{args.image_size} JPEG, 39-d "
              f"state) in {time.perf_counter() - t0:.1f} s")

        model_cfg = ModelConfig()
        model_cfg = replace(model_cfg, encoder=replace(model_cfg.encoder, cameras=cameras))
        algorithm = make_algorithm(args.algorithm)
        build = BatchBuilder(model_cfg.encoder, HashEmbedder(), chunk=model_cfg.chunk, action_dim=model_cfg.action_dim)
        # the production path: rows checked at ingest and quarantined (learner.quarantine), as run_learning does
        sampler = AdaptiveSampler(SamplerConfig(batch_size=args.batch_size), build, accept=algorithm.accepts,
                                  spec=RowSpec.for_policy(model_cfg))
        feeder = DeltaFeeder(lake, sampler, FeederConfig(poll_interval_s=0.5))
        feeder.load_initial()
        feeder.start()
        sizes = sampler.sizes()
        print("buffers:", {t.removesuffix("-v3"): s for t, s in sorted(sizes.items())})

        # The sampler alone: batches built per second on one thread (what the prefetch thread can deliver).
        t0 = time.perf_counter()
        n_batches = 40
        for _ in range(n_batches):
            sampler.next_batch()
        batches_per_s = n_batches / (time.perf_counter() - t0)

        stop = multiprocessing.get_context("spawn").Event()
        writer = multiprocessing.get_context("spawn").Process(target=keep_writing, daemon=True,
                                                              args=(lake.root, stop, args.image_size, cameras))
        writer.start()
        fixed_batch = sampler.next_batch()
        fed_rates, fixed_rates, waits = [], [], []
        torch.manual_seed(0)
        model = VLAPolicy(model_cfg)
        for rnd in range(args.rounds):
            for side in (("fed", "fixed") if rnd % 2 == 0 else ("fixed", "fed")):
                train = TrainConfig(algorithm=args.algorithm, publish_every=10**9)
                if side == "fed":
                    with Prefetcher(sampler, depth=4) as prefetch:
                        learner = Learner(model, algorithm, prefetch, train, feedback=sampler)
                        fed_rates.append(timed_steps(learner, args.steps))
                        waits.append(prefetch.waits)
                else:
                    learner = Learner(model, algorithm, OneBatch(fixed_batch), train, feedback=sampler)
                    fixed_rates.append(timed_steps(learner, args.steps))
                rate = (fed_rates if side == "fed" else fixed_rates)[-1]
                print(f"  round {rnd + 1} {side:>5}: {rate:6.1f} steps/s")
        stop.set()
        writer.join(30)
        feeder.close()
        added = feeder.stats().tables["steps"].episodes_added - args.episodes * len(TASKS)

        print()
        learner = Learner(model, algorithm, OneBatch(fixed_batch), TrainConfig(algorithm=args.algorithm,
                                                                               publish_every=10**9),
                          feedback=sampler)
        core_limit(learner, rounds=args.rounds, steps=max(5, args.steps // 5), matmul_size=args.matmul_size)
        print()

    fed, fixed = statistics.median(fed_rates), statistics.median(fixed_rates)
    print(f"trainer fed by the Delta sampler : {fed:6.1f} steps/s  ({fed * args.batch_size:,.0f} samples/s; "
          f"trainer waited for {sum(waits)} batches)")
    print(f"trainer fed one in-memory batch  : {fixed:6.1f} steps/s")
    print(f"ratio                            : {fed / fixed:.2f}   (target >= 0.90)")
    print(f"sampler alone (one thread)       : {batches_per_s * args.batch_size:,.0f} samples/s "
          f"({batches_per_s:.1f} batches of {args.batch_size}, JPEG decode included)")
    print(f"episodes picked up from Delta while training: {added}")
    print(f"reproduce: .venv/bin/python -m benchmarks.learner --rounds {args.rounds} --steps {args.steps} "
          f"--batch-size {args.batch_size} --episodes {args.episodes} --threads {args.threads} "
          f"--algorithm {args.algorithm} --cameras {args.cameras} --image-size {args.image_size}")


def limit_only(args: argparse.Namespace) -> None:
    """The core-limit figure on synthetic rows (no Delta lake, no feeder)."""
    model_cfg = ModelConfig()
    algorithm = make_algorithm(args.algorithm)
    build = BatchBuilder(model_cfg.encoder, HashEmbedder(), chunk=model_cfg.chunk, action_dim=model_cfg.action_dim)
    sampler = AdaptiveSampler(SamplerConfig(batch_size=args.batch_size), build, accept=algorithm.accepts)
    rng = np.random.default_rng(0)
    frames = jpeg_pool(32, 64, seed=9)
    for i, task in enumerate(TASKS):
        sampler.add_episode(synthetic_episode(task, 100, rng, episode_id=f"demo-{i}", demo=True, frames=frames),
                            source="offline")
        sampler.add_episode(synthetic_episode(task, 100, rng, episode_id=f"online-{i}", demo=False, frames=frames,
                                              human_steps=range(20, 50)), source="online")
    torch.manual_seed(0)
    learner = Learner(VLAPolicy(model_cfg), algorithm, OneBatch(sampler.next_batch()),
                      TrainConfig(algorithm=args.algorithm, publish_every=10**9), feedback=sampler)
    core_limit(learner, rounds=args.rounds, steps=max(5, args.steps // 5), matmul_size=args.matmul_size)
    print(f"reproduce: .venv/bin/python -m benchmarks.learner --limit-only --rounds {args.rounds} --steps {args.steps} "
          f"--batch-size {args.batch_size} --threads {args.threads} --algorithm {args.algorithm} "
          f"--matmul-size {args.matmul_size}")


if __name__ == "__main__":
    main()
