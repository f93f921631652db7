"""Evaluation metrics (issue 5) against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitforge.eval.metrics import classification_metrics, confused_pairs, format_metrics, normalize_rows, reliability

CLASSES = ["a", "b", "c"]
# Six images, two per class. Predictions: a->a, a->b (wrong), b->b, b->b, c->c, c->b (wrong).
# Each top-1 confidence falls in its own 1/15-wide bin, so the ECE is the mean |correct - confidence|.
PROBS = torch.tensor([
    [0.70, 0.20, 0.10],
    [0.25, 0.50, 0.25],
    [0.05, 0.85, 0.10],
    [0.05, 0.90, 0.05],
    [0.10, 0.25, 0.65],
    [0.10, 0.55, 0.35],
])
LABELS = torch.tensor([0, 0, 1, 1, 2, 2])


@pytest.fixture(scope="module")
def m() -> dict:
    return classification_metrics(PROBS, LABELS, CLASSES)


def test_headline_numbers(m):
    assert m["n"] == 6
    assert m["top1"] == pytest.approx(100 * 4 / 6)
    assert m["top5"] is None  # 3 classes: a top-5 would cover every class (100% by construction), so none is given
    nll = -sum(math.log(p) for p in (0.70, 0.25, 0.85, 0.90, 0.65, 0.35)) / 6
    assert m["loss"] == pytest.approx(nll, rel=1e-5)
    assert m["per_class_top1"] == pytest.approx({"a": 50.0, "b": 100.0, "c": 50.0})


def test_per_class_table_and_averages(m):
    # precision = right / predicted as the class; recall = right / images of the class
    expect = {"a": (1.0, 0.5), "b": (2 / 4, 1.0), "c": (1.0, 0.5)}
    for name, (p, r) in expect.items():
        row = m["per_class"][name]
        assert row["precision"] == pytest.approx(p)
        assert row["recall"] == pytest.approx(r)
        assert row["f1"] == pytest.approx(2 * p * r / (p + r))
        assert row["support"] == 2
    assert m["macro_avg"]["precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["macro_avg"]["recall"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["macro_avg"]["f1"] == pytest.approx(2 / 3)
    assert m["weighted_avg"]["support"] == 6


def test_weighted_average_differs_from_macro_with_unequal_support():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]])
    out = classification_metrics(probs, torch.tensor([0, 0, 0, 0]), ["x", "y"])
    # x: P 1, R 3/4, F1 6/7, support 4; y: P 0 (one false positive), R 0, support 0
    assert out["macro_avg"]["f1"] == pytest.approx((6 / 7 + 0) / 2)
    assert out["weighted_avg"]["f1"] == pytest.approx(6 / 7)
    assert out["per_class_top1"]["y"] is None  # no images of y


def test_macro_average_skips_classes_absent_from_truth_and_predictions():
    """Evaluating on a subset that holds 2 of 4 classes: the unseen, never-predicted classes do not add zeros."""
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1]])
    out = classification_metrics(probs, torch.tensor([0, 1, 1]), ["a", "b", "c", "d"])
    assert out["macro_avg"]["recall"] == pytest.approx((1 + 0.5) / 2)  # not (1 + 0.5 + 0 + 0) / 4
    assert out["per_class"]["c"]["support"] == 0 and len(out["per_class"]) == 4  # the table still lists every class


def test_confusion_counts_and_normalised(m):
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert np.allclose(m["confusion_normalized"], [[0.5, 0.5, 0], [0, 1, 0], [0, 0.5, 0.5]])
    cm = np.array([[0, 0], [3, 1]])
    assert normalize_rows(cm).tolist() == [[0, 0], [0.75, 0.25]]  # an empty row stays zero


def test_ece_and_reliability_bins(m):
    assert m["ece"] == pytest.approx((0.30 + 0.50 + 0.15 + 0.10 + 0.35 + 0.55) / 6)
    rel = m["reliability"]
    assert len(rel["edges"]) == 16 and sum(rel["count"]) == 6
    assert rel["count"][10] == 1 and rel["confidence"][10] == pytest.approx(0.70) and rel["accuracy"][10] == 1.0
    assert rel["count"][7] == 1 and rel["accuracy"][7] == 0.0  # the wrong 0.50
    assert rel["confidence"][0] is None  # empty bin


def test_reliability_bin_edges():
    rel = reliability(np.array([0.0, 0.5, 1.0, 1.0]), np.array([0, 1, 1, 0]), n_bins=2)
    assert rel["count"] == [2, 2]  # 0 joins the first bin; 0.5 is the first bin's closed upper edge
    assert rel["accuracy"] == [0.5, 0.5]
    assert rel["confidence"] == [0.25, 1.0]


def test_confused_pairs(m):
    assert m["confused_pairs"] == [{"true": "a", "pred": "b", "count": 1, "rate": 0.5},
                                   {"true": "c", "pred": "b", "count": 1, "rate": 0.5}]
    cm = np.array([[5, 0, 7], [2, 9, 0], [0, 3, 1]])
    pairs = confused_pairs(cm, ["x", "y", "z"], top=2)
    assert [(p["true"], p["pred"], p["count"]) for p in pairs] == [("x", "z", 7), ("z", "y", 3)]
    assert pairs[0]["rate"] == pytest.approx(7 / 12)


def test_loss_from_softmax_equals_cross_entropy_on_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g) * 3
    labels = torch.randint(0, 7, (50,), generator=g)
    out = classification_metrics(logits.softmax(1), labels, [str(i) for i in range(7)])
    assert out["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert out["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item() * 100)


@pytest.mark.parametrize("k", [2, 3, 5, 6, 7])
def test_top5_only_when_there_are_more_than_5_classes(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(40, k, generator=g)
    labels = torch.randint(0, k, (40,), generator=g)
    out = classification_metrics(logits.softmax(1), labels, [str(i) for i in range(k)])
    text = format_metrics(out, title="t")
    if k <= 5:
        assert out["top5"] is None and "top-5" not in text
    else:
        top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean().item() * 100
        assert out["top5"] == pytest.approx(top5) and out["top5"] < 100 and f"top-5 {top5:.2f}%" in text


def test_unlabeled_items_are_ignored():
    probs = torch.cat([PROBS, torch.tensor([[0.0, 0.0, 1.0]])])
    out = classification_metrics(probs, torch.cat([LABELS, torch.tensor([-1])]), CLASSES)
    assert out["n"] == 6 and out["confusion"] == [[1, 1, 0], [0, 2, 0], [0, 1, 1]]
    assert classification_metrics(PROBS, torch.full((6,), -1), CLASSES) == {"n": 0}


def test_json_serialisable_and_printable(m):
    import json

    again = json.loads(json.dumps(m))
    assert again["confusion"] == m["confusion"]
    text = format_metrics(m, title="model on data")
    assert "top-1 66.67%" in text and "macro avg" in text and "a->b 1" in text and "top-5" not in text
