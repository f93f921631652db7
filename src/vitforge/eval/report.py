"""`vitforge report RUN`: one self-contained HTML page about a trained run, plus PNG copies of its figures.

    RUN/report/index.html       figures embedded as base64 PNG; no scripts, no external files
    RUN/report/*.png            the same figures
    RUN/report/report.json      every number on the page (metrics without and with TTA)

Validation data: `--data`, or the run's own held-out split rebuilt from its config (`open_data` with the same
`data.split_seed` selects the same images the run validated on).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitforge.checkpoint import checkpoint_config, load_checkpoint, resolve
from vitforge.data import open_data
from vitforge.data.dataset import Split
from vitforge.data.sources import open_source
from vitforge.errors import DataError, VitforgeError
from vitforge.eval import figures
from vitforge.eval.ensemble import ensemble_metrics, run_ensemble
from vitforge.eval.tta import trained_invariances
from vitforge.progress import Progress
from vitforge.version import __version__

GRID = 36  # a 6x6 prediction grid, as in the evaluation of kiki101robo/AIRL_VIT-and-SAM2 `q1.ipynb`
PAIRS, PER_PAIR = 5, 6


@dataclass
class Figure:
    name: str  # file stem
    title: str
    png: bytes
    caption: str = ""


# ---- inputs -------------------------------------------------------------------------------------------------------
def validation_data(ckpt: dict, data: str | None) -> str | Split:
    """`data`, or the held-out split of the run's own config (same split seed -> same images)."""
    if data:
        return data
    cfg = checkpoint_config(ckpt)
    try:
        opened = open_data(cfg.data)
    except DataError as e:
        raise DataError(f"rebuilding the run's validation split failed ({e}); pass --data") from None
    if opened.val is None:
        raise VitforgeError(f"{ckpt['path']}: the run has no held-out split (data.val_split=0); pass --data")
    return opened.val


def image_loader(data: str | Split, ids: list[str]):
    """`load(row)` -> PIL image of the row-th evaluated item (ids matched in dataset order; duplicates allowed)."""
    if isinstance(data, Split):
        source, indices = data.source, data.indices
    else:
        source = open_source(data)
        indices = np.arange(len(source))
    where: dict[str, list[int]] = {}
    for i in reversed(indices.tolist()):  # reversed, so that pop() hands out the first occurrence first
        where.setdefault(source.ids[i], []).append(i)
    rows = [where[name].pop() for name in ids]
    return lambda r: source.load(rows[r]).convert("RGB")


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- figures --------------------------------------------------------------------------------------------------------
def grid_items(ens, probs: np.ndarray, load, n: int = GRID, seed: int = 0) -> list[dict]:
    """n validation items drawn with a fixed seed (same picture every time), in dataset order."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ens.ids), size=min(n, len(ens.ids)), replace=False))
    pred = probs.argmax(1)
    return [{"image": load(r), "true": ens.classes[ens.labels[r]], "pred": ens.classes[pred[r]],
             "conf": float(probs[r, pred[r]])} for r in rows]


def pair_examples(ens, probs: np.ndarray, pairs: list[dict], load) -> list[dict]:
    """For each confused pair, its most confident mistakes (up to PER_PAIR images)."""
    idx = {c: i for i, c in enumerate(ens.classes)}
    pred = probs.argmax(1)
    out = []
    for p in pairs[:PAIRS]:
        t, q = idx[p["true"]], idx[p["pred"]]
        rows = np.flatnonzero((ens.labels == t) & (pred == q))
        rows = rows[np.argsort(-probs[rows, q], kind="stable")][:PER_PAIR]
        out.append({**p, "examples": [{"image": load(r), "conf": float(probs[r, q])} for r in rows]})
    return out


def make_figures(m: dict, ens, history: list[dict], load) -> list[Figure]:
    """Every figure of the page, in page order."""
    probs = ens.probs
    figs = []
    if history:
        figs.append(Figure("training_curves", "Training curves", figures.training_curves(history),
                           "From metrics.jsonl: loss, validation accuracy and learning rate per epoch."))
    cm = np.asarray(m["confusion"])
    figs.append(Figure("confusion_counts", "Confusion matrix (counts)",
                       figures.confusion(cm, ens.classes, normalized=False)))
    figs.append(Figure("confusion_normalized", "Confusion matrix (row-normalised)",
                       figures.confusion(np.asarray(m["confusion_normalized"]), ens.classes, normalized=True)))
    acc = list(m["per_class_top1"].values())
    figs.append(Figure("per_class_accuracy", "Per-class accuracy",
                       figures.per_class_accuracy(ens.classes, acc, m["top1"])))
    figs.append(Figure("predictions_grid", f"{GRID} validation predictions",
                       figures.prediction_grid(grid_items(ens, probs, load)),
                       "A fixed random sample; wrong predictions are marked ✗ and framed in red."))
    pairs = pair_examples(ens, probs, m["confused_pairs"], load)
    if pairs:
        figs.append(Figure("confused_pairs", "Most-confused pairs", figures.confused_examples(pairs, PER_PAIR),
                           "Each row: images of the true class predicted as the other, most confident first."))
    t = m["with_tta"]
    figs.append(Figure("reliability", "Calibration", figures.reliability_diagram(
        m["reliability"], m["ece"], t["reliability"] if t else None, t["ece"] if t else None),
        "Bars: accuracy of the images whose top-1 confidence falls in each bin; the diagonal is perfect "
        "calibration. ECE = expected calibration error (0 is perfectly calibrated)."))
    return figs


# ---- HTML -----------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
main{max-width:1200px;margin:auto;padding:24px}
h1{margin:0 0 4px}h2{margin-top:36px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#59636e}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:18px 0}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;min-width:150px}
.card b{display:block;font-size:26px}.card span{color:#59636e;font-size:13px}
figure{background:#fff;border:1px solid #d0d7de;border-radius:8px;margin:16px 0;padding:12px;overflow-x:auto}
figure img{max-width:100%;height:auto;display:block;margin:auto}figcaption{color:#59636e;font-size:13px;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:8px 0}
td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:right}th{background:#eaeef2}td:first-child{text-align:left}
tr.avg td{font-weight:600;background:#f6f8fa}.bad{color:#cf222e}.good{color:#1a7f37}
pre{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px;font-size:12px;overflow:auto;
max-height:480px}
.note{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}
"""


def _img(fig: Figure) -> str:
    b64 = base64.b64encode(fig.png).decode("ascii")
    cap = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return (f'<figure id="{fig.name}"><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{b64}">'
            f"{cap}</figure>")


def _table(header: list[str], rows: list[list], cls: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, r in enumerate(rows):
        c = f' class="{cls[i]}"' if cls and cls[i] else ""
        body.append(f"<tr{c}>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cards(m: dict) -> str:
    t = m["with_tta"]
    items = [(f"{m['top1']:.2f}%", "top-1 (no TTA)")]
    if t:
        d = t["top1"] - m["top1"]
        items.append((f"{t['top1']:.2f}%", f"top-1 with TTA {m['tta']} ({d:+.2f})"))
    if m["top5"] is not None:
        items.append((f"{m['top5']:.2f}%", "top-5"))
    items += [(f"{m['loss']:.4f}", "loss"), (f"{m['macro_avg']['f1']:.4f}", "macro F1"), (f"{m['ece']:.4f}", "ECE"),
              (f"{m['n']:,}", "validation images")]
    return '<div class="cards">' + "".join(f"<div class=card><b>{html.escape(v)}</b><span>{html.escape(k)}</span>"
                                           "</div>" for v, k in items) + "</div>"


def _tta_table(m: dict) -> str:
    t = m["with_tta"]
    if not t:
        return "<p>Test-time augmentation was off (<code>--tta none</code>).</p>"
    top5 = m["top5"] is not None
    rows = [[name, f"{a['top1']:.2f}%", *([f"{a['top5']:.2f}%"] if top5 else []), f"{a['loss']:.4f}",
             f"{a['ece']:.4f}", f"{a['macro_avg']['f1']:.4f}"] for name, a in (("no TTA", m), (f"TTA {m['tta']}", t))]
    return _table(["", "top-1", *(["top-5"] if top5 else []), "loss", "ECE", "macro F1"], rows)


def _class_table(m: dict) -> str:
    rows, cls = [], []
    for name, r in m["per_class"].items():
        rows.append([name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]])
        cls.append("")
    for avg in ("macro", "weighted"):
        r = m[f"{avg}_avg"]
        rows.append([f"{avg} avg", f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]])
        cls.append("avg")
    return _table(["class", "precision", "recall (accuracy)", "F1", "support"], rows, cls)


def _pairs_table(m: dict) -> str:
    if not m["confused_pairs"]:
        return "<p>No mistakes: nothing is confused.</p>"
    rows = [[p["true"], p["pred"], p["count"], f"{100 * p['rate']:.1f}%"] for p in m["confused_pairs"]]
    return _table(["true class", "predicted as", "images", "of the true class"], rows)


def environment(ckpt: dict, summary: dict) -> dict:
    """Where the run was trained (checkpoint provenance, summary.json) and where this report was made."""
    import torch

    trained = {**(ckpt.get("provenance") or {})}
    for k in ("device", "world_size", "params", "train_images", "val_images", "epochs_run", "wall_seconds"):
        if k in summary:
            trained[k] = summary[k]
    made = {"vitforge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else "none", "made": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}
    return {"training": trained, "report": made}


def render_html(run: Path, m: dict, figs: list[Figure], ckpt: dict, env: dict, notes: list[str]) -> str:
    """The page: headline cards, TTA comparison, figures, tables, config and environment."""
    by_name = {f.name: f for f in figs}
    sec = lambda *names: "".join(_img(by_name[n]) for n in names if n in by_name)  # noqa: E731
    config = json.dumps(ckpt.get("config"), indent=2)
    env_rows = [[f"{side}: {k}", v] for side, d in env.items() for k, v in d.items()]
    parts = [
        f"<h1>{html.escape(run.name)}</h1>",
        f"<div class=sub>model <b>{html.escape(str(ckpt['model_name']))}</b> · evaluated on "
        f"{html.escape(str(m['data']))} · checkpoint {html.escape(ckpt['path'])}</div>",
        "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes),
        _cards(m),
        "<h2>Training</h2>", sec("training_curves") or "<p>No metrics.jsonl in this run.</p>",
        "<h2>Accuracy with and without test-time augmentation</h2>", _tta_table(m),
        "<h2>Confusion</h2>", sec("confusion_counts", "confusion_normalized"),
        "<h2>Per class</h2>", sec("per_class_accuracy"), "<h3>Classification report</h3>", _class_table(m),
        f"<h2>{GRID} validation predictions</h2>", sec("predictions_grid"),
        "<h2>Most-confused pairs</h2>", _pairs_table(m), sec("confused_pairs"),
        "<h2>Calibration</h2>", sec("reliability"),
        "<h2>Configuration</h2>", f"<pre>{html.escape(config)}</pre>",
        "<h2>Environment</h2>", _table(["", "value"], env_rows),
    ]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>vitforge report: "
            f"{html.escape(run.name)}</title><style>{CSS}</style></head><body><main>{''.join(parts)}</main></body>"
            "</html>")


# ---- entry point ----------------------------------------------------------------------------------------------------
def build_report(run: str | Path, *, data: str | None = None, tta: str = "flip-shift", batch_size: int | None = None,
                 device: str = "auto", out: str | Path | None = None) -> Path:
    """Evaluate a run's best checkpoint and write its report page; returns the path of index.html.

    Args:
        run: run directory (its checkpoints/best.pt, else last.pt, is evaluated).
        data: labelled dataset; None = the run's own held-out split rebuilt from its config.
        tta: view set whose accuracy is shown beside the plain one ("none" to skip).
        batch_size, device: evaluation settings.
        out: report folder (default RUN/report); existing report files in it are replaced.
    """
    run = Path(run).expanduser()
    if not run.is_dir():
        raise VitforgeError(f"{run}: not a run directory")
    with Progress(f"report {run.name}", unit="step") as bar:
        bar.stage(f"report {run.name}: loading the checkpoint and the validation data")
        ckpt = load_checkpoint(resolve(run))
        val = validation_data(ckpt, data)
        bar.stage(f"report {run.name}: evaluating (tta {tta})")
        ens = run_ensemble([ckpt["path"]], val, labeled=True, tta=tta, batch_size=batch_size, device=device)
        m = ensemble_metrics(ens)
        m.update(data=data or f"held-out split of {checkpoint_config(ckpt).data.train}", tta=tta)
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
        bar.stage(f"report {run.name}: drawing figures")
        figs = make_figures(m, ens, read_metrics(run), image_loader(val, ens.ids))
        page = render_html(run, m, figs, ckpt, environment(ckpt, summary), _notes(ckpt, tta, ens))
        return _write(Path(out) if out else run / "report", page, figs, m)


def _notes(ckpt: dict, tta: str, ens) -> list[str]:
    notes = []
    inv = trained_invariances(ckpt)
    missing = [(aug, views) for key, aug, views in (("mirror", "horizontal flips", "mirrored"),
                                                    ("shift", "random crops", "shifted")) if not inv[key]]
    if tta != "none" and missing:
        notes.append(f"This run was trained without {' or '.join(a for a, _ in missing)}: --tta {tta} leaves out its "
                     f"{' and '.join(v for _, v in missing)} views, images the model never saw.")
    if ens.unreadable:
        notes.append(f"{len(ens.unreadable)} unreadable image(s) skipped, e.g. {ens.unreadable[0]}.")
    return notes


def _write(folder: Path, page: str, figs: list[Figure], m: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in figs:
        (folder / f"{f.name}.png").write_bytes(f.png)
    (folder / "report.json").write_text(json.dumps(m, indent=2) + "\n")
    index = folder / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
