"""What do the ASP pooling's two hot spots cost on this CPU: the attention GEMM through MKL or oneDNN, and the
weighted moments through the C kernel or two batched matmuls, for a model alone and for cohorts?

    .venv/bin/python bench/pooling.py [--quick] [--threads N]

Realistic shapes: a batch of 32 utterances of 2-8 s (real frames 60 % of the padded 32 × 400) of Whisper-large
frames (1,280-d, float32 as the CPU loader delivers them), ASP attention of 32 per member, members G = 1, 4, 8.
Measured alternately, median of rounds, forward and backward (weight gradients only: frames need none):
  gemm     tanh(x Wᵀ + b) over the real frames (8,192 × 1,280 → 32·G) and its weight gradient: MKL (`F.linear`,
           PyTorch's CPU GEMM) versus oneDNN (`model._OneDnnTanhLinear`, tanh fused); `model.tanh_linear` picks
           oneDNN only where `model.onednn_gemm_is_faster` says so (AMD CPUs with AVX-512)
  moments  Σₜ w·x and Σₜ w·x² for G heads (`model.attention_moments`): the C kernel (`native/moments.c`) versus
           the two batched matmuls it replaces (x² written out first)
The last line printed is one JSON object: speed ratios (> 1: the first named is faster) and milliseconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from timing import alternated  # noqa: E402

from mtser.trainer import native  # noqa: E402
from mtser.trainer.model import _NativeMoments, _OneDnnTanhLinear, onednn_gemm_is_faster  # noqa: E402

BATCH, PADDED, DIM, ATTENTION = 32, 400, 1280, 32


def gemm_runs(g: int) -> dict:
    rows = 8192                                                   # ≈ 60 % of 32 × 400, padded to 256 rows
    x = torch.randn(rows, DIM)
    weight = (torch.randn(g * ATTENTION, DIM) * 0.03).requires_grad_()
    bias = torch.zeros(g * ATTENTION, requires_grad=True)
    upstream = torch.randn(rows, g * ATTENTION)

    def mkl() -> None:
        torch.autograd.grad((torch.tanh(torch.nn.functional.linear(x, weight, bias)) * upstream).sum(), (weight, bias))

    def onednn() -> None:
        torch.autograd.grad((_OneDnnTanhLinear.apply(x, weight, bias) * upstream).sum(), (weight, bias))

    return {"mkl": mkl, "onednn": onednn}


def moments_runs(g: int) -> dict:
    lengths = torch.linspace(100, PADDED, BATCH).long()           # 2-8 s at 50 frames/s
    mask = torch.arange(PADDED)[None] < lengths[:, None]
    x = torch.randn(BATCH, PADDED, DIM) * mask[..., None]
    scores = torch.randn(BATCH, g, PADDED).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=2).requires_grad_()
    up_mean, up_second = torch.randn(BATCH, g, DIM), torch.randn(BATCH, g, DIM)

    def kernel() -> None:
        mean, second = _NativeMoments.apply(weights, x)
        torch.autograd.grad((mean * up_mean).sum() + (second * up_second).sum(), weights)

    def matmuls() -> None:
        mean, second = torch.bmm(weights, x), torch.bmm(weights, x * x)
        torch.autograd.grad((mean * up_mean).sum() + (second * up_second).sum(), weights)

    return {"kernel": kernel, "matmuls": matmuls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cohort sizes (finishes within 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a 1-CPU trial)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if native.library("moments") is None:
        raise SystemExit("bench: the moments kernel could not be built here (no C compiler?), nothing to compare")
    sizes, rounds = ((1, 4), 3) if args.quick else ((1, 4, 8), 7)
    result: dict[str, object] = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "onednn_dispatched": onednn_gemm_is_faster()}
    for question, runs_of, first, second in (("gemm", gemm_runs, "onednn", "mkl"),
                                             ("moments", moments_runs, "kernel", "matmuls")):
        for g in sizes:
            runs = runs_of(g)
            for run in runs.values():
                run()                                             # warm-up: first-touch pages, oneDNN's GEMM plans
            a, b = alternated([runs[first], runs[second]], rounds)
            print(f"{question} G={g}: {first} {a * 1e3:.1f} ms, {second} {b * 1e3:.1f} ms (forward + backward)")
            result[f"{question}_{first}_vs_{second}_g{g}"] = round(b / a, 3)
            result[f"{question}_ms_{first}_g{g}"] = round(a * 1e3, 2)
            result[f"{question}_ms_{second}_g{g}"] = round(b * 1e3, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
