"""The fusion model: sizes from config, padding-invariant pooling, output ranges."""
from pathlib import Path

import pytest
import torch

from mtser.config import ModelConfig, load_config
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
def test_tanh_linear_matches_torch_forward_and_backward(rows):
    """The oneDNN attention layer gives torch's values and gradients (x, W, b), also for no rows (F.linear then)."""
    torch.manual_seed(0)
    x = torch.randn(rows, 48, requires_grad=True)
    weight, bias = torch.randn(12, 48, requires_grad=True), torch.randn(12, requires_grad=True)
    upstream = torch.randn(rows, 12)
    ours = tanh_linear(x, weight, bias)
    grads = torch.autograd.grad((ours * upstream).sum(), (x, weight, bias))
    reference = torch.tanh(torch.nn.functional.linear(x, weight, bias))
    expected = torch.autograd.grad((reference * upstream).sum(), (x, weight, bias))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if rows and torch.backends.mkldnn.is_available():
        assert ours.grad_fn.name().endswith("_OneDnnTanhLinearBackward")     # the fast path was the one tested
