"""The fusion network and its fused layers: each layer's member g is the ordinary torch module loaded into it
(forward and gradients), old checkpoints load unchanged, sizes from config, padding-invariant pooling, output
ranges. (The GEMM and moment kernels: test_native.py.)"""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtser.trainer.config import ModelConfig, load_config
from mtser.trainer.data import pad
from mtser.trainer.fused import FusedAttentivePooling, FusedLayerNorm, FusedLinear, FusedLSTM, MeanPooling
from mtser.trainer.model import FusionNetwork, count_parameters

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint-v1"
PAPER_DIMS = {"wavlm": 1024, "whisper": 1280, "roberta": 1024}  # WavLM-large, Whisper-large-v3, RoBERTa-large


@pytest.mark.parametrize("pooling, low, high", [("asp", 64e6, 68e6), ("mean", 60e6, 64e6)])
def test_paper_config_has_about_60m_parameters(pooling, low, high):
    cfg = load_config(CONFIGS / "paper.yaml", overrides={"model.pooling": pooling})
    with torch.device("meta"):  # sizes only, no memory
        model = FusionNetwork(PAPER_DIMS, cfg.model)
    lstm = sum(p.numel() for p in model.lstm.parameters())
    # LSTM: layer 1 4·2048·(1028 + 2048 + 2), layer 2 4·2048·(2048 + 2048 + 2)
    assert lstm == 4 * 2048 * (1028 + 2048 + 2) + 4 * 2048 * (2048 + 2048 + 2)
    assert low < count_parameters(model) < high
    assert model.head.weight.shape == (1, 11, 2048)
    assert model.branches["whisper"].project.weight.shape[-1] == (2 * 1280 if pooling == "asp" else 1280)


class OrdinaryASP(nn.Module):
    """The oracle: attentive statistics pooling of one model written with ordinary modules, straight from Okabe et
    al. 2018 (softmax over the real frames, attention-weighted mean and standard deviation)."""

    def __init__(self, dim: int, attention_dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(dim, attention_dim), nn.Tanh(),
                                       nn.Linear(attention_dim, 1, bias=False))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.attention(x).squeeze(-1).masked_fill(~mask, -torch.inf)
        weights = torch.softmax(scores, dim=1).nan_to_num()[..., None]       # an empty sequence: all zero
        mean = (weights * x).sum(1)
        return torch.cat([mean, ((weights * x * x).sum(1) - mean**2).clamp(min=1e-5).sqrt()], dim=-1)


def _frames() -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([7, 3, 1, 0])
    mask = torch.arange(7)[None] < lengths[:, None]
    return torch.randn(4, 7, 6) * mask[..., None], mask


LAYERS = {  # name: (fused layer of 3 members, ordinary module, input of one member or shared by all)
    "linear": (lambda: FusedLinear(3, 6, 5), lambda: nn.Linear(6, 5), lambda: torch.randn(4, 6)),
    "linear, no bias": (lambda: FusedLinear(3, 6, 1, bias=False), lambda: nn.Linear(6, 1, bias=False),
                        lambda: torch.randn(4, 6)),
    "layernorm": (lambda: FusedLayerNorm(3, 6), lambda: nn.LayerNorm(6), lambda: torch.randn(4, 6)),
    "lstm": (lambda: FusedLSTM(3, 6, 5, 2), lambda: nn.LSTM(6, 5, num_layers=2, batch_first=True),
             lambda: torch.randn(4, 3, 6)),
    "asp": (lambda: FusedAttentivePooling(3, 6, 4), lambda: OrdinaryASP(6, 4), _frames),
}


@pytest.mark.parametrize("layer, shared", [("linear", False), ("linear", True), ("linear, no bias", True),
                                           ("layernorm", False), ("lstm", False), ("asp", True)])
def test_a_fused_layers_member_is_the_ordinary_module_loaded_into_it(layer, shared):
    """Member g of a fused layer, loaded from an ordinary module by name, gives that module's outputs and its
    gradients (parameters, and the input where it has one), on an input of its own (G, ...) or on an input all
    members share (the linear layer's (N, in); the ASP pooling's frames (B, T, D), which need no gradient)."""
    make_fused, make_ordinary, make_input = LAYERS[layer]
    torch.manual_seed(0)
    fused, ordinary = make_fused(), [make_ordinary() for _ in range(3)]
    for g, module in enumerate(ordinary):
        for p in module.parameters():                           # not the default init: LayerNorm's is 1 and 0
            nn.init.normal_(p, std=0.5)
        fused.load_member(g, module)
    if layer == "asp":
        inputs = [make_input()] * 3
        out = fused(*inputs[0])
    else:
        inputs = [make_input().requires_grad_()] * 3 if shared else [make_input().requires_grad_() for _ in range(3)]
        out = fused(inputs[0] if shared else torch.stack(inputs))
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    for g, module in enumerate(ordinary):
        if layer == "asp":
            expected = module(*inputs[g])
        else:
            own = inputs[g].detach().requires_grad_()
            expected = module(own)[0] if layer == "lstm" else module(own)
        (expected * upstream[g]).sum().backward()
        torch.testing.assert_close(out[g], expected, rtol=1e-5, atol=1e-6)
        for name, p in module.named_parameters():
            torch.testing.assert_close(dict(fused.named_parameters())[name].grad[g], p.grad, rtol=1e-4, atol=1e-5)
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in fused.member_state(g).items())
        assert fused.member_state(g).keys() == module.state_dict().keys()
        if layer != "asp" and not shared:
            torch.testing.assert_close(inputs[g].grad, own.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["linear", "lstm"])
def test_a_lone_fused_layer_is_initialised_as_the_ordinary_module(layer):
    """A G = 1 layer built after a seed draws the ordinary module's initial weights (a model alone after
    `seed_everything` starts where the pre-fused model started)."""
    make_fused = {"linear": lambda: FusedLinear(1, 6, 5), "lstm": lambda: FusedLSTM(1, 6, 5, 2)}[layer]
    make_ordinary = {"linear": lambda: nn.Linear(6, 5), "lstm": lambda: nn.LSTM(6, 5, num_layers=2)}[layer]
    torch.manual_seed(3)
    fused = make_fused()
    torch.manual_seed(3)
    ordinary = make_ordinary()
    assert all(torch.equal(fused.member_state(0)[k], v) for k, v in ordinary.state_dict().items())


@pytest.mark.parametrize("name", ["asp", "mean"])
def test_checkpoints_written_before_the_fused_network_load_unchanged(name):
    """tests/fixtures/checkpoint-v1 (written by the pre-#23 `FusionModel`, make.py) loads into a network of one
    member that gives the outputs recorded then, and exporting that member writes the same weights again."""
    from safetensors.torch import load_file

    from mtser.trainer.checkpoint import load_checkpoint

    inputs = np.load(FIXTURE / "input.npz")
    features = {n: (torch.from_numpy(inputs[f"{n}_x"]), torch.from_numpy(inputs[f"{n}_mask"])) for n in "ab"}
    model, _, _ = load_checkpoint(FIXTURE / name)
    with torch.no_grad():
        logits, attributes = model(features)
    assert logits.shape == (1, 3, 8)
    np.testing.assert_allclose(logits[0].numpy(), np.load(FIXTURE / f"{name}-logits.npy"), rtol=0, atol=1e-6)
    np.testing.assert_allclose(attributes[0].numpy(), np.load(FIXTURE / f"{name}-attributes.npy"), rtol=0, atol=1e-6)
    stored = load_file(FIXTURE / name / "model.safetensors")
    exported = model.member_state(0)
    assert exported.keys() == stored.keys() and all(torch.equal(exported[k], v) for k, v in stored.items())


def test_members_stack_select_and_export_by_name():
    """A network of several members is its members side by side: stacking lone networks, selecting members and
    exporting member g all keep each member's outputs; a state of another architecture is refused by name."""
    cfg = ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6)
    torch.manual_seed(0)
    alone = [FusionNetwork({"a": 5, "b": 7}, cfg).eval() for _ in range(3)]
    feats = {"a": pad([torch.randn(4, 5).numpy(), torch.randn(2, 5).numpy()]),
             "b": pad([torch.randn(2, 7).numpy(), torch.randn(3, 7).numpy()])}
    with torch.no_grad():
        expected = [m(feats)[0][0] for m in alone]
        network = FusionNetwork.stack(alone).eval()
        torch.testing.assert_close(network(feats)[0], torch.stack(expected), rtol=1e-5, atol=1e-6)
        network.select([2, 0])
        assert network.size == 2
        torch.testing.assert_close(network(feats)[0], torch.stack([expected[2], expected[0]]), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, alone[2].member_state(0)[k]) for k, v in network.member_state(0).items())
    state = network.member_state(1)
    del state["head.bias"]
    with pytest.raises(RuntimeError, match=r"missing keys \['head.bias'\]"):
        network.load_member(0, state)
    with pytest.raises(ValueError, match="share encoders and model config"):
        FusionNetwork.stack([alone[0], FusionNetwork({"a": 5}, cfg)])


@pytest.mark.parametrize("pool", [FusedAttentivePooling(2, 6, 4), MeanPooling()])
def test_pooling_ignores_padding(pool):
    torch.manual_seed(0)
    short, long = torch.randn(3, 6), torch.randn(9, 6)
    alone = pool(*pad([short.numpy()]))
    x, mask = pad([short.numpy(), long.numpy()])
    x[0, 3:] = 1e3 * torch.randn(6, 6)  # garbage in the padding must not leak in
    padded = pool(x, mask)
    torch.testing.assert_close(padded[..., 0, :], alone[..., 0, :], rtol=1e-5, atol=1e-6)


def test_attentive_statistics_are_a_weighted_mean_and_std():
    pool = FusedAttentivePooling(1, 2, 3)
    torch.nn.init.zeros_(pool.attention[2].weight)  # equal scores -> uniform weights -> plain mean and std
    x = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [0.0, 0.0]]])
    out = pool(x, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(out, torch.tensor([[[2.0, 4.0, 1.0, 2.0]]]), rtol=1e-4, atol=1e-4)


def test_outputs_and_empty_sequences():
    model = FusionNetwork({"a": 5, "b": 7}, ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6), members=2)
    feats = {"a": pad([torch.randn(4, 5).numpy(), torch.zeros(0, 5).numpy()]),
             "b": pad([torch.randn(2, 7).numpy(), torch.randn(3, 7).numpy()])}
    logits, attrs = model.eval()(feats)
    assert logits.shape == (2, 2, 8) and attrs.shape == (2, 2, 3)
    assert torch.isfinite(logits).all() and ((attrs > 1) & (attrs < 7)).all()
    with pytest.raises(KeyError, match=r"\['b'\]"):
        model({"a": feats["a"]})


@pytest.mark.parametrize("members", [1, 2])
def test_outputs_leave_the_head_in_float32_under_autocast(members):
    """Under bfloat16 autocast the head and 1 + 6·sigmoid still run in float32: the outputs are float32 and equal a
    float32 head's on the same (bfloat16) head input, for a model alone and for several members."""
    torch.manual_seed(0)
    cfg = ModelConfig(attention_dim=4, proj_dim=8, lstm_hidden=6)
    feats = {"a": pad([torch.randn(4, 5).numpy(), torch.randn(6, 5).numpy()]),
             "b": pad([torch.randn(2, 7).numpy(), torch.randn(3, 7).numpy()])}
    model = FusionNetwork({"a": 5, "b": 7}, cfg, members=members)
    head_inputs = []                                        # the LSTM's last output (G, B, H)
    model.lstm.register_forward_hook(lambda module, args, out: head_inputs.append(out[:, :, -1]))
    weight, bias = model.head.weight, model.head.bias
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, attrs = model.eval()(feats)
    (last,) = head_inputs
    assert last.dtype == torch.bfloat16                     # the case at issue: autocast ran the rest in bfloat16
    assert logits.dtype == attrs.dtype == torch.float32
    with torch.no_grad():
        out = torch.stack([torch.nn.functional.linear(x, w, b) for x, w, b in zip(last.float(), weight, bias)])
    torch.testing.assert_close(logits, out[..., :8], rtol=0, atol=1e-6)
    torch.testing.assert_close(attrs, 1 + 6 * torch.sigmoid(out[..., 8:]), rtol=0, atol=1e-6)
