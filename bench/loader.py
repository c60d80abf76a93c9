"""Does the trainer's loader keep up? Loader samples/s versus raw store reads, and the share of training step time
spent waiting for data.

    .venv/bin/python bench/loader.py [--quick | --tiny] [--store URL] [--model demo|paper] [--threads N]

Without --store it writes a synthetic store of realistic shapes through StoreWriter (WavLM-large 1024-d and
Whisper-large 1280-d frames at 50 frames/s, RoBERTa-large 1024-d tokens at ~3 tokens/s, float16). Both readers
walk the same sampled batches, alternately, in one run:
  raw     store.get_many per encoder per batch, in the calling thread (what a naive loop pays)
  loader  mtser.trainer.data.BatchReader in background prefetch threads, label lookup and masks included:
          as stored for a GPU (the frames back to back in one buffer, padded on the device: loader_vs_raw), and
          for the CPU (each utterance read into its row of a padded (B, T, D) buffer, converted to float32)
Then a short `mtser.trainer.loop.train` run reports the fraction of step time spent waiting in next(batch).
--tiny (bench/gpu.sh --dry-run): the same steps on 32 utterances with the model's config shrunk to 16-wide layers
(`TINY_MODEL`): checks, not measures. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.labels import CLASSES  # noqa: E402
from mtser.featurestore.prefetch import prefetch  # noqa: E402
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, open_store, register_encoder  # noqa: E402
from mtser.trainer import data  # noqa: E402
from mtser.trainer.config import load_config  # noqa: E402

ENCODERS = {"wavlm": (1024, 50.0), "whisper": (1280, 50.0), "roberta": (1024, 3.0)}  # dim, frames per second
CONFIG = Path(__file__).resolve().parent.parent / "configs"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3                                       # glibc mallopt parameters
TINY_MODEL = {"model.attention_dim": 8, "model.proj_dim": 16, "model.lstm_hidden": 16, "model.lstm_layers": 1,
              "train.batch_size": 8, "train.eval_batch_size": 16}                 # the dry runs' members


def write_store(url: str, n: int, seed: int = 0, layers: int | None = None) -> None:
    """n utterances of 2-8 s (80 % Train, 20 % Development), random labels and features, parts of 64; `layers`:
    each encoder stores that many hidden states (0..L-1), frames (T, L, D) (None: one, as before issue 24)."""
    rng = np.random.default_rng(seed)
    create_store(url)
    stored = None if layers is None else list(range(layers))
    frame = () if layers is None else (layers,)
    for name, (dim, rate) in ENCODERS.items():
        register_encoder(url, EncoderInfo(name, "speech", f"bench/{name}", None, None, -1, 1, dim, rate, "float16",
                                          "none", 16000, "bench", {}, layers=stored))
    for start in range(0, n, 64):
        writer = StoreWriter(url, f"part-{start:06d}")
        for i in range(start, min(n, start + 64)):
            seconds = rng.uniform(2, 8)
            utt = Utterance(f"utt_{i:06d}.wav", None, "Train" if i % 5 else "Development",
                            CLASSES[i % 8], *rng.uniform(1, 7, 3).tolist())
            writer.add(utt, {name: rng.standard_normal((max(1, int(seconds * rate)), *frame, dim), dtype=np.float32)
                             for name, (dim, rate) in ENCODERS.items()})
        writer.commit()


def time_raw(store, batches: list[list[str]], encoders: list[str]) -> float:
    start = time.perf_counter()
    for ids in batches:
        for name in encoders:
            store.get_many(ids, name)
    return time.perf_counter() - start


def time_loader(reader: data.BatchReader, batches: list[list[str]], depth: int) -> float:
    """One pass of the trainer's loader; the reader lives across passes, as it lives across a run's epochs."""
    start = time.perf_counter()
    for _ in prefetch(reader, batches, depth=depth):
        pass
    return time.perf_counter() - start


def training_wait(url: str, model: str, epochs: int, samples: int, out: Path, tiny: bool = False
                  ) -> tuple[float, float]:
    """Mean data-wait fraction and samples/s of a short training run on the store."""
    from mtser.trainer.loop import train

    encoders = [{"name": n, "kind": "speech", "model": f"bench/{n}"} for n in ENCODERS]
    base = "paper.yaml" if model == "paper" else "demo.yaml"
    cfg = load_config(CONFIG / base, {"extract.encoders": encoders, "model.encoders": list(ENCODERS),
                                      "train.epochs": epochs, "train.samples_per_epoch": samples,
                                      "train.batch_size": 32, "train.device": "auto",
                                      **(TINY_MODEL if tiny else {})})
    history = train(cfg, url, out).history
    wait = statistics.mean(row["data_wait_fraction"] for row in history)
    speed = sum(samples for _ in history) / sum(row["train_seconds"] for row in history)
    return wait, speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small store and run (< 60 s)")
    parser.add_argument("--tiny", action="store_true", help="tiny store and model: the dry run's check of every step "
                                                            "(measures nothing)")
    parser.add_argument("--store", help="use this store instead of writing a synthetic one")
    parser.add_argument("--model", choices=["demo", "paper"], default="demo", help="model size for the training run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for the training run (1: the loader threads get the other core)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    n, samples, epochs = (32, 16, 1) if args.tiny else (192, 96, 2) if args.quick else (2048, 1024, 3)
    repeats = 1 if args.tiny else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or f"{tmp}/bench.zarr"
        if not args.store:
            started = time.perf_counter()
            write_store(url, n)
            print(f"wrote {n} utterances to {url} in {time.perf_counter() - started:.1f} s", flush=True)
        # The raw reads' per-utterance arrays come from glibc's heap or, depending on what the process freed
        # before (its dynamic mmap threshold), each from a fresh mmap that pays a page fault per 4 KiB: measured
        # here, raw reads then ran 2.5x slower and flattered the loader. Pin the heap path for a fair baseline.
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 256 << 20)
        ctypes.CDLL("libc.so.6").mallopt(M_TRIM_THRESHOLD, 1 << 30)
        store = open_store(url)
        encoders = sorted(store.encoders)
        pool = data.training_ids(store, encoders, "multi")
        ids = data.epoch_sample(pool, min(len(pool), samples), seed=0, epoch=1)
        batches = [list(b) for b in data.chunks(ids, args.batch_size)]
        # The GPU path: frames back to back as stored (padded later, on the device); the CPU path: padded float32.
        as_stored = data.BatchReader(store, encoders, packed=True)
        as_float32 = data.BatchReader(store, encoders, np.float32)
        time_raw(store, batches[:2], encoders)  # warm all paths (first reads open files, build indexes)
        time_loader(as_stored, batches[:2], args.prefetch)
        time_loader(as_float32, batches[:2], args.prefetch)
        raw, loader, loader32 = [], [], []
        for _ in range(repeats):  # alternate so drift hits all alike
            raw.append(time_raw(store, batches, encoders))
            loader.append(time_loader(as_stored, batches, args.prefetch))
            loader32.append(time_loader(as_float32, batches, args.prefetch))
        raw_sps, loader_sps, loader32_sps = (len(ids) / statistics.median(t) for t in (raw, loader, loader32))
        print(f"raw store reads : {raw_sps:8.1f} samples/s  (median of {repeats}: {statistics.median(raw):.2f} s)")
        print(f"trainer loader  : {loader_sps:8.1f} samples/s  (GPU path: packed as stored, masks, prefetch "
              f"depth {args.prefetch})")
        print(f"loader, float32 : {loader32_sps:8.1f} samples/s  (CPU path: converted to float32 in the threads)")
        wait, train_sps = training_wait(url, args.model, epochs, samples, Path(tmp) / "run", args.tiny)
        print(f"training ({args.model} model, {epochs} epochs x {samples}): {train_sps:.1f} samples/s, "
              f"{wait:.1%} of step time waiting for data")
    print(json.dumps({"loader_vs_raw": round(loader_sps / raw_sps, 3), "data_wait_fraction": round(wait, 4),
                      "loader_float32_vs_raw": round(loader32_sps / raw_sps, 3),
                      "raw_samples_per_s": round(raw_sps, 1), "loader_samples_per_s": round(loader_sps, 1),
                      "train_samples_per_s": round(train_sps, 1), "model": args.model, "quick": args.quick,
                      "tiny": args.tiny, "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "batch_size": args.batch_size, "prefetch_batches": args.prefetch,
                      "torch_threads": args.threads}))


if __name__ == "__main__":
    main()
