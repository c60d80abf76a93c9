"""What do zstd compression and int8 storage buy and cost? Size, write and read speed, reconstruction error.

    .venv/bin/python bench/store_codecs.py [--quick] [--utterances 200] [--workdir /tmp]

Frames come from a real WavLM architecture (transformers `WavLMModel`, randomly initialised: hub weights are
unreachable here; 768-d, 4 layers) run on synthetic voiced audio (harmonics with a moving pitch plus noise), last
hidden layer, 50 frames/s. The same frames are written through StoreWriter once per storage setting
(float16 / float32 / int8 per-frame scale, each raw and zstd level 3), then read back in one random order, the
settings alternating over 5 rounds (median).
Reported per setting: bytes on disk (frames, plus scales for int8), ratio to the same dtype uncompressed, write
MB/s and random-read MB/s (both of the stored dtype's bytes), and the reconstruction error against float32.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, open_store, register_encoder  # noqa: E402

SETTINGS = [(d, c) for d in ("float16", "float32", "int8") for c in ("none", "zstd")]
SAMPLE_RATE = 16000


def wavlm_frames(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Last-layer states of a randomly initialised WavLM on n synthetic voiced clips of 2-6 s."""
    import torch
    from transformers import WavLMConfig, WavLMModel

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = WavLMModel(WavLMConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                   intermediate_size=3072)).eval()
    out = []
    with torch.inference_mode():
        for _ in range(n):
            seconds = rng.uniform(2, 6)
            t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
            pitch = 120 + 40 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t)
            phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
            audio = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
            audio = (audio + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
            audio = (audio - audio.mean()) / (audio.std() + 1e-7)
            out.append(model(torch.from_numpy(audio)[None]).last_hidden_state[0].numpy().astype(np.float32))
    return out


def write(workdir: Path, frames: list[np.ndarray], dtype: str, compression: str) -> tuple[str, dict]:
    """One store per setting; its URL and size / write speed."""
    url = str(workdir / f"{dtype}-{compression}.zarr")
    dim = frames[0].shape[1]
    create_store(url)
    register_encoder(url, EncoderInfo("wavlm", "speech", "bench/random-wavlm", None, None, -1, 1, dim, 50.0, dtype,
                                      compression, SAMPLE_RATE, "bench", {}))
    start = time.perf_counter()
    writer = StoreWriter(url, "p0")
    for i, x in enumerate(frames):
        writer.add(Utterance(f"u{i:05d}", None, "Train"), {"wavlm": x})
    writer.commit()
    write_s = time.perf_counter() - start
    feats = Path(url) / "parts" / "p0" / "features" / "wavlm"
    disk = sum(p.stat().st_size for name in ("frames", "scale") for p in (feats / name).rglob("*") if p.is_file())
    return url, {"disk_MB": round(disk / 1e6, 3), "write_MBps": round(stored_mb(frames, dtype) / write_s, 1)}


def stored_mb(frames: list[np.ndarray], dtype: str) -> float:
    return sum(len(f) for f in frames) * frames[0].shape[1] * np.dtype(dtype).itemsize / 1e6


def errors(frames: list[np.ndarray], got: list[np.ndarray]) -> dict:
    x, y = np.concatenate(frames), np.concatenate(got).astype(np.float32)
    cos = np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"rel_rmse": float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))),
            "max_abs_err": float(np.abs(x - y).max()), "min_frame_cosine": float(cos.min())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 utterances (< 60 s)")
    parser.add_argument("--utterances", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    n = args.utterances or (8 if args.quick else 160)
    rng = np.random.default_rng(0)
    frames = wavlm_frames(n, rng)
    order = [int(i) for i in rng.permutation(n)]
    workdir = Path(tempfile.mkdtemp(prefix="mtser-codecs-", dir=args.workdir))
    try:
        results, stores = {}, {}
        for dtype, compression in SETTINGS:
            url, results[f"{dtype}-{compression}"] = write(workdir, frames, dtype, compression)
            stores[f"{dtype}-{compression}"] = open_store(url)
        ids = [f"u{i:05d}" for i in order]
        times: dict[str, list[float]] = {name: [] for name in stores}
        for r in range(args.rounds):                 # settings alternate; median per setting
            for name in list(stores)[r % len(stores):] + list(stores)[:r % len(stores)]:
                start = time.perf_counter()
                got = [stores[name].get(u, "wavlm") for u in ids]
                times[name].append(time.perf_counter() - start)
                if r == 0:
                    results[name].update(errors([frames[i] for i in order], got))
        for (dtype, _), name in zip(SETTINGS, stores):
            results[name]["read_MBps"] = round(stored_mb(frames, dtype) / statistics.median(times[name]), 1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name, r in results.items():
        print(f"{name:14s} " + " ".join(f"{k} {v}" for k, v in r.items()))
    summary = {"frames": int(sum(len(f) for f in frames)), "dim": int(frames[0].shape[1]), "quick": args.quick}
    for dtype in ("float16", "float32", "int8"):
        raw, packed = results[f"{dtype}-none"], results[f"{dtype}-zstd"]
        summary[f"zstd_ratio_{dtype}"] = round(raw["disk_MB"] / packed["disk_MB"], 3)
        summary[f"zstd_write_vs_none_{dtype}"] = round(packed["write_MBps"] / raw["write_MBps"], 3)
        summary[f"zstd_read_vs_none_{dtype}"] = round(packed["read_MBps"] / raw["read_MBps"], 3)
    summary["int8_size_vs_float16"] = round(results["int8-none"]["disk_MB"] / results["float16-none"]["disk_MB"], 3)
    summary["int8_rel_rmse"] = round(results["int8-none"]["rel_rmse"], 5)
    summary["int8_min_frame_cosine"] = round(results["int8-none"]["min_frame_cosine"], 5)
    summary["float16_rel_rmse"] = round(results["float16-none"]["rel_rmse"], 6)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
