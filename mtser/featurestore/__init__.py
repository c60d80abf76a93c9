"""Feature store: corpus readers, the Zarr v3 store, encoders, the per-utterance pipeline and Ray extraction.

Importing this package (the store core: `open_store`, `StoreWriter`, corpus records and label map) imports numpy,
pandas, zarr (with numcodecs and google-crc32c) and fsspec, so other projects can query features without torch or
Ray (tested). `audio`, `encoders`, `pipeline` and `extract_worker` import torch and transformers, `extract` also
Ray; none of them is imported here. Demo data tooling lives outside this package (`mtser.demo`).
"""
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.labels import ATTRIBUTES, CLASSES, SPLITS
from mtser.featurestore.store import (
    EncoderInfo, FeatureStore, StoreError, StoreWriter, create_store, open_store, register_encoder,
)

__all__ = ["ATTRIBUTES", "CLASSES", "SPLITS", "Utterance", "EncoderInfo", "FeatureStore", "StoreError",
           "StoreWriter", "create_store", "open_store", "register_encoder"]
