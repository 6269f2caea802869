"""What checking a version costs an actor: download + verify (SHA-256 of every file against the version's tags) +
build, for the default-size VLA, against hashing the files alone, in the same run.

    .venv/bin/python -m benchmarks.model_load [--rounds 7]

A local SQLite registry in a temporary folder holds one ``sop-vla`` version (default ``ModelConfig``: 64x64 CNN,
safetensors weights); each round fetches it as an actor does (``infra.model_versions.fetch_version``), hashes the
downloaded files again, and builds the runtime (``learner.artifacts.policy_from_version``). Medians are printed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from infra.model_versions import build, fetch_version, sha256_file
from learner import registry
from learner.config import ModelConfig
from learner.model import VLAPolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="sop-bench-load-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    MlflowClient(uri).create_experiment("sop", artifact_location=str(tmp / "artifacts"))
    model = VLAPolicy(ModelConfig()).eval()
    version = registry.register_policy(model, tracking_uri=uri, experiment="sop", embeddings={})
    client = MlflowClient(uri)
    fetch, hashing, builds = [], [], []
    for i in range(args.rounds):
        t0 = time.perf_counter()
        local = fetch_version(client, "sop-policy", version, dst=tmp / f"download-{i}")
        t1 = time.perf_counter()
        for path in local.files.values():
            sha256_file(path)
        t2 = time.perf_counter()
        build(local, registry.BUILDERS)
        t3 = time.perf_counter()
        fetch.append(t1 - t0)
        hashing.append(t2 - t1)
        builds.append(t3 - t2)
    med = statistics.median
    weights = local.file("weights.safetensors").stat().st_size / 1e6
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"sop-vla version: {params:.2f} M parameters, weights.safetensors {weights:.2f} MB, {args.rounds} rounds")
    print(f"download + verify {med(fetch) * 1e3:.1f} ms · build {med(builds) * 1e3:.1f} ms · "
          f"hashing every file alone {med(hashing) * 1e3:.1f} ms")
    print(f"hashing / whole load = {med(hashing) / (med(fetch) + med(builds)):.3f}")
    print("command: .venv/bin/python -m benchmarks.model_load " + f"--rounds {args.rounds}")


if __name__ == "__main__":
    main()
