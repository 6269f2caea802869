"""Step events (64×64 JPEG) published and acknowledged per second: codec + EventPublisher vs raw produce.

    .venv/bin/python -m benchmarks.publish [--steps 100000] [--rounds 3]

Both sides use the same producer settings (idempotent, acks=all, lz4, linger) and the same
records; the raw side produces bytes encoded before the clock starts. Rounds alternate the order;
the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from confluent_kafka import Producer

from benchmarks._stack import benchmark_kafka, fresh_topics
from producers.loadgen import LoadGenConfig, iter_fleet
from producers.publisher import EventPublisher, PublisherConfig
from schemas import codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()

    cfg = LoadGenConfig(robots=20, hz=0, duration_s=None, episodes=10**9, image_size=args.image_size, seed=1)
    steps = []
    for name, rec in iter_fleet(cfg):
        if name == "Step":
            steps.append(rec)
            if len(steps) == args.steps:
                break
    encoded = [codec.encode("Step", r) for r in steps]
    print(f"{len(steps):,} Step records, mean {sum(map(len, encoded)) / len(encoded):,.0f} bytes encoded "
          f"({args.image_size}×{args.image_size} JPEG)")

    with benchmark_kafka() as bootstrap:
        ours_rates, raw_rates = [], []
        for rnd in range(args.rounds):
            for side in (("ours", "raw") if rnd % 2 == 0 else ("raw", "ours")):
                topics = fresh_topics(bootstrap)
                pconf = PublisherConfig(bootstrap=bootstrap, topics=topics)
                t0 = time.perf_counter()
                if side == "ours":
                    pub = EventPublisher(pconf)
                    for r in steps:
                        pub.publish("Step", r, key=r["episode_id"])
                    assert pub.flush(120) == 0 and pub.stats.delivered == len(steps)
                    pub.close()
                    ours_rates.append(len(steps) / (time.perf_counter() - t0))
                else:
                    raw = Producer(pconf.librdkafka())
                    delivered = [0]

                    def cb(err, _msg, delivered=delivered) -> None:  # noqa: ANN001
                        delivered[0] += err is None

                    for r, data in zip(steps, encoded, strict=True):
                        while True:
                            try:
                                raw.produce(topics["Step"], data, r["episode_id"], on_delivery=cb)
                                break
                            except BufferError:
                                raw.poll(0.05)
                        raw.poll(0)
                    raw.flush(120)
                    assert delivered[0] == len(steps)
                    raw_rates.append(len(steps) / (time.perf_counter() - t0))
                print(f"  round {rnd + 1} {side:>4}: {(ours_rates if side == 'ours' else raw_rates)[-1]:>9,.0f} steps/s")
    ours, raw_ = statistics.median(ours_rates), statistics.median(raw_rates)
    print(f"codec + EventPublisher : {ours:>9,.0f} steps/s (acknowledged)")
    print(f"raw confluent produce  : {raw_:>9,.0f} steps/s (acknowledged, pre-encoded bytes)")
    print(f"ratio                  : {ours / raw_:.2f}   (target >= 0.75, and >= 20,000 steps/s)")
    print("reproduce: .venv/bin/python -m benchmarks.publish "
          f"--steps {args.steps} --rounds {args.rounds} --image-size {args.image_size}")


if __name__ == "__main__":
    main()
