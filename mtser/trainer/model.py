"""The fusion network: per encoder pooling (attentive statistics or mean) → dense → LayerNorm, a LSTM over the
sequence of encoder embeddings, and one linear head giving 8 class logits and 3 attributes in 1..7, built once from
the fused layers of `fused.py` for G members of one architecture (`FusionNetwork`): training, epoch selection,
evaluation, ensembles and prediction all run it; a model alone is G = 1."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtser.featurestore.labels import ATTRIBUTES, ATTRIBUTE_RANGE, CLASSES
from mtser.trainer import fused, layer_mix
from mtser.trainer.config import ModelConfig
from mtser.trainer.fused import MemberModule

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder name -> (x (B, T, D) or (B, T, L, D) of L
                                                         # layers, mask (B, T) True = frame)


class EncoderBranch(MemberModule):
    """One encoder's pooling (ASP or mean), dense projection to proj_dim and LayerNorm (and dropout), for G members:
    frames (B, T, D) every member shares → (G, B, proj_dim). With `layers` (L): frames (B, T, L, D) and a learned
    mix of the L layers per member (`mix`, `layer_mix.LayerMix`) before the pooling: ASP pools each member's mixed
    frames; the mean pools each layer once for all members, then mixes (the same, exactly: the mean is linear)."""

    def __init__(self, members: int, dim: int, cfg: ModelConfig, layers: int | None = None):
        super().__init__()
        asp = cfg.pooling == "asp"
        self.mix = None if layers is None else layer_mix.LayerMix(members, layers, cfg.layer_norm_per_layer)
        self.pool = fused.FusedAttentivePooling(members, dim, cfg.attention_dim) if asp else fused.MeanPooling()
        self.project = fused.FusedLinear(members, 2 * dim if asp else dim, cfg.proj_dim)
        self.norm = fused.FusedLayerNorm(members, cfg.proj_dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            pooled = self.pool(x, mask)              # (G, B, 2D) per member, or (B, D) shared: one GEMM for all
        elif isinstance(self.pool, fused.MeanPooling):                      # pool each layer, then mix
            layers = self.mix.prepare(x)
            pooled = self.mix.mix_pooled(self.pool(layers.flatten(2), mask).unflatten(1, layers.shape[2:]))
        else:
            pooled = self.pool(self.mix.mix_frames(x), mask)
        return F.dropout(self.norm(self.project(pooled.to(self.project.weight.dtype))), self.dropout, self.training)


class FusionNetwork(MemberModule):
    """G fusion models of one architecture: encoder embeddings in `encoder_dims` order form the LSTM's input
    sequence, its last output feeds the head. `forward` returns class logits (G, B, 8) and attributes (G, B, 3) in
    1..7 for a batch every member shares; a model alone is G = 1.

    Parameter names are a `FusionModel`'s (the model before issue 23, the checkpoint format), each with a leading
    member dimension: member g's state dict is {name: parameter[g]} (`member_state`, `load_member`); a branch's layer
    weights are `branches.<encoder>.mix.logits` (L,).

    `read_layers`: the stored hidden-state indices each encoder's input holds, in order (what loaders read:
    `reader_layers`; checkpoints record them); an encoder absent is read as stored. With `cfg.layer_weights` every
    encoder of `read_layers` learns a mix of its L layers (input (B, T, L, D); `layers`: L per encoder,
    `layer_mix.mixed_layers`). Other encoders take (B, T, D)."""

    def __init__(self, encoder_dims: dict[str, int], cfg: ModelConfig, members: int = 1,
                 read_layers: dict[str, list[int]] | None = None):
        super().__init__()
        if not encoder_dims:
            raise ValueError("FusionNetwork: needs at least one encoder")
        self.encoder_dims = dict(encoder_dims)
        self.cfg = cfg
        self.read_layers = {name: list(v) for name, v in (read_layers or {}).items()}
        self.layers = layer_mix.mixed_layers(cfg, self.read_layers)
        self.branches = nn.ModuleDict({name: EncoderBranch(members, dim, cfg, self.layers.get(name))
                                       for name, dim in encoder_dims.items()})
        self.lstm = fused.FusedLSTM(members, cfg.proj_dim, cfg.lstm_hidden, cfg.lstm_layers,
                                    cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.head = fused.FusedLinear(members, cfg.lstm_hidden, len(CLASSES) + len(ATTRIBUTES))

    @property
    def architecture(self) -> tuple:
        """What members of one network share: encoders, model config and the layers read (hence mixed)."""
        return self.encoder_dims, self.cfg, self.read_layers

    def reader_layers(self) -> dict:
        """`data.BatchReader`'s `layers` and `squeeze` for this network's input."""
        return layer_mix.reader_layers(self.read_layers, self.layers)

    @classmethod
    def from_states(cls, encoder_dims: dict[str, int], cfg: ModelConfig, states: Sequence[Mapping[str, torch.Tensor]],
                    read_layers: dict[str, list[int]] | None = None) -> FusionNetwork:
        """A network whose member g is the ordinary state dict `states[g]` (on the CPU; draws no random numbers)."""
        with torch.device("meta"):
            network = cls(encoder_dims, cfg, len(states), read_layers)
        network = network.to_empty(device="cpu")
        for g, state in enumerate(states):
            network.load_member(g, state)
        return network

    @classmethod
    def stack(cls, networks: Sequence[FusionNetwork]) -> FusionNetwork:
        """One network of all members of `networks` in order (one `architecture`: the same encoders, config and
        layers), on the first one's device."""
        first = networks[0]
        for other in networks[1:]:
            if other.architecture != first.architecture:
                raise ValueError("FusionNetwork.stack: members must share encoders and model config (and layers) "
                                 f"({other.architecture} vs {first.architecture})")
        states = [n.member_state(g) for n in networks for g in range(n.size)]
        return cls.from_states(first.encoder_dims, first.cfg, states, first.read_layers).to(first.head.weight.device)

    def forward(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [name for name in self.encoder_dims if name not in features]
        if missing:
            raise KeyError(f"FusionNetwork: features of encoder(s) {missing} are missing")
        sequence = torch.stack([branch(*features[name]) for name, branch in self.branches.items()], dim=2)
        last = self.lstm(sequence)[:, :, -1]                                # (G, B, H)
        with torch.autocast(last.device.type, enabled=False):           # the head in float32 (`head_outputs`)
            return head_outputs(self.head(last.float()))


def head_outputs(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's (..., 11) output as class logits (..., 8) and attributes (..., 3) in 1..7 (1 + 6·sigmoid).

    Callers run the head and this in float32, also under autocast: `sigmoid` is not on autocast's float32 list, so in
    bfloat16 an attribute above 4 would move in steps of ~0.03 and epoch selection would score other numbers than
    the ensemble."""
    low, high = ATTRIBUTE_RANGE
    n = len(CLASSES)
    return out[..., :n], low + (high - low) * torch.sigmoid(out[..., n:])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
