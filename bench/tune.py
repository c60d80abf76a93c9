"""Search throughput: trials per hour with N concurrent Ray Tune trials versus one at a time, and what training
several grid points on one shared batch stream would save over one stream per grid point.

    .venv/bin/python bench/tune.py [--quick] [--store URL] [--trials K] [--grid G]

Without --store it writes a synthetic store of realistic shapes (bench/loader.py's writer: WavLM-large 1024-d,
Whisper-large 1280-d, RoBERTa-large 1024-d, float16). Measured in one run, side by side:
  serial    `mtser.trainer.tune.run_search` stage 1 over K grid points, max_concurrent 1
  parallel  the same K grid points, as many concurrent trials as CPUs (1 CPU each)
  separate  G demo-size models (different α/β), each trained on its own prefetched batch stream (G × the reads)
  shared    the same G models stepped on one batch stream (each batch read once, used G times)
parallel_speedup = serial wall / parallel wall (same trials). shared_stream_speedup = separate /
shared. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from loader import write_store  # noqa: E402  (bench/loader.py: the synthetic store of realistic shapes)

from mtser.config import load_config  # noqa: E402
from mtser.featurestore.store import open_store  # noqa: E402
from mtser.trainer import data  # noqa: E402

DEMO = BENCH.parent / "configs" / "demo.yaml"


def search_file(path: Path, k: int, concurrent: int, epochs: int, samples: int) -> Path:
    alphas = [round(0.25 * (i + 1), 2) for i in range(k)]
    path.write_text(yaml.safe_dump({
        "base": str(DEMO), "alpha": alphas, "beta": [1.0], "pooling": ["asp"], "sigma": [None],
        "resources": {"cpu": 1.0, "gpu": 0.0}, "max_concurrent": concurrent,
        "overrides": {"train.epochs": epochs, "train.samples_per_epoch": samples, "train.device": "cpu"}}))
    return path


def time_search(store: str, work: Path, k: int, concurrent: int, epochs: int, samples: int) -> tuple[float, float]:
    """(wall seconds, mean data-wait fraction) of a stage-1 search over k grid points."""
    from mtser.trainer.tune import run_search

    name = f"c{concurrent}"
    start = time.perf_counter()
    summary = run_search(search_file(work / f"{name}.yaml", k, concurrent, epochs, samples), store, work / name,
                         stages=(1,), verbose=0)
    wall = time.perf_counter() - start
    if summary.failed or len(summary.table) != k:
        raise SystemExit(f"bench: search {name} failed: {summary.failed}")
    waits = [pd.read_csv(work / name / "stage1" / t / "history.csv")["data_wait_fraction"].mean()
             for t in summary.table["trial"]]
    return wall, float(np.mean(waits))


def time_streams(store_url: str, g: int, steps: int, batch_size: int, shared: bool) -> float:
    """Seconds to take `steps` optimiser steps on each of g models: one shared batch stream or one stream each."""
    import torch

    from mtser.trainer.losses import build_loss
    from mtser.trainer.model import FusionModel

    torch.set_num_threads(1)                # as in a trial with resources.cpu = 1
    store = open_store(store_url)
    cfg = load_config(DEMO, {"model.encoders": None})
    encoders = sorted(store.encoders)
    pool = data.training_ids(store, encoders, "multi")
    counts = data.class_counts(data.label_arrays(store.utterances, pool))
    dims = {n: store.encoders[n].dim for n in encoders}
    torch.manual_seed(0)
    models, optims, losses = [], [], []
    for i in range(g):
        cfg.loss.alpha, cfg.loss.beta = 1.0, 0.25 * (i + 1)
        models.append(FusionModel(dims, cfg.model))
        optims.append(torch.optim.AdamW(models[-1].parameters(), lr=1e-3))
        losses.append(build_loss("multi", cfg.loss, counts))
    reader = data.BatchReader(store, encoders, np.float32)
    batches = data.chunks(data.epoch_sample(pool, steps * batch_size, 0, 1), batch_size)

    def step(i: int, batch: data.Batch) -> None:
        logits, attrs = models[i](batch.features)
        loss = losses[i](logits, attrs, batch.classes, batch.attributes)
        optims[i].zero_grad()
        loss.backward()
        optims[i].step()

    start = time.perf_counter()
    if shared:
        for batch in data.prefetch(reader, batches):
            for i in range(g):
                step(i, batch)
    else:
        for i in range(g):
            for batch in data.prefetch(reader, batches):
                step(i, batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small store and trials (finishes within 60 s)")
    parser.add_argument("--store", help="existing store (default: a synthetic store in a temporary folder)")
    parser.add_argument("--trials", type=int, help="grid points per search (default 2 quick, 4 full)")
    parser.add_argument("--grid", type=int, help="models sharing one stream in the stream comparison (2 quick, 4)")
    args = parser.parse_args()
    k = args.trials or (2 if args.quick else 4)
    g = args.grid or (2 if args.quick else 4)
    epochs, samples, n = (1, 64, 64) if args.quick else (2, 256, 800)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    with tempfile.TemporaryDirectory(prefix="mtser-bench-tune-") as tmp:
        work = Path(tmp)
        store = args.store or str(work / "store")
        if not args.store:
            write_store(store, n)
        cpus = os.cpu_count() or 1
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        serial, serial_wait = time_search(store, work, k, 1, epochs, samples)
        parallel, parallel_wait = time_search(store, work, k, cpus, epochs, samples)
        ray.shutdown()
        steps = 4 if args.quick else 16
        separate, shared = math.inf, math.inf
        for _ in range(2):                  # alternate, keep each side's best: warm-up and noise hit both alike
            separate = min(separate, time_streams(store, g, steps, 32, shared=False))
            shared = min(shared, time_streams(store, g, steps, 32, shared=True))
    result = {
        "trials": k, "concurrent": cpus, "epochs": epochs, "samples_per_epoch": samples,
        "serial_trials_per_hour": round(3600 * k / serial, 1), "parallel_trials_per_hour": round(3600 * k / parallel, 1),
        "parallel_speedup": round(serial / parallel, 3),
        "data_wait_fraction_serial": round(serial_wait, 3), "data_wait_fraction_parallel": round(parallel_wait, 3),
        "grid_models": g, "steps": steps, "separate_streams_s": round(separate, 2),
        "shared_stream_s": round(shared, 2), "shared_stream_speedup": round(separate / shared, 3),
    }
    print(f"serial {serial:.1f} s, parallel ({cpus} at once) {parallel:.1f} s for {k} trials; "
          f"{g} models: separate streams {separate:.1f} s, one shared stream {shared:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
