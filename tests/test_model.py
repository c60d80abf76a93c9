"""The fusion model: sizes from config, padding-invariant pooling, output ranges."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from mtser.trainer.config import ModelConfig, load_config
from mtser.trainer.data import pad
from mtser.trainer.model import AttentiveStatsPooling, FusionModel, MeanPooling, count_parameters, tanh_linear

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PAPER_DIMS = {"wavlm": 1024, "whisper": 1280, "roberta": 1024}  # WavLM-large, Whisper-large-v3, RoBERTa-large


@pytest.mark.parametrize("pooling, low, high", [("asp", 64e6, 68e6), ("mean", 60e6, 64e6)])
def test_paper_config_has_about_60m_parameters(pooling, low, high):
    cfg = load_config(CONFIGS / "paper.yaml", overrides={"model.pooling": pooling})
    with torch.device("meta"):  # sizes only, no memory
        model = FusionModel(PAPER_DIMS, cfg.model)
    lstm = sum(p.numel() for p in model.lstm.parameters())
    # LSTM: layer 1 4·2048·(1028 + 2048 + 2), layer 2 4·2048·(2048 + 2048 + 2)
    assert lstm == 4 * 2048 * (1028 + 2048 + 2) + 4 * 2048 * (2048 + 2048 + 2)
    assert low < count_parameters(model) < high
    assert model.head.out_features == 11 and model.branches["whisper"].project.in_features == (
        2 * 1280 if pooling == "asp" else 1280)


@pytest.mark.parametrize("pool", [AttentiveStatsPooling(6, 4), MeanPooling(6)])
def test_pooling_ignores_padding(pool):
    torch.manual_seed(0)
    short, long = torch.randn(3, 6), torch.randn(9, 6)
    alone = pool(*pad([short.numpy()]))
    x, mask = pad([short.numpy(), long.numpy()])
    x[0, 3:] = 1e3 * torch.randn(6, 6)  # garbage in the padding must not leak in
    padded = pool(x, mask)
    torch.testing.assert_close(padded[0], alone[0], rtol=1e-5, atol=1e-6)


def test_attentive_statistics_are_a_weighted_mean_and_std():
    pool = AttentiveStatsPooling(2, 3)
    torch.nn.init.zeros_(pool.attention[2].weight)  # equal scores -> uniform weights -> plain mean and std
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [0.0, 0.0]]])
    out = pool(x, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, 4.0, 1.0, 2.0]]), rtol=1e-4, atol=1e-4)


def test_outputs_and_empty_sequences():
    model = FusionModel({"a": 5, "b": 7}, ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6)).eval()
    feats = {"a": pad([torch.randn(4, 5).numpy(), torch.zeros(0, 5).numpy()]),
             "b": pad([torch.randn(2, 7).numpy(), torch.randn(3, 7).numpy()])}
    logits, attrs = model(feats)
    assert logits.shape == (2, 8) and attrs.shape == (2, 3)
    assert torch.isfinite(logits).all() and ((attrs > 1) & (attrs < 7)).all()
    with pytest.raises(KeyError, match=r"\['b'\]"):
        model({"a": feats["a"]})


@pytest.mark.parametrize("rows", [37, 0])
@pytest.mark.parametrize("path", ["tanh_linear", "onednn"])
def test_tanh_linear_matches_torch_forward_and_backward(rows, path):
    """The attention layer gives torch's values and gradients (x, W, b) by the path this CPU dispatches to and by
    the oneDNN one whatever the CPU, also for no rows (F.linear then)."""
    from mtser.trainer.model import _OneDnnTanhLinear, onednn_gemm_is_faster

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
    if rows and path == "tanh_linear":                      # the dispatch: oneDNN exactly where it is faster
        assert ours.grad_fn.name().endswith("_OneDnnTanhLinearBackward") == onednn_gemm_is_faster()


def _moments_case(g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax weights (B, g, T) over padded frames (B, T, D): full, partial, one-frame and empty sequences."""
    torch.manual_seed(g)
    lengths = torch.tensor([37, 10, 1, 0, 20])
    mask = torch.arange(37)[None] < lengths[:, None]
    x = torch.randn(5, 37, 35) * mask[..., None]                       # D = 35: vector blocks and a scalar tail
    scores = torch.randn(5, g, 37).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    return torch.softmax(scores, dim=2).requires_grad_(), x


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_native_attention_moments_equal_the_batched_matrix_products(heads):
    from mtser.trainer import native
    from mtser.trainer.model import _NativeMoments

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: the kernel cannot be built (attention_moments falls back)")
    assert native.library("moments") is not None
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


def test_attention_moments_use_the_kernel_only_where_it_applies():
    from mtser.trainer.model import attention_moments

    weights, x = _moments_case(2)
    assert attention_moments(weights, x)[0].grad_fn.name().endswith("_NativeMomentsBackward")
    needs_grad = x.clone().requires_grad_()          # the kernel gives no frame gradient: the matrix products do
    assert attention_moments(weights, needs_grad)[0].grad_fn.name() == "BmmBackward0"
    assert attention_moments(weights.double(), x.double())[0].grad_fn.name() == "BmmBackward0"


def test_native_library_falls_back_without_a_working_compiler(monkeypatch, tmp_path, caplog):
    from mtser.trainer import native

    build = native.library.__wrapped__              # uncached: each call decides afresh
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("MTSER_NATIVE", "0")
    assert build("moments") is None
    monkeypatch.delenv("MTSER_NATIVE")
    monkeypatch.setenv("CC", "false")               # a "compiler" that fails: logged, no library, nothing left
    assert build("moments") is None
    assert "building moments failed" in caplog.text
    assert not list((tmp_path / "mtser" / "native").iterdir())
    monkeypatch.delenv("CC")
    first = build("moments")
    cache = tmp_path / "mtser" / "native"
    assert first is not None and sorted(p.suffix for p in cache.iterdir()) == [".sha256", ".so"]
    assert build("moments")._name == first._name    # built once, then loaded from the cache


@pytest.mark.parametrize("fused", [False, True])
def test_outputs_leave_the_head_in_float32_under_autocast(fused):
    """Under bfloat16 autocast the head and 1 + 6·sigmoid still run in float32: the outputs are float32 and equal a
    float32 head's on the same (bfloat16) head input, for a model alone and for a cohort."""
    from mtser.trainer.cohort import CohortModel

    torch.manual_seed(0)
    cfg = ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6)
    feats = {"a": pad([torch.randn(4, 5).numpy(), torch.randn(6, 5).numpy()]),
             "b": pad([torch.randn(2, 7).numpy(), torch.randn(3, 7).numpy()])}
    model = FusionModel({"a": 5, "b": 7}, cfg)
    head_inputs = []                                        # the LSTM's last output (G, B, H) or (B, H)
    if fused:
        model = CohortModel([model, FusionModel({"a": 5, "b": 7}, cfg)])
        lstm = model._lstm
        model._lstm = lambda sequence: head_inputs.append(lstm(sequence)) or head_inputs[-1]
        weight, bias = model.p("head.weight"), model.p("head.bias")
    else:
        model.lstm.register_forward_hook(lambda module, args, out: head_inputs.append(out[0][:, -1]))
        weight, bias = model.head.weight[None], model.head.bias[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attrs = model.eval()(feats)
    (last,) = head_inputs
    assert last.dtype == torch.bfloat16                     # the case at issue: autocast ran the rest in bfloat16
    assert logits.dtype == attrs.dtype == torch.float32
    with torch.no_grad():
        out = torch.stack([torch.nn.functional.linear(x, w, b)
                           for x, w, b in zip(last.float().reshape(len(weight), -1, 6), weight, bias)])
    out = out.reshape(*logits.shape[:-1], 11)
    torch.testing.assert_close(logits, out[..., :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(attrs, 1 + 6 * torch.sigmoid(out[..., 8:]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["swapped", "no record"])
def test_a_cached_native_library_is_loaded_only_when_its_sha256_matches(monkeypatch, tmp_path, caplog, damage):
    import hashlib

    from mtser.trainer import native

    build = native.library.__wrapped__
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = Path(build("moments")._name)
    record = built.with_name(built.name + ".sha256")
    source = Path(native.__file__).with_name("moments.c").read_text()
    assert len(built.stem.split("-")[-1]) == 64
    assert record.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    original = built.read_bytes()
    if damage == "swapped":                         # another library in its place: it must not be loaded
        swapped = built.with_name("swapped.tmp")    # put in place by rename: overwriting the file this process has
        swapped.write_bytes(b"\x7fELF not the library built for " + source[:40].encode())   # mapped would be
        swapped.replace(built)                      # a SIGBUS when the library's pages are next touched (at exit)
    else:
        record.unlink()
    again = build("moments")
    assert again is not None and "does not match the SHA-256" in caplog.text and str(built) in caplog.text
    assert record.read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    assert len(built.read_bytes()) == len(original)   # rebuilt from the source
