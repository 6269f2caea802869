"""Step events published and acknowledged per second: codec + EventPublisher vs raw produce of the same bytes.

    .venv/bin/python -m benchmarks.publish [--steps 100000] [--rounds 3] [--cameras 1] [--image-size 64]
    .venv/bin/python -m benchmarks.publish --profile cluster --cameras 3 --image-size 224 --steps 20000

``--profile cluster`` publishes to the cluster profile's 3 brokers (topics RF 3, ``min.insync.replicas=2``,
``acks=all``: a step is acknowledged once two replicas have it).

Both sides use the same producer settings (idempotent, acks=all, lz4, linger) and the same
records; the raw side produces bytes encoded before the clock starts. Rounds alternate the order;
the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

from confluent_kafka import Producer

from benchmarks._stack import PROFILES, benchmark_stack
from producers.loadgen import LoadGenConfig, iter_fleet
from producers.publisher import EventPublisher, PublisherConfig
from schemas import codec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--cameras", type=int, default=1, help="JPEG frames per step.")
    ap.add_argument("--profile", choices=PROFILES, default="local")
    args = ap.parse_args()

    cfg = LoadGenConfig(robots=20, hz=0, duration_s=None, episodes=10**9, image_size=args.image_size,
                        cameras=args.cameras, seed=1)
    steps = []
    for name, rec in iter_fleet(cfg):
        if name == "Step":
            steps.append(rec)
            if len(steps) == args.steps:
                break
    encoded = [codec.encode("Step", r) for r in steps]
    mean_bytes = sum(map(len, encoded)) / len(encoded)
    print(f"{len(steps):,} Step records, mean {mean_bytes:,.0f} bytes encoded "
          f"({args.cameras} × {args.image_size}×{args.image_size} JPEG)")

    with benchmark_stack(args.profile) as stack:
        print(stack.describe())
        bootstrap = stack.bootstrap
        ours_rates, raw_rates = [], []
        for rnd in range(args.rounds):
            for side in (("ours", "raw") if rnd % 2 == 0 else ("raw", "ours")):
                topics = stack.topics()
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
                    del raw  # closed now, not after the broker is gone (it would log connection refusals)
                    assert delivered[0] == len(steps)
                    raw_rates.append(len(steps) / (time.perf_counter() - t0))
                print(f"  round {rnd + 1} {side:>4}: {(ours_rates if side == 'ours' else raw_rates)[-1]:>9,.0f} steps/s")
    ours, raw_ = statistics.median(ours_rates), statistics.median(raw_rates)
    mb = mean_bytes / 1e6
    print(f"codec + EventPublisher : {ours:>9,.0f} steps/s (acknowledged), {ours * mb:,.1f} MB/s")
    print(f"raw confluent produce  : {raw_:>9,.0f} steps/s (acknowledged, pre-encoded bytes), {raw_ * mb:,.1f} MB/s")
    print(f"ratio                  : {ours / raw_:.2f}   (target >= 0.75)")
    print("reproduce: .venv/bin/python -m benchmarks.publish "
          f"--steps {args.steps} --rounds {args.rounds} --cameras {args.cameras} --image-size {args.image_size} "
          f"--profile {args.profile}")


if __name__ == "__main__":
    main()
