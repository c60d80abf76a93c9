"""Feature store: corpus readers, the Zarr v3 store, encoders and Ray extraction.

The store core (`open_store`, `StoreWriter`) imports only numpy, zarr and fsspec, so other projects can query
features without torch or Ray. `encoders`, `audio` and `extract` import torch / Ray and are never imported here.
"""
from mtser.featurestore.corpus import Utterance
from mtser.featurestore.labels import ATTRIBUTES, CLASSES, SPLITS

__all__ = ["ATTRIBUTES", "CLASSES", "SPLITS", "Utterance"]
