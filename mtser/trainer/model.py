"""The fusion network: per encoder pooling (attentive statistics or mean) → dense → LayerNorm, a LSTM over the
sequence of encoder embeddings, and one linear head giving 8 class logits and 3 attributes in 1..7, built once from
the fused layers of `fused.py` for G members of one architecture (`FusionNetwork`): training, epoch selection,
evaluation, ensembles and prediction all run it; a model alone is G = 1. Also the GEMM and ASP-moment kernels the
fused layers run on."""
from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mtser.featurestore.labels import ATTRIBUTES, ATTRIBUTE_RANGE, CLASSES
from mtser.trainer import fused, layer_mix, native
from mtser.trainer.config import ModelConfig
from mtser.trainer.fused import MemberModule

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder name -> (x (B, T, D) or (B, T, L, D) of L
                                                         # layers, mask (B, T) True = frame)


# oneDNN compiles a GEMM per shape: a caller whose row count changes every step (every batch has its own number of
# real frames) pads its rows to a multiple of this, or plans a new GEMM at nearly every step (docs/benchmarks.md).
GEMM_ROWS = 256


def tanh_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """tanh(x Wᵀ + b): the ASP attention's first layer (in a cohort: for all members, one GEMM).

    On the CPU in float32 it runs through oneDNN (`_OneDnnTanhLinear`, the tanh fused; see `GEMM_ROWS`) where oneDNN
    measured faster than MKL, PyTorch's float32 GEMM, for this weight's shape (`onednn_gemm_is_faster`); elsewhere
    (CUDA, autocast, a torch built without oneDNN, no rows: oneDNN has no primitive for an empty GEMM) through
    `F.linear`."""
    if (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and x.numel() > 0 and onednn_gemm_is_faster(*weight.shape)):
        return _OneDnnTanhLinear.apply(x, weight, bias)
    return torch.tanh(F.linear(x, weight, bias))


@functools.cache
def onednn_gemm_is_faster(out_features: int, in_features: int) -> bool:
    """Whether `_OneDnnTanhLinear` (forward and weight gradient) beats MKL's `F.linear` + tanh on this CPU for an
    (out_features, in_features) weight: timed once per process and shape on 2 × `GEMM_ROWS` random rows (a private
    generator: the global random state is untouched), the two alternated, best of 3 after a warm-up. oneDNN must
    win by 10 %: a near tie keeps MKL, PyTorch's default. False where torch has no oneDNN. Which GEMM libraries
    pay on which CPUs: `docs/benchmarks.md` (ASP pooling)."""
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    layers = (lambda *a: torch.tanh(F.linear(*a)), _OneDnnTanhLinear.apply)
    times: list[list[float]] = [[], []]
    with torch.inference_mode(False), torch.enable_grad():   # also when first called under no_grad / inference_mode
        x = torch.randn(2 * GEMM_ROWS, in_features, generator=generator)
        weight = (torch.randn(out_features, in_features, generator=generator) * in_features**-0.5).requires_grad_()
        bias = torch.zeros(out_features, requires_grad=True)
        for _ in range(4):                                            # round 0: warm-up (oneDNN plans its GEMM)
            for layer, t in zip(layers, times):
                start = time.perf_counter()
                torch.autograd.grad(layer(x, weight, bias).sum(), (weight, bias))
                t.append(time.perf_counter() - start)
    mkl, onednn = (min(t[1:]) for t in times)
    return onednn < 0.9 * mkl


class _OneDnnTanhLinear(torch.autograd.Function):
    """tanh(x Wᵀ + b) in float32 with oneDNN's GEMM (tanh fused into it) and its weight gradient as a oneDNN GEMM.

    Used where `onednn_gemm_is_faster`. Same IEEE float32 arithmetic as MKL's, only the summation order differs."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        hidden = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "tanh", [], "")
        ctx.save_for_backward(x, weight, hidden)
        return hidden

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205 (autograd's signature)
        x, weight, hidden = ctx.saved_tensors
        pre = grad * (1 - hidden * hidden)                                    # tanh's backward
        grad_x = pre @ weight if ctx.needs_input_grad[0] else None
        grad_weight = (torch.ops.mkldnn._linear_pointwise(pre.t(), x.t(), None, "none", [], "")
                       if ctx.needs_input_grad[1] else None)                   # preᵀ x, (out, in)
        grad_bias = pre.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def attention_moments(weights: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σₜ w·x and Σₜ w·x² per head: weights (B, G, T) and frames x (B, T, D) give (B, G, D) twice (ASP's weighted
    mean and second moment; in a cohort, G members at once).

    On the CPU in float32, for frames that need no gradient, where the C kernel `native/moments.c` is built
    (`make native`), it reads each frame once for all heads and both moments (`_NativeMoments`); elsewhere (CUDA,
    the kernel not built) two batched matrix products, which read the frames once per head and per moment and need
    x² written out first. Which pays on the CPU: `docs/benchmarks.md` (ASP pooling)."""
    if (native.library("moments") is None or x.device.type != "cpu" or x.dtype != torch.float32
            or weights.dtype != torch.float32 or x.requires_grad or x.numel() == 0):
        return torch.bmm(weights, x), torch.bmm(weights, x * x)
    return _NativeMoments.apply(weights, x)


class _NativeMoments(torch.autograd.Function):
    """`attention_moments` by `native/moments.c` (the samples shared out over torch's intra-op threads); the
    gradient is the weights' only (the frames need none)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        weights, x = weights.contiguous(), x.contiguous()
        (b, g, t), d = weights.shape, x.shape[-1]
        mean, second = x.new_empty(b, g, d), x.new_empty(b, g, d)
        native.call("moments", "moments_forward", (weights, x, mean, second), (b, g, t, d))
        ctx.save_for_backward(weights, x)
        return mean, second

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor | None, grad_second: torch.Tensor | None):  # noqa: ANN001, ANN205
        weights, x = ctx.saved_tensors
        (b, g, t), d = weights.shape, x.shape[-1]
        grad_mean = x.new_zeros(b, g, d) if grad_mean is None else grad_mean.contiguous()
        grad_second = x.new_zeros(b, g, d) if grad_second is None else grad_second.contiguous()
        grad_weights = weights.new_empty(b, g, t)
        native.call("moments", "moments_backward", (weights, x, grad_mean, grad_second, grad_weights), (b, g, t, d))
        return grad_weights, None


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
    `reader_layers`; checkpoints record them); an encoder absent is read as stored. `layers`: L per encoder whose
    branch learns a mix of its input's L layers (input (B, T, L, D)); by default, with `cfg.layer_weights`, every
    encoder of `read_layers` (`layer_mix.mixed_layers`). Other encoders take (B, T, D)."""

    def __init__(self, encoder_dims: dict[str, int], cfg: ModelConfig, members: int = 1,
                 layers: dict[str, int] | None = None, read_layers: dict[str, list[int]] | None = None):
        super().__init__()
        if not encoder_dims:
            raise ValueError("FusionNetwork: needs at least one encoder")
        self.encoder_dims = dict(encoder_dims)
        self.cfg = cfg
        self.read_layers = {name: list(v) for name, v in (read_layers or {}).items()}
        self.layers = dict(layer_mix.mixed_layers(cfg, self.read_layers) if layers is None else layers)
        self.branches = nn.ModuleDict({name: EncoderBranch(members, dim, cfg, self.layers.get(name))
                                       for name, dim in encoder_dims.items()})
        self.lstm = fused.FusedLSTM(members, cfg.proj_dim, cfg.lstm_hidden, cfg.lstm_layers,
                                    cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.head = fused.FusedLinear(members, cfg.lstm_hidden, len(CLASSES) + len(ATTRIBUTES))

    @property
    def architecture(self) -> tuple:
        """What members of one network share: encoders, model config, mixed and read layers."""
        return self.encoder_dims, self.cfg, self.layers, self.read_layers

    def reader_layers(self) -> dict:
        """`data.BatchReader`'s `layers` and `squeeze` for this network's input."""
        return layer_mix.reader_layers(self.read_layers, self.layers)

    @classmethod
    def from_states(cls, encoder_dims: dict[str, int], cfg: ModelConfig, states: Sequence[Mapping[str, torch.Tensor]],
                    layers: dict[str, int] | None = None, read_layers: dict[str, list[int]] | None = None
                    ) -> FusionNetwork:
        """A network whose member g is the ordinary state dict `states[g]` (on the CPU; draws no random numbers)."""
        with torch.device("meta"):
            network = cls(encoder_dims, cfg, len(states), layers, read_layers)
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
        return cls.from_states(first.encoder_dims, first.cfg, states, first.layers,
                               first.read_layers).to(first.head.weight.device)

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
