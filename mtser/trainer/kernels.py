"""The arithmetic the fused layers run on the CPU: the ASP attention's first layer as one GEMM with its tanh
(`tanh_linear`: MKL, or oneDNN where timing at the weight's shape says it is faster) and the attention-weighted
first and second moments of the frames (`attention_moments`: the optional C kernel of `native/`, else two batched
matrix products)."""
from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from mtser.trainer import native


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
