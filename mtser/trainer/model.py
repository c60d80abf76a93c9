"""The fusion model: per encoder pooling (attentive statistics or mean) → dense → LayerNorm, a LSTM over the sequence
of encoder embeddings, and one linear head giving 8 class logits and 3 attributes in 1..7."""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from mtser.featurestore.labels import ATTRIBUTES, ATTRIBUTE_RANGE, CLASSES
from mtser.trainer import native
from mtser.trainer.config import ModelConfig

Features = dict[str, tuple[torch.Tensor, torch.Tensor]]  # encoder name -> (x (B, T, D), mask (B, T) True = frame)


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


class AttentiveStatsPooling(nn.Module):
    """Okabe et al. 2018: softmax attention over frames; attention-weighted mean and standard deviation.

    Padded frames get exactly zero weight, so (finite) padding leaves the output unchanged. The statistics are two
    batched matrix products in float32 (also under autocast: E[x²] − E[x]² needs the precision), which costs far
    less memory traffic than broadcasting the weights over (B, T, D).
    """

    def __init__(self, dim: int, attention_dim: int, eps: float = 1e-5):
        super().__init__()
        # The score layer has no bias: softmax over frames is shift-invariant, so a bias there cannot change the
        # output, its true gradient is zero and AdamW would only random-walk it on rounding noise.
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(), nn.Linear(attention_dim, 1, bias=False))
        self.eps = eps
        self.out_dim = 2 * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first = self.attention[0]
        hidden = tanh_linear(x.reshape(-1, x.shape[-1]), first.weight, first.bias).view(*x.shape[:-1], -1)
        scores = self.attention[2](hidden).squeeze(-1).float()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # finite: an empty row stays NaN-free
        weights = torch.softmax(scores, dim=1).unsqueeze(1)                # (B, 1, T)
        with torch.autocast(x.device.type, enabled=False):
            mean, second = attention_moments(weights, x.float())
            variance = second - mean**2
        return torch.cat([mean, torch.sqrt(variance.clamp(min=self.eps))], dim=-1).squeeze(1)


class MeanPooling(nn.Module):
    """Mean over the unpadded frames (zeros for an empty sequence)."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)                                   # (B, 1, T)
        return (torch.bmm(m, x) / m.sum(dim=2, keepdim=True).clamp(min=1.0)).squeeze(1)


class EncoderBranch(nn.Module):
    """Pooling, dense projection to proj_dim and LayerNorm for one encoder."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.pool = AttentiveStatsPooling(dim, cfg.attention_dim) if cfg.pooling == "asp" else MeanPooling(dim)
        self.project = nn.Linear(self.pool.out_dim, cfg.proj_dim)
        self.norm = nn.LayerNorm(cfg.proj_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.project(self.pool(x, mask))))


class FusionModel(nn.Module):
    """Encoder embeddings in `encoder_dims` order form the LSTM's input sequence; its last output feeds the head."""

    def __init__(self, encoder_dims: dict[str, int], cfg: ModelConfig):
        super().__init__()
        if not encoder_dims:
            raise ValueError("FusionModel: needs at least one encoder")
        self.encoder_dims = dict(encoder_dims)
        self.cfg = cfg
        self.branches = nn.ModuleDict({name: EncoderBranch(dim, cfg) for name, dim in encoder_dims.items()})
        self.lstm = nn.LSTM(cfg.proj_dim, cfg.lstm_hidden, num_layers=cfg.lstm_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)
        self.head = nn.Linear(cfg.lstm_hidden, len(CLASSES) + len(ATTRIBUTES))

    def forward(self, features: Features) -> tuple[torch.Tensor, torch.Tensor]:
        """Return class logits (B, 8) and attributes (B, 3) in 1..7."""
        missing = [name for name in self.encoder_dims if name not in features]
        if missing:
            raise KeyError(f"FusionModel: features of encoder(s) {missing} are missing")
        sequence = torch.stack([branch(*features[name]) for name, branch in self.branches.items()], dim=1)
        output, _ = self.lstm(sequence)
        last = output[:, -1]
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
