"""What do the ASP pooling's two hot spots cost on this CPU, alone and in the whole cohort step: the attention GEMM
through MKL or oneDNN, and the weighted moments through the C kernel (`make native`) or PyTorch's batched matmuls?

    .venv/bin/python bench/pooling.py [--quick] [--threads N] [--model demo|paper]

Realistic shapes: a batch of 32 utterances of 2-8 s (real frames 60 % of the padded 32 × 400) of Whisper-large
frames (1,280-d, float32 as the CPU loader delivers them), ASP attention of 32 per member, members G = 1, 4, 8
(--quick: 1, 4). Measured alternately, median of rounds, forward and backward (weight gradients only: frames need
none):
  gemm     tanh(x Wᵀ + b) over the real frames (8,192 × 1,280 → 32·G) and its weight gradient: MKL (`F.linear`,
           PyTorch's CPU GEMM) versus oneDNN (`kernels._OneDnnTanhLinear`, tanh fused); `gemm_onednn_dispatched_gG`
           is what `kernels.onednn_gemm_is_faster` decided for that shape in this process
  moments  Σₜ w·x and Σₜ w·x² for G heads (`kernels.attention_moments`): the C kernel (`native/moments.c`) versus the
           two batched matmuls it replaces (x² written out first) and, as another pure-PyTorch formulation, one
           batched matmul over [x, x²] concatenated
  step     the whole cohort step of G ASP members (`bench/tune.py`'s StepBench: forward, losses, backward, clipping,
           AdamW) on bench/loader.py's synthetic store (3 encoders), batches of 32, ms per step, `attention_moments`
           with the kernel versus without it (its batched-matmul path)
The last line printed is one JSON object: speed ratios (> 1: the first named is faster), milliseconds and the load
average at start and end, e.g. `native_vs_bmm_step_g4` = step time without the kernel / with it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from loader import write_store  # noqa: E402
from timing import alternated  # noqa: E402
from tune import StepBench, make_setup  # noqa: E402

from mtser.trainer import native  # noqa: E402
from mtser.trainer.kernels import _NativeMoments, _OneDnnTanhLinear, onednn_gemm_is_faster  # noqa: E402

BATCH, PADDED, DIM, ATTENTION = 32, 400, 1280, 32


def gemm_runs(g: int) -> dict[str, Callable[[], None]]:
    rows = 8192                                                   # ≈ 60 % of 32 × 400, padded to 256 rows
    x = torch.randn(rows, DIM)
    weight = (torch.randn(g * ATTENTION, DIM) * 0.03).requires_grad_()
    bias = torch.zeros(g * ATTENTION, requires_grad=True)
    upstream = torch.randn(rows, g * ATTENTION)

    def mkl() -> None:
        torch.autograd.grad((torch.tanh(torch.nn.functional.linear(x, weight, bias)) * upstream).sum(), (weight, bias))

    def onednn() -> None:
        torch.autograd.grad((_OneDnnTanhLinear.apply(x, weight, bias) * upstream).sum(), (weight, bias))

    return {"onednn": onednn, "mkl": mkl}


def moments_runs(g: int) -> dict[str, Callable[[], None]]:
    lengths = torch.linspace(100, PADDED, BATCH).long()           # 2-8 s at 50 frames/s
    mask = torch.arange(PADDED)[None] < lengths[:, None]
    x = torch.randn(BATCH, PADDED, DIM) * mask[..., None]
    scores = torch.randn(BATCH, g, PADDED).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=2).requires_grad_()
    up_mean, up_second = torch.randn(BATCH, g, DIM), torch.randn(BATCH, g, DIM)

    def backward(mean: torch.Tensor, second: torch.Tensor) -> None:
        torch.autograd.grad((mean * up_mean).sum() + (second * up_second).sum(), weights)

    def cat() -> None:
        both = torch.bmm(weights, torch.cat([x, x * x], dim=-1))
        backward(both[..., :DIM], both[..., DIM:])

    return {"kernel": lambda: backward(*_NativeMoments.apply(weights, x)),
            "bmm": lambda: backward(torch.bmm(weights, x), torch.bmm(weights, x * x)), "cat": cat}


def step_runs(bench: StepBench) -> dict[str, Callable[[], None]]:
    cohort = [(*bench.cohort(bench.models), bench.losses)]

    def without_kernel() -> None:
        library = native.library
        native.library = lambda name: None                        # attention_moments takes its PyTorch path
        try:
            bench.cohort_steps(cohort)
        finally:
            native.library = library

    return {"native": lambda: bench.cohort_steps(cohort), "bmm": without_kernel}


def measure(result: dict, question: str, g: int, runs: dict[str, Callable[[], None]], rounds: int,
            per: int = 1) -> None:
    """Warm up, time the runs alternated, and record each one's ms (per `per` steps) and the first's speed ratio
    over the others."""
    for run in runs.values():
        run()                                                     # first-touch pages, oneDNN's GEMM plans
    times = {name: s / per for name, s in zip(runs, alternated(list(runs.values()), rounds))}
    (first, t), *others = times.items()
    print(f"{question} G={g}: " + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in times.items()), flush=True)
    for name, s in times.items():
        result[f"{question}_ms_{name}_g{g}"] = round(s * 1e3, 2)
    for name, s in others:
        key = f"native_vs_bmm_step_g{g}" if question == "step" else f"{question}_{first}_vs_{name}_g{g}"
        result[key] = round(s / t, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and cohort sizes (finishes within 60 s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a 1-CPU trial)")
    parser.add_argument("--model", choices=["demo", "paper"], default="demo", help="the step's members (default demo)")
    args = parser.parse_args()
    if native.library("moments") is None:
        raise SystemExit("bench: the moments kernel is not built here (`make native`): nothing to compare")
    sizes, rounds, steps = ((1, 4), 3, 2) if args.quick else ((1, 4, 8), 7, 4)
    result: dict[str, object] = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "model": args.model}
    load = round(os.getloadavg()[0], 2)
    torch.set_num_threads(args.threads)
    for g in sizes:
        result[f"gemm_onednn_dispatched_g{g}"] = onednn_gemm_is_faster(g * ATTENTION, DIM)
        measure(result, "gemm", g, gemm_runs(g), rounds)
    for g in sizes:
        measure(result, "moments", g, moments_runs(g), rounds)
    with tempfile.TemporaryDirectory(prefix="mtser-bench-pooling-") as tmp:
        write_store(tmp, 32 * steps)
        setup = make_setup(args.model, "cpu", tiny=False)
        for g in sizes:
            bench = StepBench(tmp, setup, g, steps)               # sets 1 torch thread, as the tune bench's steps
            torch.set_num_threads(args.threads)
            measure(result, "step", g, step_runs(bench), rounds, per=steps)
    result["load_average_1min"] = [load, round(os.getloadavg()[0], 2)]     # at the start and at the end
    print(json.dumps(result))


if __name__ == "__main__":
    main()
