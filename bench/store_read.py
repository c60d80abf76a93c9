"""Is a random utterance read from the store as fast as from the formats speech researchers use? Peers side by side.

    .venv/bin/python bench/store_read.py [--quick] [--gb 1.0] [--reads 2000] [--rounds 5] [--workdir /tmp]

Builds a synthetic store (float16, 1024-d, 100-600 frames per utterance, 8 parts as 8 writers would) through
StoreWriter, and the same utterances in each peer format on the same disk. Then reads one random utterance
sequence per round through each reader, the readers' order rotating from round to round (median of rounds):
  mtser          FeatureStore.get (one byte range of the shard file, preadv on a cached descriptor)
  zarr           zarr-python slicing of the very same arrays: frames[offsets[i]:offsets[i+1]]
  zarrs          the same slicing with zarr-python's `zarrs` (Rust) codec pipeline, where it installs
  npy            np.load(<id>.npy), one file per utterance (emotion2vec, EmoBox, MEDUSA)
  kaldiio        kaldiio.load_scp: one .ark file, a byte offset per utterance in the .scp (Kaldi/ESPnet);
                 float32, as Kaldi matrices have no float16 (twice the bytes of the others)
  lhotse_hdf5    lhotse's NumpyHdf5Writer / NumpyHdf5Reader (one HDF5 dataset per utterance)
  lhotse_lilcom  lhotse's LilcomChunkyWriter / LilcomChunkyReader (lossy lilcom chunks; decodes to float32)
  flatfile       one flat file of all frames + an offsets array, os.preadv into the result in 128 KiB steps, as
                 mtser reads (no software at all: the floor; mtser_vs_flatfile is 1 - its software overhead)
  flatfile_1read the same with one os.preadv per utterance (on this VM a single large read was measured slower)
  memcpy         a copy of the same frames already in memory (the ceiling)
Warm rounds first (every utterance read once through each reader beforehand, so the files are in the page cache:
per-read overhead), then cold rounds (every file of every format evicted with posix_fadvise DONTNEED before each
reader's pass; utterances sampled without replacement, so no read hits a page another read brought in). Ratios compare utterances per second over the same utterances. The last line
is one JSON object: `mtser_vs_<peer>` (warm) and `mtser_vs_<peer>_cold`.
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
from typing import Callable

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.shards import READ_PIECE  # noqa: E402
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, open_store, register_encoder  # noqa: E402

DIM = 1024
PARTS = 8
LILCOM_TOLERANCE = 0.05                      # lilcom is lossy: its values are checked to this absolute error


def synth_lengths(total_bytes: float, rng: np.random.Generator) -> list[int]:
    lengths, size = [], 0
    while size < total_bytes:
        lengths.append(int(rng.integers(100, 601)))
        size += lengths[-1] * DIM * 2
    return lengths


def build(work: Path, frames: dict[str, np.ndarray]) -> dict[str, float]:
    """Every format of the same utterances; returns write MB/s per format (of float16 frame bytes)."""
    from kaldiio import WriteHelper
    from lhotse import LilcomChunkyWriter, NumpyHdf5Writer

    total_mb = sum(f.nbytes for f in frames.values()) / 1e6
    ids = list(frames)
    rates: dict[str, float] = {}

    def timed(name: str, write: Callable[[], None]) -> None:
        start = time.perf_counter()
        write()
        rates[name] = round(total_mb / (time.perf_counter() - start), 1)

    def write_store() -> None:
        url = str(work / "store.zarr")
        create_store(url)
        register_encoder(url, EncoderInfo("wavlm", "speech", "bench/synthetic", None, None, -1, 1, DIM, 50.0,
                                          "float16", "none", 16000, "bench", {}))
        for p in range(PARTS):
            writer = StoreWriter(url, f"shard-{p:05d}")
            for utt_id in ids[p::PARTS]:
                writer.add(Utterance(utt_id, None, "Train"), {"wavlm": frames[utt_id]})
            writer.commit()

    def write_npy() -> None:
        (work / "npy").mkdir()
        for utt_id, x in frames.items():
            np.save(work / "npy" / f"{utt_id}.npy", x)

    def write_kaldiio() -> None:
        with WriteHelper(f"ark,scp:{work / 'feats.ark'},{work / 'feats.scp'}") as write:
            for utt_id, x in frames.items():
                write(utt_id, x.astype(np.float32))

    def write_lhotse(cls: type, name: str) -> Callable[[], None]:
        def write() -> None:
            with cls(str(work / name)) as writer:
                keys = {utt_id: writer.write(utt_id, x) for utt_id, x in frames.items()}
            (work / f"{name}.json").write_text(json.dumps({"path": writer.storage_path, "keys": keys}))
        return write

    def write_flat() -> None:
        offsets = np.concatenate([[0], np.cumsum([len(frames[u]) for u in ids])]).astype(np.int64)
        with open(work / "flat.bin", "wb") as f:
            for utt_id in ids:
                f.write(frames[utt_id].tobytes())
        np.save(work / "flat_offsets.npy", offsets)

    timed("store", write_store)
    timed("npy", write_npy)
    timed("kaldiio", write_kaldiio)
    timed("lhotse_hdf5", write_lhotse(NumpyHdf5Writer, "lhotse_hdf5"))
    timed("lhotse_lilcom", write_lhotse(LilcomChunkyWriter, "lhotse_lilcom"))
    timed("flatfile", write_flat)
    return rates


def readers(work: Path, frames: dict[str, np.ndarray]) -> dict[str, Callable[[str], np.ndarray]]:
    import kaldiio
    from lhotse.features.io import LilcomChunkyReader, NumpyHdf5Reader

    url = str(work / "store.zarr")
    store = open_store(url)
    fns: dict[str, Callable[[str], np.ndarray]] = {"mtser": lambda u: store.get(u, "wavlm")}
    fns["zarr"] = zarr_slicer(url, store.committed_parts())
    try:
        import zarrs  # noqa: F401

        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            fns["zarrs"] = zarr_slicer(url, store.committed_parts())
    except ImportError:
        print("zarrs is not installed: its column is left out")
    fns["npy"] = lambda u: np.load(work / "npy" / f"{u}.npy")
    scp = kaldiio.load_scp(str(work / "feats.scp"))
    fns["kaldiio"] = lambda u: scp[u]
    for name, cls in (("lhotse_hdf5", NumpyHdf5Reader), ("lhotse_lilcom", LilcomChunkyReader)):
        meta = json.loads((work / f"{name}.json").read_text())
        reader, keys = cls(meta["path"]), meta["keys"]
        fns[name] = lambda u, reader=reader, keys=keys: reader.read(keys[u])
    offsets = np.load(work / "flat_offsets.npy")
    position = {u: i for i, u in enumerate(frames)}
    fd = os.open(work / "flat.bin", os.O_RDONLY)
    row_bytes = DIM * 2

    def flat_read(utt_id: str, piece: int | None) -> np.ndarray:
        i = position[utt_id]
        out = np.empty((int(offsets[i + 1] - offsets[i]), DIM), dtype=np.float16)
        flat, start = out.reshape(-1).view(np.uint8), int(offsets[i]) * row_bytes
        step = piece or len(flat)
        for got in range(0, len(flat), step):
            os.preadv(fd, [flat[got:got + step]], start + got)
        return out

    fns["flatfile"] = lambda u: flat_read(u, READ_PIECE)
    fns["flatfile_1read"] = lambda u: flat_read(u, None)
    fns["memcpy"] = lambda u: frames[u].copy()
    return fns


def zarr_slicer(url: str, parts: set[str]) -> Callable[[str], np.ndarray]:
    """frames[offsets[i]:offsets[i+1]] through zarr-python alone (ids decoded from utf8 bytes + offsets)."""
    root = zarr.open_group(url, mode="r")
    where = {}
    for part in sorted(parts):
        feats = root[f"parts/{part}/features/wavlm"]
        arr, offsets = feats["frames"], feats["offsets"][:]
        utf8, bounds = feats["ids/utf8"][:].tobytes(), feats["ids/offsets"][:]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            where[utf8[a:b].decode()] = (arr, int(offsets[i]), int(offsets[i + 1]))

    def read(utt_id: str) -> np.ndarray:
        arr, a, b = where[utt_id]
        return arr[a:b]
    return read


def evict(work: Path) -> None:
    """Drop every file under `work` from the page cache (flushed first: dirty pages cannot be dropped)."""
    for path in work.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def check_values(fns: dict, ids: list[str], frames: dict[str, np.ndarray]) -> None:
    for utt_id in ids:
        expected = frames[utt_id].astype(np.float32)
        for name, fn in fns.items():
            got = np.asarray(fn(utt_id), dtype=np.float32)
            ok = (got.shape == expected.shape and np.abs(got - expected).max() <= LILCOM_TOLERANCE
                  if name == "lhotse_lilcom" else np.array_equal(got, expected))
            if not ok:
                raise SystemExit(f"{name} returned different values for {utt_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.15 GB store, fewer reads and rounds (< 60 s)")
    parser.add_argument("--gb", type=float, default=None, help="store size in GB (default 1.0, quick 0.15)")
    parser.add_argument("--reads", type=int, default=None, help="random reads per reader per pass")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 3)")
    parser.add_argument("--workdir", default=None, help="directory on the disk to measure (default: system temp)")
    args = parser.parse_args()
    gb = args.gb or (0.15 if args.quick else 1.0)
    n_reads = args.reads or (300 if args.quick else 2000)
    rounds = args.rounds or (3 if args.quick else 5)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="mtser-bench-", dir=args.workdir))
    try:
        frames = {f"utt_{i:06d}.wav": rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
                  for i, n in enumerate(synth_lengths(gb * 1e9, rng))}
        ids = list(frames)
        write_rates = build(work, frames)
        fns = readers(work, frames)
        check_values(fns, ids[:20], frames)
        times: dict[tuple[str, str], list[float]] = {}
        counts: dict[str, int] = {}
        for mode in ("warm", "cold"):
            for r in range(rounds):
                if mode == "warm":
                    sample = [ids[i] for i in rng.integers(0, len(ids), n_reads)]
                else:                              # without replacement: every read goes to the disk
                    sample = [ids[i] for i in rng.choice(len(ids), min(n_reads, len(ids)), replace=False)]
                counts[mode] = len(sample)
                order = list(fns)[r % len(fns):] + list(fns)[:r % len(fns)]
                for name in order:
                    if mode == "cold":
                        evict(work)
                    elif r == 0:                   # warm: every file of every utterance in the page cache
                        for utt_id in ids:
                            fns[name](utt_id)
                    start = time.perf_counter()
                    for utt_id in sample:
                        fns[name](utt_id)
                    times.setdefault((name, mode), []).append(time.perf_counter() - start)
        result: dict[str, float | bool | int | str] = {}
        mb_per_utt = sum(f.nbytes for f in frames.values()) / 1e6 / len(ids)
        for mode, suffix in (("warm", ""), ("cold", "_cold")):
            line = []
            for name in fns:
                rate = counts[mode] / statistics.median(times[(name, mode)])
                result[f"{name}_utt_per_s{suffix}"] = round(rate, 1)
                line.append(f"{name} {rate:.0f}")
            for name in fns:
                if name != "mtser":
                    result[f"mtser_vs_{name}{suffix}"] = round(
                        result[f"mtser_utt_per_s{suffix}"] / result[f"{name}_utt_per_s{suffix}"], 3)
            print(f"{mode}: utterances/s ({mb_per_utt:.2f} MB float16 each): " + ", ".join(line))
        result.update({f"write_MBps_{k}": v for k, v in write_rates.items()})
        result.update(store_GB=round(sum(f.nbytes for f in frames.values()) / 1e9, 3), utterances=len(ids),
                      reads_warm=counts["warm"], reads_cold=counts["cold"], rounds=rounds, quick=args.quick,
                      load_average=round(os.getloadavg()[0], 2))
        print("write MB/s: " + ", ".join(f"{k} {v}" for k, v in write_rates.items()))
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
