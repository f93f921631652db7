"""Report figures: each returns a valid PNG of the stated size, and the figure holds the expected axes, titles,
labels and data (the Figure is captured on its way to `to_png`)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib.colors import to_hex
from PIL import Image

from vitforge.eval import figures


@pytest.fixture
def captured(monkeypatch) -> list:
    figs: list = []
    real = figures.to_png

    def keep(fig):
        figs.append(fig)
        return real(fig)

    monkeypatch.setattr(figures, "to_png", keep)
    return figs


def png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(data))
    img.load()  # decodes the whole stream: a truncated file fails here
    assert img.format == "PNG"
    return img


def test_training_curves(captured):
    metrics = [{"epoch": 0, "train_loss": 2.0, "val_loss": 1.5, "val_top1": 40.0, "val_top5": 90.0, "lr": 1e-3},
               {"epoch": 1, "train_loss": 1.0, "val_loss": None, "val_top1": 60.0, "val_top5": 95.0, "lr": 5e-4},
               {"epoch": 2, "train_loss": 0.5, "lr": 1e-4}]
    assert png(figures.training_curves(metrics)).size == (1300, 360)
    (fig,) = captured
    loss, acc, lr = fig.axes
    assert [a.get_title() for a in fig.axes] == ["loss", "accuracy (%)", "learning rate (end of epoch)"]
    assert all(a.get_xlabel() == "epoch" for a in fig.axes)
    train, val = loss.get_lines()
    assert list(train.get_xdata()) == [1, 2, 3] and list(train.get_ydata()) == [2.0, 1.0, 0.5]
    assert list(val.get_xdata()) == [1] and list(val.get_ydata()) == [1.5]  # None and missing values skipped
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train", "validation"]
    assert [t.get_text() for t in acc.get_legend().get_texts()] == ["val top-1", "val top-5"]
    assert list(lr.get_lines()[0].get_ydata()) == [1e-3, 5e-4, 1e-4] and lr.get_legend() is None


@pytest.mark.parametrize("normalized", [False, True])
def test_confusion_matrix(captured, normalized):
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 4]], dtype=float)
    if normalized:
        cm = cm / cm.sum(1, keepdims=True)
    img = png(figures.confusion(cm, ["cat", "dog", "fox"], normalized=normalized))
    assert img.size == (620, 500)  # side 5.0 (+1.2 for the colour bar) at 100 dpi
    ax = captured[0].axes[0]
    assert ax.get_title() == ("confusion matrix (row-normalised)" if normalized else "confusion matrix (counts)")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "fox"]
    assert np.array_equal(ax.get_images()[0].get_array(), cm)
    texts = [t.get_text() for t in ax.texts]
    assert texts == ([f"{v:.2f}" for v in cm.ravel()] if normalized else [str(int(v)) for v in cm.ravel()])


def test_confusion_matrix_drops_numbers_then_names_for_many_classes(captured):
    figures.confusion(np.eye(25), [f"c{i}" for i in range(25)], normalized=False)
    figures.confusion(np.eye(61), [f"c{i}" for i in range(61)], normalized=False)
    few_names, no_names = (f.axes[0] for f in captured)
    assert len(few_names.texts) == 0 and [t.get_text() for t in few_names.get_xticklabels()][-1] == "c24"
    assert {t.get_text() for t in no_names.get_xticklabels()} == {""}


def test_per_class_accuracy(captured):
    png(figures.per_class_accuracy(["a", "b", "c"], [90.0, None, 70.0], 80.0))
    ax = captured[0].axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == [90.0, 0.0, 70.0]  # a class without images draws as 0
    assert [to_hex(b.get_facecolor()) for b in bars] == [figures.ACCENT, figures.BAD_COLOUR, figures.BAD_COLOUR]
    assert ax.get_title() == "per-class accuracy (recall); red = below overall"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["overall 80.00%"]


def test_per_class_accuracy_is_horizontal_for_many_classes(captured):
    png(figures.per_class_accuracy([f"c{i}" for i in range(20)], [50.0] * 20, 50.0))
    ax = captured[0].axes[0]
    assert ax.get_xlabel() == "accuracy (%)" and [b.get_width() for b in ax.patches] == [50.0] * 20


def test_prediction_grid(captured):
    tile = Image.new("RGB", (8, 8), (200, 10, 10))
    items = [{"image": tile, "true": "cat", "pred": "cat", "conf": 0.9},
             {"image": tile, "true": "cat", "pred": "dog", "conf": 0.55},
             {"image": tile, "true": "dog", "pred": "dog", "conf": 1.0}]
    assert png(figures.prediction_grid(items, cols=2)).size == (400, 430)  # 2 columns x 2 rows
    axes = captured[0].axes
    assert len(axes) == 4 and not axes[3].axison  # the spare cell is blank
    assert [a.get_title() for a in axes[:3]] == ["true cat\npred cat (90%)", "✗ true cat\npred dog (55%)",
                                                 "true dog\npred dog (100%)"]
    assert [to_hex(a.title.get_color()) for a in axes[:3]] == [figures.OK_COLOUR, figures.BAD_COLOUR, figures.OK_COLOUR]
    assert np.array_equal(axes[0].get_images()[0].get_array(), np.asarray(tile))


def test_confused_examples(captured):
    tile = Image.new("RGB", (8, 8))
    pairs = [{"true": "cat", "pred": "dog", "count": 7, "examples": [{"image": tile, "conf": 0.8}]},
             {"true": "fox", "pred": "cat", "count": 2, "examples": [{"image": tile, "conf": 0.6}] * 3}]
    png(figures.confused_examples(pairs, per_pair=3))
    axes = np.array(captured[0].axes).reshape(2, 3)
    assert axes[0, 0].get_ylabel() == "cat → dog\n(7 images)" and axes[1, 0].get_ylabel() == "fox → cat\n(2 images)"
    assert axes[0, 0].get_title() == "p(dog) 80%" and not axes[0, 1].axison and not axes[0, 2].axison
    assert [a.get_title() for a in axes[1]] == ["p(cat) 60%"] * 3


def test_reliability_diagram(captured):
    edges = np.linspace(0, 1, 16).tolist()
    rel = {"edges": edges, "accuracy": [None] * 13 + [0.5, 0.9], "count": [0] * 13 + [4, 10]}
    rel_tta = {"edges": edges, "accuracy": [None] * 14 + [0.95], "count": [0] * 14 + [14]}
    assert png(figures.reliability_diagram(rel, 0.0512, rel_tta, 0.0213)).size == (650, 600)
    top, bottom = captured[0].axes
    assert top.get_title() == "reliability diagram (top-1 confidence, 15 bins)"
    assert [b.get_height() for b in top.patches][-3:] == [0.0, 0.5, 0.9]
    assert [b.get_height() for b in bottom.patches][-2:] == [4, 10]
    assert [t.get_text() for t in top.get_legend().get_texts()] == [
        "with TTA (ECE 0.0213)", "perfect calibration", "no TTA (ECE 0.0512)"]
    assert (bottom.get_xlabel(), bottom.get_ylabel()) == ("confidence", "images")
