"""How much storage does one stored layer take at MSP-Podcast scale? Bytes of the real layout, extrapolated.

    .venv/bin/python bench/layer_storage.py [--quick] [--utterances 24] [--layers 4] [--workdir /tmp]

For each encoder width of the paper's recipe (WavLM-large 1024-d and Whisper-large-v3 1280-d at 50 frames/s,
RoBERTa-large 1024-d per token) and each stored dtype (float16; int8 with its per frame-and-layer float32 scales),
one part of `--utterances` utterances with `--layers` layers each is written through StoreWriter (compression
none: the layout's own bytes; random frames, so nothing compresses by accident) and every file of the encoder's
segment is counted (frames shard with its index and padding, scale, crc32, offsets, ids, metadata). Bytes per
frame per layer = those bytes / (frames · L); a part here is 10 s utterances, as long as MSP-Podcast's mean (324 h
over 116,221 utterances: 10.0 s); RoBERTa's utterances are an assumed 30 tokens. MSP-Podcast scale multiplies by
58.3 M frames (324 h at 50 frames/s) or 3.5 M tokens. Real parts (`shard_seconds` 3600: ~360 utterances) spread a
part's fixed bytes (the last inner chunk's padding) over more frames, so these figures are an upper bound.
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtser.featurestore.corpus import Utterance  # noqa: E402
from mtser.featurestore.store import EncoderInfo, StoreWriter, create_store, register_encoder  # noqa: E402

MSP_UTTERANCES = 116_221
MSP_SECONDS = 324 * 3600
FRAME_RATE = 50
TOKENS_PER_UTTERANCE = 30                     # assumed: ~25 words of a 10 s turn in RoBERTa's BPE
ENCODERS = {"wavlm-large": ("speech", 1024), "whisper-large-v3": ("whisper", 1280), "roberta-large": ("text", 1024)}


def segment_bytes(url: str, name: str, dim: int, kind: str, dtype: str, layers: int, utterances: int) -> float:
    """Bytes per frame per layer of one written part of `utterances` utterances."""
    register_encoder(url, EncoderInfo(
        name=name, kind=kind, model=name, revision=None, content_hash=None, layer=-1, mean_last_k=1, dim=dim,
        frame_rate=0.0 if kind == "text" else FRAME_RATE, dtype=dtype, compression="none", sample_rate=16000,
        mtser_version="bench", config={}, layers=list(range(layers))))
    frames = TOKENS_PER_UTTERANCE if kind == "text" else round(MSP_SECONDS / MSP_UTTERANCES * FRAME_RATE)
    rng = np.random.default_rng(0)
    writer = StoreWriter(url, f"part-{name}")
    for k in range(utterances):
        writer.add(Utterance(id=f"u{k}", path=None), {name: rng.standard_normal((frames, layers, dim), np.float32)})
    writer.commit()
    return feature_bytes(url, name, f"part-{name}") / (utterances * frames * layers)


def feature_bytes(url: str, name: str, part: str = "*") -> int:
    """Bytes of every file of encoder `name`'s segment in the local store's parts matching `part` (a glob)."""
    return sum(p.stat().st_size for folder in Path(url).glob(f"parts/{part}/features/{name}")
               for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 utterances per part")
    parser.add_argument("--utterances", type=int, default=24)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    utterances = 4 if args.quick else args.utterances
    work = Path(tempfile.mkdtemp(prefix="mtser-layer-storage-", dir=args.workdir))
    rows = []
    try:
        for dtype in ("float16", "int8"):
            url = str(work / f"{dtype}.zarr")
            create_store(url)
            for name, (kind, dim) in ENCODERS.items():
                per = segment_bytes(url, name.split("-")[0], dim, kind, dtype, args.layers, utterances)
                units = MSP_UTTERANCES * TOKENS_PER_UTTERANCE if kind == "text" else MSP_SECONDS * FRAME_RATE
                rows.append({"encoder": name, "dim": dim, "dtype": dtype, "bytes_per_frame_layer": round(per, 1),
                             "bytes_per_utterance_layer": round(per * units / MSP_UTTERANCES),
                             "msp_gb_per_layer": round(per * units / 1e9, 2)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| encoder | dim | dtype | bytes per frame and layer (raw: dim · itemsize) | per utterance and layer | "
          "MSP-Podcast per layer |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        raw = r["dim"] * (2 if r["dtype"] == "float16" else 1)
        print(f"| {r['encoder']} | {r['dim']} | {r['dtype']} | {r['bytes_per_frame_layer']} ({raw}) | "
              f"{r['bytes_per_utterance_layer'] / 1e3:.0f} kB | **{r['msp_gb_per_layer']} GB** |")
    print(json.dumps({"utterances_per_part": utterances, "layers": args.layers, "rows": rows}))


if __name__ == "__main__":
    main()
