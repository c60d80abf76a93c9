"""Learned layer weights (SUPERB, s3prl's Featurizer): an encoder branch of a model with `model.layer_weights`
mixes the L stored hidden states of its encoder with a softmax over L learned logits, one set per member
(`LayerMix`), before its pooling. Also which stored layers a model reads (`read_layers`: the set-up's check of
`model.layers` against the store) and how a loader gives them (`reader_layers`, `take_layers`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtser.configio import ConfigError
from mtser.featurestore.store import EncoderInfo, StoreError
from mtser.trainer.config import ModelConfig
from mtser.trainer.fused import MemberModule


class LayerMix(MemberModule):
    """G softmax mixes of L layers: `logits` (G, L), initialised 0 (uniform weights). With `norm`, each layer's
    frames are layer-normalised over D (no affine parameters) before the mix (`prepare`)."""

    def __init__(self, members: int, layers: int, norm: bool = False):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(members, layers))
        self.norm = norm

    def weights(self) -> torch.Tensor:
        """Each member's layer weights (G, L) in float32, summing to 1."""
        return torch.softmax(self.logits.float(), dim=-1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (..., L, D) as the mix sees them: layer-normalised over D with `norm`, else unchanged."""
        return F.layer_norm(x, x.shape[-1:]) if self.norm else x

    def mix_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Frames (B, T, L, D) every member shares → each member's mixed frames (G, B, T, D)."""
        x = self.prepare(x)
        return torch.einsum("gl,btld->gbtd", self.weights().to(x.dtype), x)

    def mix_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Per-layer poolings (B, L, D) of `prepare`d frames → each member's mix (G, B, D). For a pooling linear in
        the frames (the mean), this equals pooling `mix_frames` (L× fewer frames to weigh)."""
        return torch.einsum("gl,bld->gbd", self.weights().to(pooled.dtype), pooled)


def read_layers(cfg: ModelConfig, infos: Mapping[str, EncoderInfo], store_url: str) -> dict[str, list[int]]:
    """The stored hidden-state indices the model reads, per encoder of `infos` (name -> the store's EncoderInfo):
    `model.layers`' choice, else every layer the store holds; an encoder stored without layers and not named in
    `model.layers` is absent (read as stored: one state). ConfigError naming `model.layers.<encoder>` for indices
    the store lacks (with the ones it holds), and for several layers without `model.layer_weights`."""
    read = {}
    for name, info in infos.items():
        chosen = (cfg.layers or {}).get(name)
        if chosen is None and info.layers is None:
            continue
        chosen = list(info.layers) if chosen is None else list(chosen)
        try:
            info.pick(chosen)
        except StoreError as exc:
            raise ConfigError(f"store {store_url}: {exc}", f"model.layers.{name}") from None
        if len(chosen) > 1 and not cfg.layer_weights:
            raise ConfigError(f"store {store_url} holds {len(chosen)} layers {chosen} of {name!r}: name one "
                              f"(model.layers.{name}: [k]) or learn their mix (model.layer_weights: true)",
                              f"model.layers.{name}")
        read[name] = chosen
    return read


def mixed_layers(cfg: ModelConfig, read: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """L per encoder whose branch learns a mix (with `model.layer_weights`: every encoder read by layer index)."""
    return {name: len(layers) for name, layers in read.items()} if cfg.layer_weights else {}


def reader_layers(read: Mapping[str, Sequence[int]], mixed: Mapping[str, int]) -> dict:
    """`data.BatchReader`'s `layers` and `squeeze` for a model reading `read` and mixing `mixed`: an encoder read
    by index but not mixed (one layer) comes as plain (B, T, D) frames."""
    return {"layers": {n: list(v) for n, v in read.items()}, "squeeze": [n for n in read if n not in mixed]}


def take_layers(frames: np.ndarray, positions: list[int] | None, squeeze: bool) -> np.ndarray:
    """One utterance's frames ((T, D), or (T, L, D) of several stored layers) at stored `positions` ((T, len, D);
    (T, D) with `squeeze`); all of them as given for `positions` None."""
    if positions is None:
        return frames
    chosen = (frames if frames.ndim == 3 else frames[:, None])[:, positions]
    return chosen[:, 0] if squeeze else chosen
