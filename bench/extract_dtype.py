"""How far do features computed in bfloat16 / float16 lie from float32 ones, and how much faster are they?

    .venv/bin/python bench/extract_dtype.py [--quick | --large] [--utterances N] [--device cpu|cuda] [--rounds R]

Same corpus and encoders as bench/extract.py (espeak-ng demo corpus; random-init WavLM-large layout, Whisper and
RoBERTa of the real architectures, at bench/extract.py's sizes). Every utterance with a transcript is encoded once
per `compute_dtype` with mtser's pipeline (in process, stored dtype float32 so only the forward pass differs; no ASR
so the text encoder reads the same words), then compared with the float32 features frame by frame:
  cosine      mean over all frames of the cosine between the two feature vectors
  rel_error   mean over utterances of ||x - x_float32|| / ||x_float32|| (Frobenius)
  speed       float32 encode time / this dtype's encode time: median of R rounds, the dtypes' order rotated
              each round (after one warm-up utterance per dtype)
`storage_float16` is float32 features rounded to float16 (what the store keeps by default), for scale.
Random-init weights are not trained ones: the deviations indicate the numerics of each architecture, not the
effect on emotion recognition. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from extract import SIZES, add_size_arguments, build_encoders, run_size  # noqa: E402  (bench/extract.py)

from mtser.featurestore.config import EncoderConfig  # noqa: E402
from mtser.featurestore.corpus import read_corpus  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
KINDS = {"wavlm": "speech", "whisper": "whisper", "roberta": "text"}


def deviation(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float]:
    """(mean frame cosine, mean relative Frobenius error) of `got` against `ref` over the same utterances."""
    cosines, errors = [], []
    for utt_id, a in ref.items():
        b = got[utt_id].astype(np.float64)
        a = a.astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.append((a * b).sum(axis=1) / np.maximum(norms, 1e-30))
        errors.append(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
    return float(np.concatenate(cosines).mean()), float(np.mean(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_arguments(parser, 24)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--rounds", type=int, default=1, help="timing rounds (median; default 1)")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    from mtser.demo import make_demo_corpus
    from mtser.featurestore.pipeline import encode_utterances

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size, n = run_size(args, 24)
    work = Path(tempfile.mkdtemp(prefix="mtser-bench-dtype-"))
    try:
        encoders = build_encoders(work / "encoders", SIZES[size])
        utts = [u for u in read_corpus(make_demo_corpus(work / "corpus", size=n, seed=1)).utterances if u.transcript]
        print(f"{len(utts)} utterances with transcripts; encoders {SIZES[size] or 'the demo test encoders'}; "
              f"device {device}; torch threads {torch.get_num_threads()}", flush=True)
        features: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        for r in range(args.rounds):
            for dtype in DTYPES[r % len(DTYPES):] + DTYPES[: r % len(DTYPES)]:
                cfgs = [EncoderConfig(name, kind, str(encoders / name), dtype="float32", compute_dtype=dtype)
                        for name, kind in KINDS.items()]
                encode_utterances(cfgs, utts[:1], device=device, batch_seconds=60.0)          # warm-up
                start = time.perf_counter()
                feats, _, failures = encode_utterances(cfgs, utts, device=device, batch_seconds=60.0)
                times[dtype].append(time.perf_counter() - start)
                assert not failures, failures
                features.setdefault(dtype, feats)
                print(f"round {r + 1} {dtype:>9}: {times[dtype][-1]:.1f} s", flush=True)
        seconds = {dtype: float(np.median(t)) for dtype, t in times.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = features["float32"]
    report: dict[str, object] = {}
    rows = [(dtype, {name: {u: f[name] for u, f in features[dtype].items()} for name in KINDS})
            for dtype in DTYPES[1:]]
    rows.append(("storage_float16", {name: {u: f[name].astype(np.float16) for u, f in ref.items()} for name in KINDS}))
    for label, by_encoder in rows:
        for name, got in by_encoder.items():
            cosine, rel = deviation({u: f[name] for u, f in ref.items()}, got)
            print(f"{label:>15} {name:>8}: cosine {cosine:.6f}  rel_error {rel:.5f}", flush=True)
            report[f"{name}_{label}_cosine"] = round(cosine, 6)
            report[f"{name}_{label}_rel_error"] = round(rel, 5)
        if label in seconds:
            report[f"{label}_speed_vs_float32"] = round(seconds["float32"] / seconds[label], 3)
    report.update(device=device, utterances=len(utts), rounds=args.rounds, quick=args.quick, size=size,
                  cpus=os.cpu_count())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
