"""Is reading one utterance from the store as fast as np.load of its own .npy file? Random reads side by side.

    .venv/bin/python bench/store_read.py [--quick] [--cold] [--gb 1.0] [--reads 2000] [--workdir /tmp]

Builds a synthetic store (float16, 1024-d, 100-600 frames per utterance, 8 parts as 8 writers would) through
StoreWriter, timing the write, and the same frames as one .npy file per utterance on the same disk. Then reads the
same random utterance sequence, in alternating order over several rounds, through:
  mtser    FeatureStore.get (one byte range of the shard file, pread on a cached descriptor)
  zarr     plain zarr-python slicing of the very same arrays: frames[offsets[i]:offsets[i+1]]
  npy      np.load(<id>.npy)
  memcpy   a copy of the same bytes already in memory (the ceiling)
By default reads hit the page cache (the files were just written): per-read overhead, not the disk. With --cold,
every file of the store and every .npy file is evicted from the page cache (posix_fadvise DONTNEED) before each
reader's pass, so mtser, zarr and npy read from the disk itself.
Reported: median MB/s and utterances/s per reader; the last line is one JSON object with the ratios.
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
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, open_store, register_encoder  # noqa: E402

DIM = 1024
PARTS = 8


def synth_lengths(total_bytes: float, rng: np.random.Generator) -> list[int]:
    lengths, size = [], 0
    while size < total_bytes:
        lengths.append(int(rng.integers(100, 601)))
        size += lengths[-1] * DIM * 2
    return lengths


def build(workdir: Path, lengths: list[int], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float, float]:
    """Write store and .npy files; returns (frames by id, store write MB/s, npy write MB/s)."""
    frames = {f"utt_{i:06d}.wav": rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
              for i, n in enumerate(lengths)}
    total_mb = sum(f.nbytes for f in frames.values()) / 1e6
    url = str(workdir / "store.zarr")
    create_store(url)
    register_encoder(url, EncoderInfo("wavlm", "speech", "bench/synthetic", None, None, -1, 1, DIM, 50.0,
                                      "float16", "none", 16000, "bench", {}))
    ids = list(frames)
    start = time.perf_counter()
    for p in range(PARTS):
        writer = StoreWriter(url, f"shard-{p:05d}")
        for utt_id in ids[p::PARTS]:
            writer.add(Utterance(utt_id, None, "Train"), {"wavlm": frames[utt_id]})
        writer.commit()
    write_mbps = total_mb / (time.perf_counter() - start)
    npy_dir = workdir / "npy"
    npy_dir.mkdir()
    start = time.perf_counter()
    for utt_id, x in frames.items():
        np.save(npy_dir / f"{utt_id}.npy", x)
    return frames, write_mbps, total_mb / (time.perf_counter() - start)


def readers(workdir: Path, frames: dict[str, np.ndarray]) -> dict:
    store = open_store(str(workdir / "store.zarr"))
    root = zarr.open_group(str(workdir / "store.zarr"), mode="r")
    where = {}
    for part in sorted(store.committed_parts()):
        feats = root[f"parts/{part}/features/wavlm"]
        arr, offsets = feats["frames"], feats["offsets"][:]
        for i, utt_id in enumerate(feats["ids"][:]):
            where[str(utt_id)] = (arr, int(offsets[i]), int(offsets[i + 1]))
    npy_dir = workdir / "npy"

    def zarr_read(utt_id: str) -> np.ndarray:
        arr, a, b = where[utt_id]
        return arr[a:b]

    return {
        "mtser": lambda u: store.get(u, "wavlm"),
        "zarr": zarr_read,
        "npy": lambda u: np.load(npy_dir / f"{u}.npy"),
        "memcpy": lambda u: frames[u].copy(),
    }


def evict(workdir: Path) -> None:
    """Drop every file under `workdir` from the page cache (flushed first: dirty pages cannot be dropped)."""
    for path in workdir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def check_identical(fns: dict, ids: list[str], frames: dict[str, np.ndarray]) -> None:
    for utt_id in ids:
        for name, fn in fns.items():
            if not np.array_equal(fn(utt_id), frames[utt_id]):
                raise SystemExit(f"{name} returned different values for {utt_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.15 GB store, fewer reads (< 60 s)")
    parser.add_argument("--gb", type=float, default=None, help="store size in GB (default 1.0, quick 0.15)")
    parser.add_argument("--reads", type=int, default=None, help="random reads per reader per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="evict the files from the page cache before each pass")
    parser.add_argument("--workdir", default=None, help="directory on the disk to measure (default: system temp)")
    args = parser.parse_args()
    gb = args.gb or (0.15 if args.quick else 1.0)
    n_reads = args.reads or (300 if args.quick else 2000)
    rng = np.random.default_rng(0)
    workdir = Path(tempfile.mkdtemp(prefix="mtser-bench-", dir=args.workdir))
    try:
        frames, write_mbps, npy_write_mbps = build(workdir, synth_lengths(gb * 1e9, rng), rng)
        ids = list(frames)
        fns = readers(workdir, frames)
        check_identical(fns, ids[:20], frames)
        times: dict[str, list[float]] = {name: [] for name in fns}
        mb: dict[str, float] = {}
        for r in range(args.rounds):
            sample = [ids[i] for i in rng.integers(0, len(ids), n_reads)]
            mb_round = sum(frames[u].nbytes for u in sample) / 1e6
            order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
            for name in order:
                fn = fns[name]
                if args.cold:
                    evict(workdir)
                start = time.perf_counter()
                for utt_id in sample:
                    fn(utt_id)
                times[name].append(time.perf_counter() - start)
                mb[name] = mb.get(name, 0.0) + mb_round
        result: dict[str, float | bool | int] = {}
        for name in fns:
            per_round = statistics.median(times[name])
            result[f"{name}_MBps"] = round(mb[name] / args.rounds / per_round, 1)
            result[f"{name}_utt_per_s"] = round(n_reads / per_round, 1)
            print(f"{name:7s} {result[f'{name}_MBps']:9.1f} MB/s {result[f'{name}_utt_per_s']:9.1f} utt/s")
        for other in ("npy", "zarr", "memcpy"):
            result[f"mtser_vs_{other}"] = round(result["mtser_MBps"] / result[f"{other}_MBps"], 3)
        result.update(write_MBps=round(write_mbps, 1), npy_write_MBps=round(npy_write_mbps, 1),
                      store_GB=round(sum(f.nbytes for f in frames.values()) / 1e9, 3), utterances=len(ids),
                      reads_per_round=n_reads, rounds=args.rounds, cold=args.cold, quick=args.quick)
        print(f"write: store {write_mbps:.1f} MB/s, npy files {npy_write_mbps:.1f} MB/s")
        print(json.dumps(result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
