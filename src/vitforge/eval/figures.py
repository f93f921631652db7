"""Report figures as PNG bytes (matplotlib, Agg canvas; pyplot and its global backend state are never touched).

Each function takes plain data (lists, numpy arrays, PIL images) and returns the PNG of one figure, so the report
can both embed it (base64) and write it beside the page.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

OK_COLOUR, BAD_COLOUR, ACCENT = "#1a7f37", "#cf222e", "#0969da"
ANNOTATE_MAX = 20  # write the numbers into confusion cells up to this many classes


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def training_curves(metrics: list[dict]) -> bytes:
    """Loss (train/val), accuracy (val top-1/top-5) and learning rate per epoch, from metrics.jsonl records."""
    fig = _figure(13, 3.6)
    axes = fig.subplots(1, 3)
    ep = lambda key: [(r["epoch"] + 1, r[key]) for r in metrics if r.get(key) is not None]  # noqa: E731
    panels = [(axes[0], "loss", [("train_loss", "train"), ("val_loss", "validation")]),
              (axes[1], "accuracy (%)", [("val_top1", "val top-1"), ("val_top5", "val top-5")]),
              (axes[2], "learning rate (end of epoch)", [("lr", "lr")])]
    for ax, title, series in panels:
        for key, label in series:
            pts = ep(key)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 30 else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    return to_png(fig)


def confusion(cm: np.ndarray, classes: list[str], *, normalized: bool) -> bytes:
    """Confusion matrix (rows = true class), counts or row fractions; numbers in the cells for few classes."""
    k = len(classes)
    side = min(max(5.0, 0.45 * k + 2.5), 16.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalized else max(int(cm.max()), 1))
    fig.colorbar(im, ax=ax, shrink=0.8)
    ticks = np.arange(k)
    show = k <= 60
    ax.set_xticks(ticks, classes if show else [], rotation=90 if k > 8 else 0, fontsize=8 if k > 20 else 10)
    ax.set_yticks(ticks, classes if show else [], fontsize=8 if k > 20 else 10)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("confusion matrix (row-normalised)" if normalized else "confusion matrix (counts)")
    if k <= ANNOTATE_MAX:
        hi = cm.max() / 2 if cm.max() else 0.5
        for (i, j), v in np.ndenumerate(cm):
            text = f"{v:.2f}" if normalized else str(int(v))
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if k > 10 else 9,
                    color="white" if v > hi else "black")
    return to_png(fig)


def per_class_accuracy(classes: list[str], acc: list[float | None], overall: float) -> bytes:
    """Bar per class (recall, %), the overall top-1 as a dashed line; horizontal bars for many classes."""
    vals = [a if a is not None else 0.0 for a in acc]
    k = len(classes)
    horizontal = k > 15
    fig = _figure(9, max(3.5, 0.22 * k + 1)) if horizontal else _figure(max(6, 0.7 * k + 2), 4)
    ax = fig.subplots()
    colours = [BAD_COLOUR if v < overall else ACCENT for v in vals]
    if horizontal:
        ax.barh(np.arange(k), vals, color=colours)
        ax.set_yticks(np.arange(k), classes, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.2f}%")
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
    else:
        bars = ax.bar(np.arange(k), vals, color=colours)
        ax.set_xticks(np.arange(k), classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
        ax.bar_label(bars, [f"{v:.1f}" for v in vals], fontsize=8)
        ax.axhline(overall, color="black", ls="--", lw=1, label=f"overall {overall:.2f}%")
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy (%)")
    ax.set_title("per-class accuracy (recall); red = below overall")
    ax.legend(loc="lower right", fontsize=8)
    return to_png(fig)


def _show(ax, img, title: str, colour: str) -> None:
    ax.imshow(np.asarray(img), interpolation="nearest" if min(img.size) < 64 else "antialiased")
    ax.set_title(title, fontsize=8, color=colour)
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(colour)
        s.set_linewidth(3)


def prediction_grid(items: list[dict], cols: int = 6) -> bytes:
    """Images with "true / pred (confidence)" titles; wrong predictions framed and titled in red.

    items: [{"image": PIL image, "true": str, "pred": str, "conf": float 0-1}].
    """
    rows = max(1, math.ceil(len(items) / cols))
    fig = _figure(2.0 * cols, 2.15 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes[len(items):]:
        ax.axis("off")
    for ax, it in zip(axes, items, strict=False):
        ok = it["true"] == it["pred"]
        mark = "" if ok else "✗ "
        _show(ax, it["image"], f"{mark}true {it['true']}\npred {it['pred']} ({100 * it['conf']:.0f}%)",
              OK_COLOUR if ok else BAD_COLOUR)
    return to_png(fig)


def confused_examples(pairs: list[dict], per_pair: int) -> bytes:
    """One row per confused pair "true -> pred": its most confident mistakes.

    pairs: [{"true", "pred", "count", "examples": [{"image", "conf"}]}].
    """
    rows = max(1, len(pairs))
    fig = _figure(1.9 * per_pair + 1.6, 2.0 * rows)
    axes = np.array(fig.subplots(rows, per_pair)).reshape(rows, per_pair)
    for r, pair in enumerate(pairs):
        for c in range(per_pair):
            ax = axes[r, c]
            if c >= len(pair["examples"]):
                ax.axis("off")
                continue
            ex = pair["examples"][c]
            _show(ax, ex["image"], f"p({pair['pred']}) {100 * ex['conf']:.0f}%", BAD_COLOUR)
        axes[r, 0].set_ylabel(f"{pair['true']} → {pair['pred']}\n({pair['count']} images)", fontsize=9,
                              rotation=0, ha="right", va="center")
    return to_png(fig)


def reliability_diagram(rel: dict, ece: float, rel_tta: dict | None = None, ece_tta: float | None = None) -> bytes:
    """Accuracy per confidence bin against the diagonal (perfect calibration), with the bin counts below."""
    fig = _figure(6.5, 6)
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    edges = np.asarray(rel["edges"])
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
    top.bar(centres, acc, width=width * 0.95, color=ACCENT, alpha=0.8, label=f"no TTA (ECE {ece:.4f})")
    if rel_tta is not None:
        acc_t = [a if a is not None else np.nan for a in rel_tta["accuracy"]]
        top.plot(centres, acc_t, "o-", color="#bf8700", ms=4, label=f"with TTA (ECE {ece_tta:.4f})")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title("reliability diagram (top-1 confidence, 15 bins)")
    bottom.bar(centres, rel["count"], width=width * 0.95, color="grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    return to_png(fig)
