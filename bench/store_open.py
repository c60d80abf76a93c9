"""How long does opening a store of MSP-Podcast's size take? mtser's batched index reads versus zarr-python.

    .venv/bin/python bench/store_open.py [--quick] [--parts 300] [--per-part 388] [--workdir /tmp]

Builds a store shaped like a full extraction of MSP-Podcast (default 300 parts x 388 = 116,400 utterances, three
encoders, a full utterance table) with tiny frames (the frames are not read here), then times, alternately over
several rounds:
  mtser  open_store(url) (ids + offsets of every part and encoder) and then its utterance table
  zarr   the same arrays read with zarr-python: open each part group, read ids/offsets per encoder, read the table
The last line printed is one JSON object.
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
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.store import (  # noqa: E402
    FLOAT_COLUMNS, TABLE_COLUMNS, EncoderInfo, StoreWriter, create_store, open_store, register_encoder,
)

ENCODERS = ("wavlm", "whisper", "roberta")


def build(url: str, parts: int, per_part: int) -> float:
    create_store(url)
    for name in ENCODERS:
        register_encoder(url, EncoderInfo(name, "speech", f"bench/{name}", None, None, -1, 1, 4, 50.0, "float16",
                                          "none", 16000, "bench", {}))
    x = np.ones((3, 4), np.float32)
    start = time.perf_counter()
    for p in range(parts):
        writer = StoreWriter(url, f"shard-{p:05d}")
        for k in range(per_part):
            writer.add(Utterance(f"MSP-PODCAST_{p:04d}_{k:04d}.wav", None, "Train", "N", 3.5, 4.0, 3.0,
                                 speaker=str(k % 900), gender="Female", duration=4.2,
                                 transcript="a short transcript of a few words", transcript_source="human"),
                       {name: x for name in ENCODERS})
        writer.commit()
    return time.perf_counter() - start


def open_mtser(url: str) -> int:
    store = open_store(url)
    return len(store.utterances) + len(store.ids(encoder="wavlm"))


def open_zarr(url: str) -> int:
    root = zarr.open_group(url, mode="r")
    n = 0
    for _, part in root["parts"].groups():
        if not part.attrs.get("mtser_part", {}).get("committed"):
            continue
        for name in ENCODERS:
            n += len(_strings(part, f"features/{name}/ids")) + len(part[f"features/{name}/offsets"][:]) - 1
        n += sum(len(part[f"utterances/{c}"][:]) if c in FLOAT_COLUMNS else len(_strings(part, f"utterances/{c}"))
                 for c in ("id",) + TABLE_COLUMNS)
    return n


def _strings(group: zarr.Group, name: str) -> list[str]:
    """A string column (schema 2: utf8 bytes + int64 offsets), decoded as a zarr-python user would."""
    data, offsets = group[f"{name}/utf8"][:].tobytes(), group[f"{name}/offsets"][:]
    return [data[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 parts (< 60 s)")
    parser.add_argument("--parts", type=int, default=None)
    parser.add_argument("--per-part", type=int, default=388)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    parts = args.parts or (30 if args.quick else 300)
    workdir = Path(tempfile.mkdtemp(prefix="mtser-open-", dir=args.workdir))
    url = str(workdir / "store.zarr")
    try:
        build_s = build(url, parts, args.per_part)
        times: dict[str, list[float]] = {"mtser": [], "zarr": []}
        for r in range(args.rounds):
            for name in (["mtser", "zarr"] if r % 2 == 0 else ["zarr", "mtser"]):
                start = time.perf_counter()
                (open_mtser if name == "mtser" else open_zarr)(url)
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    mtser_s, zarr_s = statistics.median(times["mtser"]), statistics.median(times["zarr"])
    print(f"{parts} parts, {parts * args.per_part} utterances: mtser open + table {mtser_s:.2f} s, "
          f"zarr-python {zarr_s:.2f} s; build {build_s:.1f} s")
    print(json.dumps({"parts": parts, "utterances": parts * args.per_part, "mtser_open_s": round(mtser_s, 3),
                      "zarr_open_s": round(zarr_s, 3), "mtser_vs_zarr": round(zarr_s / mtser_s, 2),
                      "commit_s_per_part": round(build_s / parts, 3), "quick": args.quick}))


if __name__ == "__main__":
    main()
