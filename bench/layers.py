"""What do 4 stored encoder layers cost against 1 (issue 24)? Loader, extraction, storage and training.

    .venv/bin/python bench/layers.py [--quick] [--rounds R] [--no-cold] [--device cpu|cuda|auto] [--model demo|paper]
                                     [--parts read,extract,storage,train]

Measured in one run, each pair alternated round by round (bench/timing.py), medians; every ratio is L = 4 over
L = 1 by wall time, and again by this process's CPU time (`*_cpu*`: the steadier figure on a loaded shared machine):
  read     two synthetic stores of the same utterances written through StoreWriter (bench/loader.py's writer:
           WavLM-large 1024-d and Whisper-large 1280-d frames at 50 frames/s, RoBERTa-large 1024-d tokens at
           ~3/s, float16, 2-8 s utterances), one with L = 4 hidden states per encoder (frames (T, 4, D)), one
           written without `layers` (L = 1). The trainer's loader (`BatchReader` in prefetch threads, as
           mtser.trainer.setup builds it for the device: float32 padded on the CPU; float16 as stored, packed where
           L = 1, for a GPU) reads every training utterance of each store, the L = 4 one with
           `layers={enc: [0, 1, 2, 3]}`, 4 x --rounds passes each (a pass is short). read_bytes_per_s_ratio:
           stored bytes/s (goal >= 0.9: the extra layers cost their bytes and nothing else); warm page cache,
           then cold (each store's files evicted with posix_fadvise DONTNEED before each pass, bench/store_read.py's
           `evict`) unless --no-cold.
  extract  `extract()` in this process (workers=0) over the espeak-ng demo corpus with bench/extract.py's --quick
           encoders (random-init WavLM, Whisper and RoBERTa of 192 dims and 3 layers: 4 hidden states each) and
           configs/demo.yaml's extraction settings, storing all 4 hidden states (`layers: [0, 1, 2, 3]`) against
           the last one (`layer: -1`); each run into a fresh store, model loading included, after one warm-up run
           of each. extract_time_ratio: wall time (goal <= 1.2: one forward pass).
  storage  bytes per utterance and layer of the real layout: bench/layer_storage.py's `segment_bytes` for one
           WavLM-large (1024-d) part of 10 s utterances, float16 and int8, L = 4; and the read stores' own part
           bytes (3 encoders, float16, L = 4 and L = 1) over utterances x L.
  train    bench/tune.py's `StepBench`: a cohort of demo-size members (--model paper: configs/paper.yaml's;
           FusionNetwork through mtser.trainer.cohort) stepping on the same in-memory batches of both stores, 1
           torch thread on the CPU:
           `model.layer_weights: true` over the 4 layers against the plain network on the L = 1 store, for ASP and
           mean pooling (mean: pool each layer, then mix). train_samples_per_s_ratio_{asp,mean}: samples/s (goal
           for mean >= 0.8).
--quick: 40 store utterances, 10 corpus utterances, a cohort of 2 members stepping 2 batches of 16, 3 rounds
(54 s measured on the 2-core machine at load 2.3); the full run: 384, 32, 4 members x 4 batches of 32, 5 rounds.
--device cuda puts the loader on the GPU path and the steps on the GPU (bfloat16 autocast); extraction takes the
GPU itself where there is one. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from extract import ASR_TOKENS, SIZES, build_encoders  # noqa: E402  (bench/extract.py: random-init encoders)
from layer_storage import feature_bytes, segment_bytes  # noqa: E402
from loader import ENCODERS, time_loader, write_store  # noqa: E402  (bench/loader.py: the synthetic store)
from store_read import evict  # noqa: E402  (drops a folder's files from the page cache)
from timing import alternated_wall_cpu  # noqa: E402
from tune import StepBench, make_setup  # noqa: E402

from mtser.featurestore.corpus import read_corpus  # noqa: E402
from mtser.featurestore.store import create_store, open_store  # noqa: E402
from mtser.trainer import data  # noqa: E402
from mtser.trainer.config import load_config  # noqa: E402

L = 4
LAYERS = list(range(L))
MSP_FRAMES_PER_UTTERANCE = 500                                      # 10 s at 50 frames/s (bench/layer_storage.py)
PARTS = ("read", "extract", "storage", "train")
READ_ROUNDS = 4                     # read passes are short (0.1-1 s): 4 x the rounds, so load spikes fall out
# (store utterances, read batch size, extraction utterances, train members, steps, batch size, rounds)
QUICK = dict(utterances=40, batch=16, extract_utterances=10, members=2, steps=2, train_batch=16, rounds=3)
FULL = dict(utterances=384, batch=32, extract_utterances=32, members=4, steps=4, train_batch=32, rounds=5)


def stored_bytes(store, ids: list[str], layers: int) -> int:
    """Bytes of the frames of `ids` as stored (float16), every encoder, `layers` hidden states each."""
    return sum(store.length(i, n) * layers * store.encoders[n].dim * 2 for i in ids for n in ENCODERS)


def time_reads(urls: dict[int, str], batch_size: int, rounds: int, device: str, cold: bool) -> dict:
    """Loader bytes/s per store (warm, and cold), the trainer's reader for `device` over the same batches: the
    ratios L = 4 over L = 1 of bytes per wall second and per CPU second of this process, and each one's MB/s."""
    import torch

    gpu = device == "cuda"
    stores = {n: open_store(url) for n, url in urls.items()}
    pool = data.training_ids(stores[1], list(ENCODERS), "multi")
    ids = data.epoch_sample(pool, len(pool), seed=0, epoch=1)
    batches = [list(b) for b in data.chunks(ids, batch_size)]
    host = data.host_dtype(torch.device(device))
    readers = {n: data.BatchReader(store, list(ENCODERS), host, pin_memory=gpu, packed=gpu,
                                   layers=None if n == 1 else {e: LAYERS for e in ENCODERS})
               for n, store in stores.items()}
    nbytes = {n: stored_bytes(stores[n], ids, n) for n in stores}
    for reader in readers.values():
        time_loader(reader, batches[:2], 4)                         # open files, build indexes
    order = sorted(readers)
    runs = [lambda r=readers[n]: time_loader(r, batches, 4) for n in order]
    out: dict = {"read_bytes_per_s_ratio": None, "read_bytes_per_s_ratio_cold": None}
    for mode in ("warm", "cold") if cold else ("warm",):
        before = (lambda i: evict(Path(urls[order[i]]))) if mode == "cold" else None
        wall, cpu = alternated_wall_cpu(runs, rounds, before)
        rate = {n: nbytes[n] / s for n, s in zip(order, wall)}
        cpu_rate = {n: nbytes[n] / s for n, s in zip(order, cpu)}
        suffix = "" if mode == "warm" else "_cold"
        out.update({f"read_bytes_per_s_ratio{suffix}": round(rate[L] / rate[1], 3),
                    f"read_bytes_per_cpu_s_ratio{suffix}": round(cpu_rate[L] / cpu_rate[1], 3),
                    **{f"read_mb_per_s_l{n}_{mode}": round(rate[n] / 1e6, 1) for n in order}})
        print(f"read ({mode}): L={L} {rate[L] / 1e6:.0f} MB/s, L=1 {rate[1] / 1e6:.0f} MB/s "
              f"({len(ids)} utterances, {nbytes[L] / 1e6:.0f} / {nbytes[1] / 1e6:.0f} MB stored)", flush=True)
    return out


def time_extraction(work: Path, n: int, rounds: int) -> dict:
    """Median wall and encoder seconds of extract() (in process) storing 4 hidden states against 1."""
    from transformers.utils import logging as hf_logging

    from mtser.demo import make_demo_corpus
    from mtser.featurestore.extract import extract

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    encoders = build_encoders(work / "encoders", SIZES["quick"])
    utts = read_corpus(make_demo_corpus(work / "corpus", size=max(n, 10), seed=1)).utterances[:n]
    base = load_config(BENCH.parent / "configs" / "demo.yaml").extract
    one = replace(base, encoders=[replace(e, model=str(encoders / e.name)) for e in base.encoders],
                  asr_max_new_tokens=ASR_TOKENS)
    cfgs = {1: one, L: replace(one, encoders=[replace(e, layers=LAYERS) for e in one.encoders])}
    encode: dict[int, list[float]] = {1: [], L: []}
    runs = 0

    def run(layers: int) -> None:
        nonlocal runs
        runs += 1
        url = str(work / f"extract-{runs}.zarr")
        summary = extract(utts, cfgs[layers], url, workers=0, progress=False)
        if not summary.ok or summary.written != len(utts):
            raise SystemExit(f"bench: extraction with L={layers} failed: {summary.line()}")
        encode[layers].append(summary.encode_seconds)
        shutil.rmtree(url)

    for layers in encode:                                           # first model loads, imports, kernel plans
        run(layers)
        encode[layers].clear()
    wall, cpu = (dict(zip((1, L), t)) for t in alternated_wall_cpu([lambda: run(1), lambda: run(L)], rounds))
    enc = {n: statistics.median(t) for n, t in encode.items()}
    print(f"extract: {len(utts)} utterances, L={L} {wall[L]:.2f} s, L=1 {wall[1]:.2f} s (encoders {enc[L]:.2f} / "
          f"{enc[1]:.2f} s)", flush=True)
    return {"extract_time_ratio": round(wall[L] / wall[1], 3),
            "extract_encoder_time_ratio": round(enc[L] / enc[1], 3),
            "extract_cpu_time_ratio": round(cpu[L] / cpu[1], 3),
            "extract_s_l1": round(wall[1], 2), f"extract_s_l{L}": round(wall[L], 2), "extract_utterances": len(utts)}


def storage(work: Path, urls: dict[int, str], utterances: int, quick: bool) -> dict:
    """Bytes per utterance and layer: WavLM-large parts of 10 s utterances (float16, int8), and the read stores'."""
    out = {}
    for dtype in ("float16", "int8"):
        url = str(work / f"storage-{dtype}.zarr")
        create_store(url)
        per_frame = segment_bytes(url, "wavlm", 1024, "speech", dtype, L, 4 if quick else 24)
        out[f"bytes_per_utterance_layer_{dtype}"] = round(per_frame * MSP_FRAMES_PER_UTTERANCE)
    for n, url in urls.items():
        out[f"store_bytes_per_utterance_layer_l{n}"] = round(sum(feature_bytes(url, e) for e in ENCODERS)
                                                             / (utterances * n))
    print("storage per 10 s utterance and layer (WavLM-large): " + ", ".join(
        f"{d} {out[f'bytes_per_utterance_layer_{d}'] / 1e3:.0f} kB" for d in ("float16", "int8")) +
        f"; the read stores (3 encoders, 2-8 s): L={L} {out[f'store_bytes_per_utterance_layer_l{L}'] / 1e3:.0f} kB,"
        f" L=1 {out['store_bytes_per_utterance_layer_l1'] / 1e3:.0f} kB", flush=True)
    return out


def time_training(urls: dict[int, str], model: str, device: str, members: int, steps: int, batch: int,
                  rounds: int) -> dict:
    """Samples/s ratio (4 layers with learned weights / the plain network on 1) of a cohort step, per pooling."""
    plain = make_setup(model, device, False)
    weighted = replace(plain, recipe={**plain.recipe, "model.layer_weights": True})
    out = {}
    for pooling in ("asp", "mean"):
        benches = {1: StepBench(urls[1], plain, members, steps, pooling, batch_size=batch),
                   L: StepBench(urls[L], weighted, members, steps, pooling, {e: LAYERS for e in ENCODERS}, batch)}
        cohorts = {n: [(*b.cohort(b.models), b.losses)] for n, b in benches.items()}
        runs = [plain.synced(lambda n=n: benches[n].cohort_steps(cohorts[n])) for n in (1, L)]
        for run in runs:
            run()                                                   # first-touch pages, GEMM plans
        wall, cpu = (dict(zip((1, L), t)) for t in alternated_wall_cpu(runs, rounds))
        rate = {n: steps * batch / wall[n] for n in wall}
        out[f"train_samples_per_s_ratio_{pooling}"] = round(rate[L] / rate[1], 3)
        out[f"train_samples_per_s_ratio_{pooling}_cpu"] = round(cpu[1] / cpu[L], 3)
        out[f"train_samples_per_s_{pooling}_l1"] = round(rate[1], 1)
        out[f"train_samples_per_s_{pooling}_l{L}"] = round(rate[L], 1)
        print(f"train ({pooling}, cohort of {members}): L={L} with layer weights {rate[L]:.1f} samples/s, "
              f"L=1 plain {rate[1]:.1f} samples/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stores, corpus and steps (within 60 s)")
    parser.add_argument("--rounds", type=int, help="alternated rounds per pair (default 3 quick, 5 full)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache reads")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                        help="the loader's and the training steps' device (auto: cuda where there is one)")
    parser.add_argument("--model", choices=["demo", "paper"], default="demo",
                        help="the training members' size (configs/demo.yaml's or configs/paper.yaml's model)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default all)")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}, got {args.parts!r}")
    size = QUICK if args.quick else FULL
    rounds = args.rounds or size["rounds"]
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    started, load = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="mtser-bench-layers-"))
    try:
        urls = {n: str(work / f"l{n}.zarr") for n in (1, L)}
        for n, url in urls.items():                                 # the same utterances, lengths and labels
            write_store(url, size["utterances"], seed=0, layers=None if n == 1 else n)
        print(f"wrote {size['utterances']} utterances with L=1 and L={L} in {time.perf_counter() - started:.1f} s",
              flush=True)
        result = {}
        if "read" in parts:
            result.update(time_reads(urls, size["batch"], READ_ROUNDS * rounds, device, not args.no_cold))
        if "extract" in parts:
            result.update(time_extraction(work, size["extract_utterances"], rounds))
        if "storage" in parts:
            result.update(storage(work, urls, size["utterances"], args.quick))
        if "train" in parts:
            result.update(time_training(urls, args.model, device, size["members"], size["steps"], size["train_batch"],
                                        rounds))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"layers": L, "model": args.model, "quick": args.quick, "rounds": rounds, "device": device,
                   "store_utterances": size["utterances"], "cpus": os.cpu_count(),
                   "load_average_start": round(load, 2), "load_average_end": round(os.getloadavg()[0], 2),
                   "seconds": round(time.perf_counter() - started, 1)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
