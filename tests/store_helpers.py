"""Shared helpers of the store tests: provenance records and deterministic features per utterance id."""
from __future__ import annotations

import zlib

import numpy as np

from mtser.featurestore.corpus import Utterance
from mtser.featurestore.store import EncoderInfo, StoreWriter


def encoder_info(name: str, dim: int = 16, dtype: str = "float16", compression: str = "none") -> EncoderInfo:
    return EncoderInfo(name=name, kind="speech", model="tests/tiny-wavlm", revision=None, content_hash="abc123",
                       layer=-1, mean_last_k=1, dim=dim, frame_rate=50.0, dtype=dtype, compression=compression,
                       sample_rate=16000, mtser_version="0.1.0", config={"name": name, "kind": "speech"})


def frames_for(utt_id: str, dim: int = 16, version: int = 0) -> np.ndarray:
    """Features fully determined by the id (so any reader can check what it got), 1..299 frames."""
    rng = np.random.default_rng(zlib.crc32(f"{utt_id}/{version}".encode()))
    return rng.standard_normal((int(rng.integers(1, 300)), dim)).astype(np.float32)


def utterance(utt_id: str, split: str = "Train", **kw) -> Utterance:
    return Utterance(id=utt_id, path=None, split=split, **kw)


def write_part(url: str, part_id: str, ids: list[str], encoders: list[str], dim: int = 16, version: int = 0,
               split: str = "Train", storage_options: dict | None = None) -> None:
    writer = StoreWriter(url, part_id, storage_options)
    for utt_id in ids:
        writer.add(utterance(utt_id, split), {e: frames_for(utt_id, dim, version) for e in encoders})
    writer.commit()
