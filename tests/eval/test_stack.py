"""Stacking and validation-derived ensemble weights on synthetic out-of-fold predictions: the meta-learner never
scores a row it was fitted on (a leak would show as a visibly higher score), and the weight rule's numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

import vitforge.eval.stack as S
from vitforge.errors import VitforgeError
from vitforge.eval.members import log_loss, weights_from_losses


def oof_set(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> S.OOFSet:
    m, n, k = probs.shape
    return S.OOFSet([f"cv{i}" for i in range(m)], [f"img{i}.png" for i in range(n)], folds, labels, probs,
                    [f"c{j}" for j in range(k)])


def noise(m: int, n: int, k: int, folds: int, seed: int = 0) -> S.OOFSet:
    """M members whose probabilities carry no information about random labels."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), size=(m, n))
    labels = rng.integers(0, k, n)
    return oof_set(probs, labels, np.arange(n) % folds)


def test_each_fold_meta_model_is_fitted_on_the_other_folds_only():
    oof = noise(3, 40, 3, folds=4)
    _, fit_rows = S.nested_stacking(oof)
    assert sorted(fit_rows) == [0, 1, 2, 3]
    for k, rows in fit_rows.items():
        np.testing.assert_array_equal(rows, np.flatnonzero(oof.folds != k))
        assert not set(rows.tolist()) & set(np.flatnonzero(oof.folds == k).tolist())


def test_sklearn_never_sees_the_rows_it_scores(monkeypatch):
    """Spy on the LogisticRegression objects: which rows went into fit() and which into predict_proba()."""
    oof = noise(2, 30, 2, folds=3)
    x = S.features(oof.probs)
    row_of = {tuple(np.round(r, 9)): i for i, r in enumerate(x)}
    assert len(row_of) == 30  # every row is recognisable by its features
    calls = []

    class Spy(S.LogisticRegression):
        def fit(self, X, y, **kw):
            calls.append(("fit", id(self), {row_of[tuple(np.round(r, 9))] for r in X}))
            return super().fit(X, y, **kw)

        def predict_proba(self, X):
            calls.append(("predict", id(self), {row_of[tuple(np.round(r, 9))] for r in X}))
            return super().predict_proba(X)

    monkeypatch.setattr(S, "LogisticRegression", Spy)
    S.compare(oof)
    fitted = {obj: rows for kind, obj, rows in calls if kind == "fit"}
    scored = [(obj, rows) for kind, obj, rows in calls if kind == "predict"]
    assert len(fitted) == 3 and len(scored) == 3
    assert set().union(*(rows for _, rows in scored)) == set(range(30))  # every row scored once
    for obj, rows in scored:
        assert not fitted[obj] & rows and len(fitted[obj]) + len(rows) == 30


def test_a_leaky_protocol_would_look_much_better_on_noise():
    """60 noise members, 80 rows: a stacker fitted and scored on the same rows 'learns' the labels; the nested
    out-of-fold score that `compare` reports stays near chance."""
    oof = noise(60, 80, 2, folds=4, seed=1)
    leaky = S.MetaLearner(2, C=1e4).fit(oof.probs, oof.labels).predict_proba(oof.probs)
    leaky_acc = (leaky.argmax(1) == oof.labels).mean() * 100
    honest = S.compare(oof, C=1e4)["methods"]["stack"]
    assert leaky_acc >= 95
    assert honest["accuracy"] <= 65
    assert honest["log_loss"] > math.log(2)  # no better than a coin on held-out rows


def _two_members(n: int = 120, seed: int = 0) -> S.OOFSet:
    """Member 0: right about 85% of the time. Member 1: the same quality, but its class names are rotated (a model
    trained with the labels permuted); averaging the two cancels out, a stacker can undo the rotation."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)

    def member():
        pred = np.where(rng.random(n) < 0.85, labels, (labels + rng.integers(1, 3, n)) % 3)
        p = np.full((n, 3), 0.1)
        p[np.arange(n), pred] = 0.8
        return p
    good, swapped = member(), member()[:, [1, 2, 0]]  # member 1 reports class c+1's probability as class c's
    return oof_set(np.stack([good, swapped]), labels, np.arange(n) % 5)


def test_stacking_learns_what_averaging_cannot():
    oof = _two_members()
    c = S.compare(oof)
    mean, weighted, stack = (c["methods"][k] for k in ("mean", "weighted", "stack"))
    assert c["members"][0]["accuracy"] > 70 and c["members"][1]["accuracy"] < 25
    assert stack["accuracy"] > 75 and stack["accuracy"] > mean["accuracy"] + 30
    assert stack["log_loss"] < weighted["log_loss"] < mean["log_loss"]
    # the weighted rule puts more weight on the member with the lower out-of-fold log-loss
    assert c["weights"][0] > c["weights"][1]
    text = S.format_comparison(c)
    assert "mean of members" in text and "weighted mean (--weights auto)" in text and "stacking (logistic" in text


def test_combine_uses_all_oof_rows_and_each_rule():
    oof = _two_members()
    test = oof.probs[:, :7]
    np.testing.assert_allclose(S.combine("mean", oof, test), test.mean(0))
    w = weights_from_losses([log_loss(p, oof.labels, S.CSV_FLOOR) for p in oof.probs])
    np.testing.assert_allclose(S.combine("weighted", oof, test), w[0] * test[0] + w[1] * test[1])
    stacked = S.combine("stack", oof, test)
    expect = S.MetaLearner(3).fit(oof.probs, oof.labels).predict_proba(test)
    np.testing.assert_allclose(stacked, expect)
    np.testing.assert_allclose(stacked.sum(1), 1, atol=1e-9)
    with pytest.raises(VitforgeError, match="--method: must be one of stack, weighted, mean"):
        S.combine("vote", oof, test)


def test_logit_features_reproduce_a_member():
    """Centred log-probabilities are the member's logits up to a constant: softmax gives the member back."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(1, 5))
    x = S.features(p, "logits")
    back = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    np.testing.assert_allclose(back, p[0], rtol=1e-9)
    np.testing.assert_allclose(S.features(p, "probs"), p[0])
    with pytest.raises(VitforgeError, match="--features: must be one of logits, probs"):
        S.features(p, "ranks")


def test_weights_from_held_out_log_loss():
    w = weights_from_losses([0.1, 0.3, math.log(2)])
    e = [math.exp(-0.1), math.exp(-0.3), 0.5]
    assert w == pytest.approx([v / sum(e) for v in e])
    assert weights_from_losses([5000.0, 5001.0]) == pytest.approx([1 / (1 + math.exp(-1)), 1 - 1 / (1 + math.exp(-1))])
    # exp(-log-loss) is the geometric mean of the probability given to the true class
    probs, labels = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5]]), np.array([0, 1, 0])
    assert math.exp(-log_loss(probs, labels)) == pytest.approx((0.9 * 0.6 * 0.5) ** (1 / 3))
