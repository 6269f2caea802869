"""Trainer steps/s fed by the real sampler (Delta -> DeltaFeeder -> AdaptiveSampler -> Prefetcher) vs fed one
in-memory batch, in the same run, and the sampler's own batch-building rate.

    .venv/bin/python -m benchmarks.learner [--rounds 4] [--steps 150] [--threads 1]

A temporary Delta lake is filled with loadgen-like rows (64x64 JPEG frames, 39-d state, 4-d actions, human
takeovers) in ``demonstrations`` and ``steps``; the feeder keeps polling it while the trainer runs, and a
writer process (standing in for the stream processor) keeps appending one closed 100-step episode per second
to ``steps``, so the feeder ingests while the trainer trains, as in production. Rounds alternate which side
goes first; medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing
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
from learner.trainer import Learner
from schemas.images import jpeg_pool

TASKS = ("pick-place-v3", "assembly-v3", "drawer-open-v3", "box-close-v3")


class OneBatch:
    """The in-memory side: the same batch again and again (no decoding, no sampling)."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch

    def next_batch(self) -> Batch:
        return self.batch


def keep_writing(root: str, stop: Any) -> None:
    """One closed episode per second into ``steps``, from another process (as the stream processor would)."""
    torch.set_num_threads(1)
    lake = Lakehouse(root)
    frames = jpeg_pool(32, 64, seed=9)
    rng = np.random.default_rng(5)
    i = 0
    while not stop.wait(1.0):
        write_rows(lake, "steps", synthetic_episode(TASKS[i % len(TASKS)], 100, rng, episode_id=f"bench-live-{i}",
                                                    demo=False, frames=frames, human_steps=range(20, 50)))
        i += 1


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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)

    with tempfile.TemporaryDirectory(prefix="sop-bench-learner-") as tmp:
        lake = Lakehouse(Path(tmp) / "lake")
        t0 = time.perf_counter()
        fill_tables(lake, tasks=TASKS, demos_per_task=args.episodes, online_per_task=args.episodes, length=100)
        rows = 2 * len(TASKS) * args.episodes * 100
        print(f"Delta lake filled: {rows:,} rows (64x64 JPEG, 39-d state) in {time.perf_counter() - t0:.1f} s")

        model_cfg = ModelConfig()
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
        writer = multiprocessing.get_context("spawn").Process(target=keep_writing, args=(lake.root, stop), daemon=True)
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
          f"--algorithm {args.algorithm}")


if __name__ == "__main__":
    main()
