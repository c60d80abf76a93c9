"""Feature store: corpus readers, the Zarr v3 store, encoders and Ray extraction.

The store core (`open_store`, `StoreWriter`) imports only numpy, zarr and fsspec, so other projects can query
features without torch or Ray. `encoders`, `audio` and `extract` import torch / Ray and are never imported here.
"""
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.labels import ATTRIBUTES, CLASSES, SPLITS
from mtser.featurestore.store import (
    EncoderInfo, FeatureStore, StoreError, StoreWriter, create_store, open_store, register_encoder,
)

__all__ = ["ATTRIBUTES", "CLASSES", "SPLITS", "Utterance", "EncoderInfo", "FeatureStore", "StoreError",
           "StoreWriter", "create_store", "open_store", "register_encoder"]
