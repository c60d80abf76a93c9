"""The feature store: Zarr v3 layout, part writers with atomic commit, and the read API (docs/store-format.md).

Layout (every node is standard Zarr v3 in core data types only; zarr-python and tensorstore read all of it):

    zarr.json                              attributes.mtser = {schema_version, format, created_by}
    encoders/<name>/zarr.json              attributes.mtser_encoder = EncoderInfo (provenance)
    parts/<part>/zarr.json                 attributes.mtser_part = {committed, committed_at, encoders, ...}
    parts/<part>/utterances/<column>       the table rows this part adds (id, split, emo_class, ...)
    parts/<part>/failures/<column>         id, path, stage, reason (nothing of the utterance written)
    parts/<part>/warnings/<column>         id, path, stage, reason (the utterance was written)
    parts/<part>/features/<enc>/ids        utterance ids with frames for <enc>, in frame order
                                           (string columns: <column>/utf8 uint8 + <column>/offsets int64)
    parts/<part>/features/<enc>/offsets    int64 (n+1): utterance i is frames[offsets[i]:offsets[i+1]]
    parts/<part>/features/<enc>/frames     (rows, dim), ONE shard written by ONE writer
    parts/<part>/features/<enc>/crc32      uint32 per utterance, zlib.crc32 of its stored bytes (+ its scales)
    parts/<part>/features/<enc>/scale      float32 per frame, int8 encoders only (value = int8 * scale)

A writer claims its part first (`claims/<part>/<generation>.json`, created exclusively: one live writer per part)
and owns it; the part's `committed` attribute is written last, in one metadata write, so readers see a part whole
or not at all. Imports numpy, pandas, zarr and fsspec only.

This module is the public face; the work is done in `layout` (shared records, store access, creation), `writer`
(StoreWriter), `reader` (FeatureStore), `shards` (the frames fast path), `arrays` (batched index reads) and
`verify`.
"""
from mtser.featurestore.layout import (
    CHUNK_TARGET_BYTES, DTYPES, FAILURE_COLUMNS, FLOAT_COLUMNS, SCHEMA_VERSION, TABLE_COLUMNS, EncoderInfo,
    StoreError, create_store, part_state, register_encoder,
)
from mtser.featurestore.claims import PartClaimed
from mtser.featurestore.reader import FeatureStore, open_store
from mtser.featurestore.frames import quantize_int8
from mtser.featurestore.writer import PartCommitted, StoreWriter

__all__ = ["CHUNK_TARGET_BYTES", "DTYPES", "FAILURE_COLUMNS", "FLOAT_COLUMNS", "SCHEMA_VERSION", "TABLE_COLUMNS",
           "EncoderInfo", "FeatureStore", "PartClaimed", "PartCommitted", "StoreError", "StoreWriter", "create_store",
           "open_store", "part_state", "quantize_int8", "register_encoder"]
