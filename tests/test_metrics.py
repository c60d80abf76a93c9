"""Macro-F1 and CCC: the one implementation agrees with sklearn and with the textbook formulas."""
import numpy as np
import pytest
from sklearn.metrics import f1_score

from mtser.trainer.metrics import LabelArrays, ccc, computable, macro_f1, summarize


def numpy_ccc(t: np.ndarray, p: np.ndarray) -> float:
    cov = np.cov(t, p, bias=True)[0, 1]
    return 2 * cov / (np.var(t) + np.var(p) + (t.mean() - p.mean()) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn_over_all_eight_classes(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 8, 200)
    y_pred = np.where(rng.random(200) < 0.4, y_true, rng.integers(0, 6, 200))  # classes 6, 7 rarely predicted
    expected = f1_score(y_true, y_pred, labels=list(range(8)), average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)


def test_macro_f1_counts_absent_classes_as_zero():
    # Two classes present and perfectly predicted: the 6 absent classes score 0, so F1 = 2/8 (not 1 as sklearn's
    # default over present labels would give).
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 0, 1])) == pytest.approx(0.25)
    assert f1_score([0, 0, 1], [0, 0, 1], average="macro") == 1.0


def test_macro_f1_hand_computed():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 1, fp 0, fn 1 -> 2/3; class 2: tp 0, fp 1, fn 0 -> 0
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 0])
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 2 / 3) / 8)


@pytest.mark.parametrize("seed", [0, 1])
def test_ccc_matches_numpy_formula_with_population_variance(seed):
    rng = np.random.default_rng(seed)
    t = rng.uniform(1, 7, 300)
    p = 0.6 * t + rng.normal(0.5, 0.8, 300)
    assert ccc(t, p) == pytest.approx(numpy_ccc(t, p), abs=1e-12)
    # the sample-variance (ddof=1) variant differs, so the test tells them apart
    sample = 2 * np.cov(t, p)[0, 1] / (np.var(t, ddof=1) + np.var(p, ddof=1) + (t.mean() - p.mean()) ** 2)
    assert abs(ccc(t, p) - sample) > 1e-4


def test_ccc_hand_computed_and_edge_cases():
    # t = [1, 2, 3], p = [2, 3, 4]: var 2/3 each, cov 2/3, mean shift 1 -> 2·(2/3) / (4/3 + 1) = 4/7
    assert ccc(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(4 / 7)
    assert ccc(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == pytest.approx(1.0)
    assert ccc(np.array([1.0, 2, 3]), np.array([2.0, 2, 2])) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        ccc(np.array([]), np.array([]))


def test_summarize_skips_unlabelled_rows_and_adds_score():
    classes = np.array([0, 1, -1, 2])
    attributes = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5], [np.nan, np.nan, np.nan]], dtype=np.float32)
    probs = np.eye(8)[[0, 1, 5, 3]]
    attrs = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5], [9, 9, 9]], dtype=np.float32)
    m = summarize(probs, attrs, LabelArrays(classes, attributes))
    assert m["f1"] == pytest.approx(macro_f1(np.array([0, 1, 2]), np.array([0, 1, 3])))
    assert m["ccc_arousal"] == m["ccc_valence"] == m["ccc_dominance"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx(m["f1"] + m["ccc_mean"])
    assert set(m) == computable(LabelArrays(classes, attributes))
    no_classes = LabelArrays(np.full(4, -1), attributes)
    attribute_keys = {f"{prefix}ccc_{name}" for prefix in ("", "challenge_")
                      for name in ("arousal", "valence", "dominance", "mean")}
    assert set(summarize(probs, attrs, no_classes)) == computable(no_classes) == attribute_keys
    only_attrs = summarize(None, attrs, LabelArrays(classes, attributes))
    assert "f1" not in only_attrs and "score" not in only_attrs and only_attrs["ccc_mean"] == pytest.approx(1.0)


def test_challenge_f1_averages_over_the_classes_present():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    y_true = rng.choice([0, 1, 2, 7], 200)        # four of the eight classes occur
    y_pred = rng.choice([0, 1, 2, 4, 7], 200)     # and one more is predicted
    assert macro_f1(y_true, y_pred, over="present") == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=range(8),
                                                              zero_division=0))
    assert macro_f1(y_true, y_pred, over="present") > macro_f1(y_true, y_pred)


def test_challenge_ccc_counts_x_rows_and_ours_does_not():
    t = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5], [6, 6, 6]], dtype=np.float32)
    p = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5], [2, 2, 2]], dtype=np.float32)
    labels = LabelArrays(np.array([0, 1, 2, -1]), t, is_x=np.array([False, False, False, True]))
    m = summarize(None, p, labels)
    assert m["ccc_arousal"] == pytest.approx(1.0)                       # X row left out
    assert m["challenge_ccc_arousal"] == pytest.approx(ccc(t[:, 0], p[:, 0]))  # X row counted
    assert m["challenge_ccc_mean"] < 0.9
