"""Classification metrics from gathered predictions: top-k, loss, per-class P/R/F1, confusion, calibration.

Everything starts from class probabilities (N, K) and labels (N,) that `collect_logits` / `collect_probs` have
already gathered from every DDP rank, so the numbers are those of the whole evaluation set, not of one shard.
Loss and top-k are computed on the device (`topk_metrics`); the per-class table and the confusion matrix come from
scikit-learn on the CPU copy of the (N,) predictions; calibration is 15 equal-width confidence bins (Guo et al.
2017, "On Calibration of Modern Neural Networks", eq. 3).

Units: `top1`, `top5` and `per_class_top1` are percentages (as everywhere in vitforge); precision, recall, F1, ECE
and the reliability bins are fractions in [0, 1]. `top5` is None for 5 classes or fewer, where it would be 100% by
construction.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, precision_recall_fscore_support

ECE_BINS = 15
TOP_PAIRS = 10
TOPK = 5


def has_topk(num_classes: int, k: int = TOPK) -> bool:
    """Top-k accuracy is informative only for k < number of classes (else it is 100% by construction)."""
    return k < num_classes


def topk_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """loss, top1, top5 (percent), per-class accuracy; labels < 0 (unlabeled) are ignored.

    `top5` is None when there are at most 5 classes: the 5 highest scores then cover every class, so a "top-5
    accuracy" would be 100% whatever the model does.
    """
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    n = labels.numel()
    if n == 0:
        return {"n": 0}
    loss = F.cross_entropy(logits, labels).item()
    k = min(TOPK, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit1 = top[:, 0] == labels
    hitk = (top == labels[:, None]).any(dim=1) if has_topk(logits.shape[1]) else None
    per_class = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, hit1.float())
    counts = torch.bincount(labels, minlength=num_classes).float()
    acc = (per_class / counts.clamp(min=1) * 100).tolist()
    return {
        "n": n,
        "loss": loss,
        "top1": hit1.float().mean().item() * 100,
        "top5": hitk.float().mean().item() * 100 if hitk is not None else None,
        "per_class_top1": [a if c > 0 else None for a, c in zip(acc, counts.tolist(), strict=True)],
    }


def label_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """Metrics of hard predictions, from one confusion matrix: what the trainer reports for best.pt, what `vitforge
    cv` summarises, and the hyperspectral OA / AA / kappa (`hsi_metrics`).

    Args:
        labels: (N,) true class indices.
        preds: (N,) predicted class indices.
        num_classes: K; classes absent from `labels` have recall 0 and support 0.

    Returns:
        {"n", "top1" (%, = overall accuracy), "balanced_accuracy" (%, mean recall over the classes that occur),
        "kappa" (Cohen's, chance agreement from the marginals), "macro_f1" (over all K classes, 0 for an empty
        class), "recall" ((K,) fractions), "support" ((K,) counts)}.
    """
    y, p, k = np.asarray(labels), np.asarray(preds), np.arange(num_classes)
    if len(y) == 0:
        return {"n": 0}
    cm = confusion_matrix(y, p, labels=k)
    support = cm.sum(axis=1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(num_classes), where=support > 0)
    return {"n": int(len(y)), "top1": float(np.trace(cm) / cm.sum() * 100),
            "balanced_accuracy": float(recall[support > 0].mean() * 100),
            "kappa": float(cohen_kappa_score(y, p, labels=k)),
            "macro_f1": float(f1_score(y, p, labels=k, average="macro", zero_division=0)),
            "recall": recall, "support": support}


def hsi_metrics(y_true, y_pred, num_classes: int | None = None) -> dict:
    """Hyperspectral papers' overall accuracy (OA), average accuracy (AA), Cohen's kappa and per-class accuracy
    (recall), as fractions. A class with no test pixels gets accuracy 0 and still counts in AA, as in the upstream
    evaluation code (`np.nan_to_num` of the per-class accuracies; Zhang et al., SClusterFormer, IEEE TGRS 2024).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = num_classes or int(max(y_true.max(), y_pred.max())) + 1
    m = label_metrics(y_true, y_pred, k)
    return {"oa": m["top1"] / 100, "aa": float(m["recall"].mean()), "kappa": m["kappa"],
            "per_class": m["recall"].tolist()}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str], *, n_bins: int = ECE_BINS,
                           top_pairs: int = TOP_PAIRS) -> dict:
    """Every metric of `vitforge eval` from probabilities; items with label < 0 (unlabeled) are ignored.

    Args:
        probs: (N, K) class probabilities (rows sum to 1), e.g. softmax of logits or a TTA/ensemble average.
        labels: (N,) int64 class indices on the same device.
        classes: the K class names.
        n_bins: confidence bins of the expected calibration error.
        top_pairs: how many most-confused (true, predicted) pairs to list.

    Returns:
        {"n", "loss", "top1", "top5", "per_class_top1" {name: % or None}, "per_class" {name: {precision, recall,
        f1, support}}, "macro_avg", "weighted_avg" ({precision, recall, f1, support}), "confusion" (K x K counts,
        rows = true class), "confusion_normalized" (rows sum to 1; empty rows stay 0), "ece", "reliability"
        {edges, count, confidence, accuracy}, "confused_pairs" [{true, pred, count, rate}]}.
    """
    keep = labels >= 0
    probs, labels = probs[keep].float(), labels[keep]
    if labels.numel() == 0:
        return {"n": 0}
    # NLL of the (possibly averaged) probabilities; for plain softmax outputs this equals cross-entropy on logits.
    base = topk_metrics(probs.clamp_min(1e-12).log(), labels, len(classes))
    conf, pred = probs.max(dim=1)
    y, p = labels.cpu().numpy(), pred.cpu().numpy()
    cm = confusion_matrix(y, p, labels=np.arange(len(classes)))
    out = {**base, "per_class_top1": dict(zip(classes, base["per_class_top1"], strict=True))}
    out.update(per_class_table(y, p, classes))
    out["confusion"] = cm.tolist()
    out["confusion_normalized"] = normalize_rows(cm).tolist()
    rel = reliability(conf.cpu().numpy(), (pred == labels).cpu().numpy(), n_bins)
    out["ece"] = expected_calibration_error(rel)
    out["reliability"] = rel
    out["confused_pairs"] = confused_pairs(cm, classes, top_pairs)
    return out


def per_class_table(y: np.ndarray, p: np.ndarray, classes: list[str]) -> dict:
    """Per-class precision/recall/F1/support plus macro and support-weighted averages (scikit-learn)."""
    k = np.arange(len(classes))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=k, zero_division=0)
    table = {c: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i])}
             for i, c in enumerate(classes)}
    out = {"per_class": table}
    # Averages over the classes that occur (as truth or prediction), scikit-learn's default: a class absent from
    # an evaluation subset would otherwise add a 0 recall to the macro mean.
    present = np.union1d(np.unique(y), np.unique(p))
    for avg in ("macro", "weighted"):
        a = precision_recall_fscore_support(y, p, labels=present, average=avg, zero_division=0)
        out[f"{avg}_avg"] = {"precision": float(a[0]), "recall": float(a[1]), "f1": float(a[2]), "support": len(y)}
    return out


def normalize_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the fraction of a true class predicted as each class); empty rows stay 0."""
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Reliability-diagram data: equal-width bins over (0, 1] of the top-1 confidence.

    Bin b holds confidences in (edges[b], edges[b+1]] (the first bin also takes 0). Empty bins report None for their
    mean confidence and accuracy.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=n_bins)
    nz = count > 0
    mean_conf = [float(s / c) if ok else None for s, c, ok in zip(conf_sum, count, nz, strict=True)]
    mean_acc = [float(s / c) if ok else None for s, c, ok in zip(acc_sum, count, nz, strict=True)]
    return {"edges": edges.tolist(), "count": count.tolist(), "confidence": mean_conf, "accuracy": mean_acc}


def expected_calibration_error(rel: dict) -> float:
    """ECE = sum_b |B_b|/N · |acc(B_b) − conf(B_b)| over the reliability bins."""
    n = sum(rel["count"])
    total = 0.0
    for c, conf, acc in zip(rel["count"], rel["confidence"], rel["accuracy"], strict=True):
        if c:
            total += c / n * abs(acc - conf)
    return total


def confused_pairs(cm: np.ndarray, classes: list[str], top: int = TOP_PAIRS) -> list[dict]:
    """The largest off-diagonal cells: {"true", "pred", "count", "rate" (count / images of the true class)}."""
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:top]
    rows = cm.sum(axis=1)
    pairs = []
    for flat in order:
        t, p = np.unravel_index(flat, cm.shape)
        if off[t, p] == 0:
            break
        pairs.append({"true": classes[t], "pred": classes[p], "count": int(off[t, p]),
                      "rate": float(off[t, p] / rows[t])})
    return pairs


def format_metrics(m: dict, *, title: str) -> str:
    """Human-readable block: headline numbers, the per-class table and the most-confused pairs."""
    top5 = f"  top-5 {m['top5']:.2f}%" if m["top5"] is not None else ""
    lines = [f"{title}: {m['n']} images  loss {m['loss']:.4f}  top-1 {m['top1']:.2f}%{top5}  ECE {m['ece']:.4f}"]
    lines.append(f"  {'class':>20s}  {'precision':>9s}  {'recall':>7s}  {'f1':>7s}  {'support':>7s}")
    rows = [(c, r) for c, r in m["per_class"].items()] + [(f"{a} avg", m[f"{a}_avg"]) for a in ("macro", "weighted")]
    for name, r in rows:
        lines.append(f"  {name:>20s}  {r['precision']:9.4f}  {r['recall']:7.4f}  {r['f1']:7.4f}  {r['support']:7d}")
    if m["confused_pairs"]:
        pairs = ", ".join(f"{p['true']}->{p['pred']} {p['count']}" for p in m["confused_pairs"][:5])
        lines.append(f"  most confused (true->pred count): {pairs}")
    return "\n".join(lines)
