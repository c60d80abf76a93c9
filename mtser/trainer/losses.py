"""Training losses: class-weighted CE, MSE, Gaussian-penalty MSE, and the per-task combination.

Rows without a target are masked out: class target -1 (O, X or unlabelled), attribute target NaN. A batch with no
target for a term contributes 0 to that term (still connected to the graph).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mtser.configio import ConfigError
from mtser.errors import DataError
from mtser.featurestore.labels import CLASSES
from mtser.trainer.config import LossConfig

Task = Literal["multi", "cat", "dim"]


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ w_y·(−log p_y) / Σ w_y over rows with target >= 0 (plain CE when weight is None)."""
    valid = target >= 0
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), target[valid], weight=weight)


def masked_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of (y − ŷ)² over the entries whose target is finite."""
    return gaussian_penalty_mse(pred, target, sigma=None)


def gaussian_penalty_mse(pred: torch.Tensor, target: torch.Tensor, sigma: float | None, mu: float = 4.0,
                         weight_grad: bool = True) -> torch.Tensor:
    """mean(w·(y−ŷ)²) with w = exp(−(ŷ−μ)²/(2σ²)) over finite targets; plain MSE when sigma is None.

    weight_grad: the gradient flows through w as well (the formula differentiated as written,
    ∂/∂ŷ = w·(−2(y−ŷ) − (y−ŷ)²(ŷ−μ)/σ²) per entry); False: w is detached (∂/∂ŷ = −2w·(y−ŷ))."""
    valid = torch.isfinite(target)
    if not valid.any():
        return pred.sum() * 0.0
    p = pred[valid].float()
    squared_error = (target[valid].float() - p) ** 2
    if sigma is None:
        return squared_error.mean()
    weight = torch.exp(-((p - mu) ** 2) / (2 * sigma**2))
    return ((weight if weight_grad else weight.detach()) * squared_error).mean()


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """Inverse training frequency N / (K·n_c), normalised so a balanced set gives all ones (unseen classes: 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        raise DataError("class weights: no training utterance has one of the 8 class labels")
    return np.divide(total, len(counts) * counts, out=np.zeros_like(counts), where=counts > 0).astype(np.float32)


MISS_FLOOR = 0.05


def class_weights_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Weights that penalise the classes a model misclassifies most (the paper's third Task-1 fine-tuning).

    From a confusion matrix (rows true, columns predicted, 8 × 8): each class's miss rate m_c = 1 − recall_c,
    floored at MISS_FLOOR so a class recalled perfectly keeps some weight; a class absent from the rows gets the
    mean miss rate of the present ones. w_c = m_c / mean(m), so the weights average 1 over the 8 classes.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.shape != (len(CLASSES), len(CLASSES)):
        raise ValueError(f"confusion matrix: expected shape (8, 8), got {confusion.shape}")
    support = confusion.sum(axis=1)
    if not (support > 0).any():
        raise ValueError("class weights: the confusion matrix has no labelled row")
    recall = np.divide(np.diag(confusion), support, out=np.zeros(len(CLASSES)), where=support > 0)
    miss = np.maximum(1.0 - recall, MISS_FLOOR)
    miss[support == 0] = miss[support > 0].mean()
    return (miss / miss.mean()).astype(np.float32)


@dataclass
class RecipeLoss:
    """The loss of one training stage.

    multi: α·MSE(attributes) + β·weighted CE (stage 1); cat: CE, weighted when `class_weight` is set; dim:
    Gaussian-penalty MSE (plain MSE when σ is None; `penalty_weight_grad`: see `gaussian_penalty_mse`).
    """

    task: Task
    alpha: float = 1.0
    beta: float = 1.0
    class_weight: torch.Tensor | None = None
    sigma: float | None = None
    sigma_mu: float = 4.0
    penalty_weight_grad: bool = True

    def __call__(self, logits: torch.Tensor, attrs: torch.Tensor, classes: torch.Tensor,
                 attributes: torch.Tensor) -> torch.Tensor:
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)
        if self.task == "cat":
            return weighted_cross_entropy(logits, classes, weight)
        if self.task == "dim":
            return gaussian_penalty_mse(attrs, attributes, self.sigma, self.sigma_mu, self.penalty_weight_grad)
        return self.alpha * masked_mse(attrs, attributes) + self.beta * weighted_cross_entropy(logits, classes, weight)


def build_loss(task: Task, cfg: LossConfig, class_counts: np.ndarray, confusion: np.ndarray | None = None
               ) -> RecipeLoss:
    """The stage's loss from config. class_weights: `auto` = inverse training frequency (`class_counts`) for
    multi-task and plain CE for cat; `confusion` = from `confusion` (the parent's, stage 2); a list = those."""
    weight = None
    if task != "dim":
        if cfg.class_weights == "auto" and task == "multi":
            weight = torch.from_numpy(class_weights_from_counts(class_counts))
        elif cfg.class_weights == "confusion":
            if confusion is None:
                raise ConfigError("loss.class_weights: confusion needs a parent model (stage-2 fine-tuning)")
            weight = torch.from_numpy(class_weights_from_confusion(confusion))
        elif isinstance(cfg.class_weights, list):  # Config validates 8 non-negative values
            weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
    return RecipeLoss(task, cfg.alpha, cfg.beta, weight, cfg.sigma, cfg.sigma_mu, cfg.penalty_weight_grad)
