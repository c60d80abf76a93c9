"""The fusion model: sizes from config, padding-invariant pooling, output ranges."""
from pathlib import Path

import pytest
import torch

from mtser.trainer.config import ModelConfig, load_config
from mtser.trainer.data import pad
from mtser.trainer.model import AttentiveStatsPooling, FusionModel, MeanPooling, count_parameters

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
