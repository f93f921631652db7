"""Accuracy of a trained run on its own held-out split with each test-time augmentation view set.

    python benchmarks/tta_gain.py RUN --name tta_gain_<what>_<device>     # evaluate an existing run
    python benchmarks/tta_gain.py --train recipes/demo.yaml key=value ... --name ...   # train it first

The held-out split is rebuilt from the run's config (same split seed, same images as its validation); each view set
runs through `vitforge.eval.ensemble.evaluate_ensemble`, which leaves out the views the model was not trained for
(mirrored views without `data.aug.hflip`, shifted views of small images without random crops). The record holds the
run's resolved config (`vitforge train` on it reproduces the run exactly) and its summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

SETS = ("none", "flip", "flip-shift", "saccadic12")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", help="run directory to evaluate")
    ap.add_argument("--train", nargs="+", metavar="RECIPE_OR_KEY=VALUE", help="train a run first (recipe + overrides)")
    ap.add_argument("--name", required=True, help="results file stem, e.g. tta_gain_cifar_minivit_cpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=500)
    a = ap.parse_args()

    from vitforge.checkpoint import load_checkpoint, resolve
    from vitforge.config import load_config
    from vitforge.eval.ensemble import evaluate_ensemble
    from vitforge.eval.report import validation_data
    from vitforge.eval.tta import trained_invariances
    from vitforge.train.trainer import train

    if a.train:
        recipe = a.train[0] if not a.train[0].count("=") else None
        overrides = a.train[1:] if recipe else a.train
        run = train(load_config(recipe, overrides))
    elif a.run:
        run = Path(a.run)
    else:
        ap.error("give a RUN directory or --train")
    ckpt = load_checkpoint(resolve(run))
    val = validation_data(ckpt, None)
    rows = {}
    for name in SETS:
        m = evaluate_ensemble([str(run)], val, tta=name, batch_size=a.batch_size, device=a.device)
        w = m["with_tta"] or m
        rows[name] = {"top1": round(w["top1"], 3), "loss": round(w["loss"], 4), "ece": round(w["ece"], 4)}
        print(f"{name:11s} top-1 {w['top1']:.2f}%  loss {w['loss']:.4f}  ECE {w['ece']:.4f}", flush=True)
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    save_result(a.name, {
        "run": str(run), "model": ckpt["model_name"], "val_images": summary.get("val_images"),
        "invariances_used": trained_invariances(ckpt), "by_view_set": rows,
        "gain_points": {k: round(v["top1"] - rows["none"]["top1"], 3) for k, v in rows.items()},
        "run_summary": {k: summary.get(k) for k in ("params", "train_images", "best_val_top1", "best_epoch",
                                                    "epochs_run", "wall_seconds", "device")},
        "run_config": ckpt["config"],
    })


if __name__ == "__main__":
    main()
