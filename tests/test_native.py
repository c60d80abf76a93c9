"""The ASP pooling's two CPU paths chosen by measurement: the attention GEMM (MKL or oneDNN, timed per shape) and the
weighted moments (the optional C kernel `make native` builds, or PyTorch's batched matmuls)."""
import functools
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mtser.trainer import native
from mtser.trainer.kernels import _OneDnnTanhLinear, attention_moments, onednn_gemm_is_faster, tanh_linear

kernel_built = pytest.mark.skipif(native.library("moments") is None,
                                  reason="the moments kernel is not built here (`make native`); the PyTorch path runs")


@pytest.mark.parametrize("rows", [37, 0])
@pytest.mark.parametrize("path", ["tanh_linear", "onednn"])
def test_tanh_linear_matches_torch_forward_and_backward(rows, path):
    """The attention layer gives torch's values and gradients (x, W, b) by the path this CPU dispatches to and by
    the oneDNN one whatever the CPU, also for no rows (F.linear then)."""
    torch.manual_seed(0)
    x = torch.randn(rows, 48, requires_grad=True)
    weight, bias = torch.randn(12, 48, requires_grad=True), torch.randn(12, requires_grad=True)
    upstream = torch.randn(rows, 12)
    onednn = path == "onednn" and rows > 0 and torch.backends.mkldnn.is_available()
    ours = _OneDnnTanhLinear.apply(x, weight, bias) if onednn else tanh_linear(x, weight, bias)
    grads = torch.autograd.grad((ours * upstream).sum(), (x, weight, bias))
    reference = torch.tanh(torch.nn.functional.linear(x, weight, bias))
    expected = torch.autograd.grad((reference * upstream).sum(), (x, weight, bias))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if rows and path == "tanh_linear":                      # the dispatch: oneDNN exactly where it measured faster
        assert ours.grad_fn.name().endswith("_OneDnnTanhLinearBackward") == onednn_gemm_is_faster(12, 48)


def test_the_gemm_library_is_decided_by_timing_without_touching_the_random_state(monkeypatch):
    decide = onednn_gemm_is_faster.__wrapped__              # uncached: each call measures afresh
    state = torch.get_rng_state()
    assert isinstance(decide(64, 128), bool)
    assert torch.equal(torch.get_rng_state(), state)       # training's random stream is not shifted by the probe
    opened = []
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or pytest.fail(f"opened {a}"))
    decide(64, 128)                                         # by timing: no /proc/cpuinfo (or any file) read
    assert not opened
    with torch.inference_mode():                            # first met in evaluation: it still times the backward
        assert isinstance(decide(64, 128), bool)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert decide(64, 128) is False                         # no oneDNN in this torch: MKL


def _moments_case(g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights (B, g, T) over padded frames (B, T, D): full, partial, one-frame and empty sequences."""
    torch.manual_seed(g)
    lengths = torch.tensor([37, 10, 1, 0, 20])
    mask = torch.arange(37)[None] < lengths[:, None]
    x = torch.randn(5, 37, 35) * mask[..., None]                       # D = 35: vector blocks and a scalar tail
    scores = torch.randn(5, g, 37).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=2).requires_grad_(), x


@kernel_built
@pytest.mark.parametrize("heads", [1, 3, 9])
def test_native_attention_moments_equal_the_batched_matrix_products(heads):
    from mtser.trainer.kernels import _NativeMoments

    weights, x = _moments_case(heads)
    mean, second = _NativeMoments.apply(weights, x)
    up_mean, up_second = torch.randn_like(mean), torch.randn_like(second)
    (grad,) = torch.autograd.grad((mean * up_mean).sum() + (second * up_second).sum(), weights)
    ref_mean, ref_second = torch.bmm(weights, x), torch.bmm(weights, x * x)
    (ref_grad,) = torch.autograd.grad((ref_mean * up_mean).sum() + (ref_second * up_second).sum(), weights)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, ref_second, rtol=1e-5, atol=1e-6)
    padding = weights.detach() == 0                                      # skipped frames: gradient 0, not used
    torch.testing.assert_close(grad[~padding], ref_grad[~padding], rtol=1e-5, atol=1e-5)
    assert (grad[padding] == 0).all() and padding.any()
    for g in range(heads):                           # a head gives the same bits in a cohort as alone
        alone = _NativeMoments.apply(weights.detach()[:, g:g + 1], x)
        assert torch.equal(alone[0][:, 0], mean[:, g]) and torch.equal(alone[1][:, 0], second[:, g])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                         # the batch split over threads gives the same bits
    try:
        single = _NativeMoments.apply(weights.detach(), x)
        torch.set_num_threads(3)
        threaded = _NativeMoments.apply(weights.detach(), x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], mean) and torch.equal(single[1], second)
    assert torch.equal(threaded[0], mean) and torch.equal(threaded[1], second)


@kernel_built
def test_attention_moments_use_the_kernel_only_where_it_applies():
    weights, x = _moments_case(2)
    assert attention_moments(weights, x)[0].grad_fn.name().endswith("_NativeMomentsBackward")
    needs_grad = x.clone().requires_grad_()          # the kernel gives no frame gradient: the matrix products do
    assert attention_moments(weights, needs_grad)[0].grad_fn.name() == "BmmBackward0"
    assert attention_moments(weights.double(), x.double())[0].grad_fn.name() == "BmmBackward0"


def test_without_the_built_kernel_the_moments_run_on_pytorch(monkeypatch, tmp_path, caplog):
    """Not built, disabled, or not loadable (logged): no library, and `attention_moments` takes the matmuls."""
    load = native.library.__wrapped__                # uncached: each call decides afresh
    monkeypatch.delenv("MTSER_NATIVE", raising=False)
    monkeypatch.setattr(native, "path", lambda name: tmp_path / f"_{name}.so")
    assert load("moments") is None                   # not built: silently the PyTorch path
    (tmp_path / "_moments.so").write_bytes(b"\x7fELF not a library")
    with caplog.at_level(logging.WARNING):
        assert load("moments") is None
    assert "_moments.so cannot be loaded" in caplog.text and "PyTorch path" in caplog.text
    monkeypatch.setenv("MTSER_NATIVE", "0")
    monkeypatch.setattr(native, "path", lambda name: pytest.fail("MTSER_NATIVE=0 must not look for a library"))
    assert load("moments") is None
    monkeypatch.setattr(native, "library", load)
    weights, x = _moments_case(2)
    mean, second = attention_moments(weights, x)
    assert mean.grad_fn.name() == "BmmBackward0"
    torch.testing.assert_close(second, torch.bmm(weights, x * x))


def test_make_native_builds_a_portable_kernel_that_loads(tmp_path, monkeypatch):
    """`make native`'s recipe (run here into a temporary folder) has no -march and gives a library whose kernel
    equals the batched matmuls."""
    root = Path(__file__).resolve().parent.parent
    if not (shutil.which("make") and shutil.which("cc")):
        pytest.skip("no make or C compiler here: `make native` cannot run (the PyTorch path is tested above)")
    recipe = subprocess.run(["make", "-s", "-n", "-B", "native"], cwd=root, capture_output=True, text=True, check=True)
    (command,) = [line.split() for line in recipe.stdout.splitlines() if "moments.c" in line]
    assert not [flag for flag in command if flag.startswith("-march")]
    command[command.index("-o") + 1] = str(tmp_path / "_moments.so")
    subprocess.run(command, cwd=root, check=True)
    monkeypatch.delenv("MTSER_NATIVE", raising=False)
    monkeypatch.setattr(native, "path", lambda name: tmp_path / f"_{name}.so")
    monkeypatch.setattr(native, "library", functools.cache(native.library.__wrapped__))
    weights, x = _moments_case(3)
    mean, second = attention_moments(weights, x)
    assert mean.grad_fn.name().endswith("_NativeMomentsBackward")
    torch.testing.assert_close(second, torch.bmm(weights, x * x), rtol=1e-5, atol=1e-6)
