"""Stream processing: Kafka events → assembled episodes → rewards, returns, values, advantages → Delta.

Owns the faust app of ``sop process`` (:mod:`consumers.processor`), the pure episode assembly and
close-time columns (:mod:`consumers.assembly`, using RECAP's numpy-only math in ``rewards.recap`` —
the one module of ``learner`` this package imports, so that processor and learner agree on rewards
by construction), the dead-letter path (:mod:`consumers.deadletter`), the processor's Prometheus metrics
(:mod:`consumers.metrics`) and a plain decoding consumer for tools and tests (:mod:`consumers.decoding`).

    step, episode and intervention events ─▶ episode-meta / episode-steps tables (changelog-backed; steps in chunks)
          ENDED + all steps ─▶ close_episode() ─▶ pending rows ─▶ flush: ExactlyOnceWriter ×3 ─▶ ack
"""
