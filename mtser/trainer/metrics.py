"""The one implementation of the challenge metrics: macro-F1 over the 8 classes and CCC with population variance.

Metric dicts use the keys `f1`, `ccc_arousal`, `ccc_valence`, `ccc_dominance`, `ccc_mean` and `score`
(= f1 + ccc_mean). A key is left out when the labels it needs are absent (a split without class labels has no `f1`).

mtser's own metrics (used for selection): macro-F1 over all 8 classes, CCC over rows whose class is not X. Next to
them, labelled `challenge_*`, the challenge baseline's way: `challenge_f1` averages F1 over the classes present in
labels or predictions (sklearn's `f1_score(average="macro")` without `labels=`), `challenge_ccc_*` is the CCC over
every row with attribute labels, X included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mtser.featurestore.labels import ATTRIBUTES, CLASSES


@dataclass(frozen=True)
class LabelArrays:
    """Labels of N utterances: class index into CLASSES (-1: none, O or X) and attributes (NaN: unknown)."""

    classes: np.ndarray      # (N,) int64
    attributes: np.ndarray   # (N, 3) float32, order of ATTRIBUTES
    is_x: np.ndarray | None = None  # (N,) bool: class X (no agreement); None = no X row

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def scored_attributes(self) -> np.ndarray:
        """Attributes with X rows set to NaN: the targets mtser scores and selects on."""
        if self.is_x is None or not self.is_x.any():
            return self.attributes
        return np.where(self.is_x[:, None], np.float32(np.nan), self.attributes)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """8 × 8 counts, rows true class, columns predicted class (indices into CLASSES)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"confusion: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-d shapes")
    n = len(CLASSES)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    return confusion


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, over: str = "all") -> float:
    """Unweighted mean of per-class F1 (zero_division=0) over all 8 classes (`over="all"`, sklearn's
    labels=range(8)) or over the classes present in y_true or y_pred (`over="present"`, sklearn's default)."""
    confusion = confusion_matrix(y_true, y_pred)
    tp = np.diag(confusion)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denominator, out=np.zeros(len(CLASSES)), where=denominator > 0)
    if over == "present":
        present = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
        return float(f1[present].mean())
    return float(f1.mean())


def ccc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Concordance correlation 2·cov / (var_pred + var_true + (mean_pred - mean_true)²), population variances."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1 or len(t) == 0:
        raise ValueError(f"ccc: y_true {t.shape} and y_pred {p.shape} must be equal non-empty 1-d shapes")
    mean_t, mean_p = t.mean(), p.mean()
    covariance = np.mean((t - mean_t) * (p - mean_p))
    denominator = t.var() + p.var() + (mean_p - mean_t) ** 2
    return float(2 * covariance / denominator) if denominator > 0 else 0.0


def computable(labels: LabelArrays) -> set[str]:
    """The metric keys `summarize` gives for these labels when both predictions are present."""
    keys = {"f1", "challenge_f1"} if (labels.classes >= 0).any() else set()
    for prefix, targets in (("", labels.scored_attributes), ("challenge_", labels.attributes)):
        known = np.isfinite(targets).any(axis=0)
        keys |= {f"{prefix}ccc_{name}" for name, k in zip(ATTRIBUTES, known) if k}
        if known.all():
            keys.add(f"{prefix}ccc_mean")
    if {"f1", "ccc_mean"} <= keys:
        keys.add("score")
    return keys


def summarize(probs_or_logits: np.ndarray | None, attrs: np.ndarray | None, labels: LabelArrays) -> dict[str, float]:
    """Challenge metrics of predictions against labels; rows without a label are left out of that metric."""
    metrics: dict[str, float] = {}
    has_class = labels.classes >= 0
    if probs_or_logits is not None and has_class.any():
        predicted = np.asarray(probs_or_logits)[has_class].argmax(axis=1)
        metrics["f1"] = macro_f1(labels.classes[has_class], predicted)
        metrics["challenge_f1"] = macro_f1(labels.classes[has_class], predicted, over="present")
    if attrs is not None:
        for prefix, targets in (("", labels.scored_attributes), ("challenge_", labels.attributes)):
            values = []
            for i, name in enumerate(ATTRIBUTES):
                known = np.isfinite(targets[:, i])
                if known.any():
                    metrics[f"{prefix}ccc_{name}"] = ccc(targets[known, i], np.asarray(attrs)[known, i])
                    values.append(metrics[f"{prefix}ccc_{name}"])
            if len(values) == len(ATTRIBUTES):
                metrics[f"{prefix}ccc_mean"] = float(np.mean(values))
    if "f1" in metrics and "ccc_mean" in metrics:
        metrics["score"] = metrics["f1"] + metrics["ccc_mean"]
    return metrics
