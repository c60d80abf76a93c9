"""What storing does to an encoder's frames: the one definition the writer, the extraction pipeline and `mtser predict`
share (numpy only).

float16 / float32 encoders keep the frames cast to their dtype; int8 encoders keep symmetric per-frame int8 values and
a float32 scale per frame (value = int8 * scale); frames of several layers, (T, L, D), get a scale per frame and layer
(T, L), so a layer's scale does not depend on the others' magnitudes. `store_frames` is the conversion,
`decode_frames` what a reader gets back, `as_stored` the two together: the float32 values a model reading the store
sees for frames computed now.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StoredFrames:
    """(T, D) or (T, L, D) frames as a store keeps them."""

    values: np.ndarray                # in the encoder's dtype: float16, float32 or int8
    scale: np.ndarray | None = None   # int8: float32 per frame (and layer): values.shape[:-1]; floats: None

    def finite(self) -> bool:
        """False where a value overflowed the dtype (inf) or the frames held NaN/inf (int8: in the scales)."""
        return bool(np.isfinite(self.values).all() if self.scale is None else np.isfinite(self.scale).all())

    def decode(self, dtype: Any = np.float32) -> np.ndarray:
        return decode_frames(self.values, self.scale, dtype)


def quantize_int8(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per vector of the last axis (a frame, or a frame's layer): returns (int8 values, float32
    scales of shape frames.shape[:-1]); value ≈ int8 * scale."""
    x = np.asarray(frames, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / 127.0).astype(np.float32)
    q = np.rint(x / np.where(scale > 0, scale, 1.0)[..., None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def store_frames(frames: np.ndarray, dtype: str) -> StoredFrames:
    """`frames` (T, D) or (T, L, D) as an encoder stored in `dtype` keeps them. Non-finite input or a float
    overflow is not an error here: `StoredFrames.finite()` tells (the writer refuses such frames)."""
    x = np.asarray(frames)
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype == "int8":
            return StoredFrames(*quantize_int8(x))
        return StoredFrames(np.asarray(x, dtype=dtype, order="C"))


def decode_frames(values: np.ndarray, scale: np.ndarray | None, dtype: Any = None) -> np.ndarray:
    """Stored frames as values: int8 dequantised to float32 (`values * scale` per vector), then cast to `dtype`;
    float frames as stored (dtype None) or cast."""
    if scale is not None:
        decoded = np.multiply(values, scale[..., None], dtype=np.float32)
        return decoded if dtype is None else decoded.astype(dtype, copy=False)
    return values if dtype is None else values.astype(dtype)


def as_stored(frames: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values a reader of an encoder stored in `dtype` gets for `frames`."""
    return store_frames(frames, dtype).decode(np.float32)
