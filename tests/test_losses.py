"""Losses against hand-computed values, with masking of missing targets."""
import math

import numpy as np
import pytest
import torch

from mtser.configio import ConfigError
from mtser.trainer.config import LossConfig
from mtser.trainer.losses import (build_loss, class_weights_from_counts, gaussian_penalty_mse, masked_mse,
                                  weighted_cross_entropy)

NAN = float("nan")


def test_weighted_cross_entropy_hand_computed():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [5.0, 1.0]])
    target = torch.tensor([0, 1, -1])            # the last row (O / X) has no class target
    weight = torch.tensor([1.0, 3.0])
    # row 0: p(0) = 3/4 -> nll log(4/3), weight 1; row 1: p(1) = 1/2 -> nll log 2, weight 3
    expected = (math.log(4 / 3) + 3 * math.log(2)) / (1 + 3)
    assert weighted_cross_entropy(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)
    assert weighted_cross_entropy(logits, target).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2, rel=1e-6)


def test_mse_ignores_unknown_attributes():
    pred = torch.tensor([[2.0, 3.0, 4.0], [1.0, 1.0, 1.0]])
    target = torch.tensor([[3.0, NAN, 4.0], [NAN, NAN, 4.0]])
    assert masked_mse(pred, target).item() == pytest.approx((1 + 0 + 9) / 3)


def test_gaussian_penalty_mse_hand_computed():
    pred = torch.tensor([[4.0, 6.0]])
    target = torch.tensor([[5.0, 3.0]])
    sigma = 2.0
    # ŷ = 4 at μ: weight 1, error 1; ŷ = 6: weight exp(-4/8), error 9
    expected = (1.0 + math.exp(-0.5) * 9.0) / 2
    assert gaussian_penalty_mse(pred, target, sigma).item() == pytest.approx(expected, rel=1e-6)
    assert gaussian_penalty_mse(pred, target, None).item() == pytest.approx(5.0)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_gaussian_penalty_gradient_hand_computed(weight_grad):
    """∂L/∂ŷ of L = mean(w·(y−ŷ)²), w = exp(−(ŷ−μ)²/(2σ²)), over the N finite targets: through w as well,
    (w/N)·(−2(y−ŷ) − (y−ŷ)²(ŷ−μ)/σ²); with w detached, (w/N)·(−2(y−ŷ)); 0 where the target is unknown."""
    sigma, mu = 2.0, 4.0
    pred_values = [[4.5, 6.0, 2.0], [3.0, 1.5, 5.0]]
    target_values = [[5.0, 3.0, NAN], [6.5, NAN, 2.0]]
    pred = torch.tensor(pred_values, requires_grad=True)
    loss = gaussian_penalty_mse(pred, torch.tensor(target_values), sigma, mu, weight_grad=weight_grad)
    loss.backward()
    n = 4
    expected = np.zeros((2, 3))
    value = 0.0
    for i in range(2):
        for j in range(3):
            p, y = pred_values[i][j], target_values[i][j]
            if math.isnan(y):
                continue
            w = math.exp(-((p - mu) ** 2) / (2 * sigma**2))
            value += w * (y - p) ** 2 / n
            through = -((y - p) ** 2) * (p - mu) / sigma**2 if weight_grad else 0.0
            expected[i, j] = w / n * (-2 * (y - p) + through)
    assert loss.item() == pytest.approx(value, rel=1e-6)          # the value does not depend on the choice
    np.testing.assert_allclose(pred.grad.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_recipe_loss_takes_the_penalty_gradient_from_config():
    pred = torch.tensor([[6.0, 4.0, 4.0]], requires_grad=True)
    target = torch.tensor([[3.0, 4.0, 4.0]])
    grads = {}
    for flag in (True, False):
        loss = build_loss("dim", LossConfig(sigma=2.0, penalty_weight_grad=flag), np.ones(8))
        assert loss.penalty_weight_grad is flag
        (grads[flag],) = torch.autograd.grad(loss(torch.zeros(1, 8), pred, torch.tensor([-1]), target), pred)
    w = math.exp(-0.5)              # ŷ = 6, y = 3, σ = 2: −2(y−ŷ) = 6 and −(y−ŷ)²(ŷ−μ)/σ² = −4.5, over N = 3
    assert grads[True][0, 0].item() == pytest.approx(w * (6 - 4.5) / 3, rel=1e-6)
    assert grads[False][0, 0].item() == pytest.approx(w * 6 / 3, rel=1e-6)


def test_class_weights_are_inverse_frequency():
    w = class_weights_from_counts(np.array([10, 30, 0, 0, 0, 0, 0, 40]))
    # N / (8 n_c): 80 / 80, 80 / 240, 80 / 320; unseen classes get 0
    np.testing.assert_allclose(w, [1.0, 1 / 3, 0, 0, 0, 0, 0, 0.25], rtol=1e-6)
    with pytest.raises(ValueError, match="no training utterance"):
        class_weights_from_counts(np.zeros(8))


def test_stage_losses_combine_as_the_recipe_says():
    torch.manual_seed(0)
    logits, attrs = torch.randn(4, 8), 1 + 6 * torch.rand(4, 3)
    classes = torch.tensor([0, 3, -1, 7])
    attributes = torch.tensor([[2.0, 3, 4], [5, 5, 5], [1, 7, 4], [NAN, NAN, NAN]])
    counts = np.array([1, 1, 1, 2, 1, 1, 1, 1])
    weight = torch.from_numpy(class_weights_from_counts(counts))
    multi = build_loss("multi", LossConfig(alpha=0.25, beta=0.75), counts)
    expected = 0.25 * masked_mse(attrs, attributes) + 0.75 * weighted_cross_entropy(logits, classes, weight)
    assert multi(logits, attrs, classes, attributes).item() == pytest.approx(expected.item(), rel=1e-6)
    cat = build_loss("cat", LossConfig(alpha=0.25, beta=0.75), counts)  # stage 2: plain CE, weights ignored
    assert cat(logits, attrs, classes, attributes).item() == pytest.approx(
        weighted_cross_entropy(logits, classes).item(), rel=1e-6)
    dim = build_loss("dim", LossConfig(sigma=5.0), counts)
    assert dim(logits, attrs, classes, attributes).item() == pytest.approx(
        gaussian_penalty_mse(attrs, attributes, 5.0).item(), rel=1e-6)
    fixed = build_loss("multi", LossConfig(class_weights=[2.0] * 8), counts)
    assert torch.equal(fixed.class_weight, torch.full((8,), 2.0))
    assert build_loss("multi", LossConfig(class_weights="none"), counts).class_weight is None


def test_batch_without_targets_contributes_zero_and_keeps_the_graph():
    logits = torch.randn(2, 8, requires_grad=True)
    attrs = torch.full((2, 3), 4.0, requires_grad=True)
    loss = build_loss("multi", LossConfig(), np.ones(8))(logits, attrs, torch.tensor([-1, -1]), torch.full((2, 3), NAN))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_confusion_weights_follow_the_miss_rate():
    from mtser.trainer.losses import MISS_FLOOR, class_weights_from_confusion

    confusion = np.zeros((8, 8))
    confusion[0, 0], confusion[0, 7] = 8, 2        # A: recall 0.8 -> miss 0.2
    confusion[1, 1], confusion[1, 2] = 2, 8        # S: recall 0.2 -> miss 0.8
    confusion[2, 2] = 10                           # H: recall 1.0 -> miss floored at 0.05
    for c in range(3, 8):                          # U..N: recall 0.5 -> miss 0.5
        confusion[c, c], confusion[c, 0] = 5, 5
    confusion[6] = 0                               # C absent: the mean miss rate of the present classes
    miss = np.array([0.2, 0.8, MISS_FLOOR, 0.5, 0.5, 0.5, 0.0, 0.5])
    miss[6] = np.delete(miss, 6).mean()
    w = class_weights_from_confusion(confusion)
    np.testing.assert_allclose(w, miss / miss.mean(), rtol=1e-6)
    assert w.mean() == pytest.approx(1.0) and w[1] > w[0] > w[2]
    with pytest.raises(ValueError, match="shape"):
        class_weights_from_confusion(np.zeros((3, 3)))


def test_confusion_weights_reach_the_cat_loss():
    counts = np.array([10] * 8)
    confusion = np.eye(8) * 5 + 1
    loss = build_loss("cat", LossConfig(class_weights="confusion"), counts, confusion)
    assert loss.class_weight is not None and torch.allclose(loss.class_weight.mean(), torch.tensor(1.0))
    assert build_loss("cat", LossConfig(class_weights="auto"), counts).class_weight is None   # plain CE
    with pytest.raises(ConfigError, match="confusion needs a parent"):
        build_loss("cat", LossConfig(class_weights="confusion"), counts)
