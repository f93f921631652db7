"""Pretrained EfficientNet-Lite0 (offline ImageNet weights) vs the same model from random weights, same budget.

    python benchmarks/finetune_pretrained_vs_scratch.py [--per-class 50] [--img-size 96] [--epochs 3] [--folds 2]

What a new user would do: export a small class-balanced subset of the CIFAR-10 training parquet into a
`train/<class>/` folder, then run `vitforge cv` twice on it with identical settings except `model.pretrained`
(`efficientnet-lite0` vs none). The CIFAR images (32 px) are upsampled on the device to `--img-size`. Reports the
out-of-fold accuracy / macro-F1 of both arms and their wall times, and writes
benchmarks/results/finetune_pretrained_vs_scratch_cpu.json (or _<gpu> when a GPU is used).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARQUET = ROOT.parent / "shared" / "data" / "cifar10" / "train.parquet"


def export_subset(parquet: Path, out: Path, per_class: int, seed: int) -> Path:
    """`out/<class>/<id>.png` with `per_class` images of every class, drawn with a fixed seed."""
    from vitforge.data import open_source

    src = open_source(str(parquet))
    rng = np.random.default_rng(seed)
    if out.exists():
        shutil.rmtree(out)
    for k, name in enumerate(src.classes):
        (out / name).mkdir(parents=True)
        for i in rng.choice(np.flatnonzero(src.labels == k), size=per_class, replace=False):
            src.load(int(i)).save(out / name / f"{i:05d}.png")
    return out


def run_arm(data: Path, runs: Path, name: str, pretrained: bool, a: argparse.Namespace) -> dict:
    from vitforge.commands.cv import run_cv
    from vitforge.config import load_config

    overrides = [f"data.train={data}", "model.name=timm:tf_efficientnet_lite0", f"data.img_size={a.img_size}",
                 f"data.batch_size={a.batch_size}", f"train.epochs={a.epochs}", f"optim.lr={a.lr}",
                 "schedule.warmup_epochs=0.5", "data.aug.crop_padding=4", "train.label_smoothing=0.1",
                 f"train.threads={a.threads}", "run.progress=plain", "run.tensorboard=false", f"run.dir={runs}",
                 f"run.name={name}", "data.num_workers=0"]
    if pretrained:
        overrides.append("model.pretrained=efficientnet-lite0")
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    s = run_cv(load_config(None, overrides), a.folds)
    wall = time.perf_counter() - t0
    return {"pretrained": "efficientnet-lite0" if pretrained else None, "overrides": overrides,
            "oof_accuracy": round(s["overall"]["accuracy"], 2), "oof_macro_f1": round(s["overall"]["macro_f1"], 4),
            "fold_accuracy": [round(f["accuracy"], 2) for f in s["per_fold"]],
            "fold_best_val_top1": [round(f["best_val_top1"], 2) for f in s["per_fold"]],
            "training_seconds": round(s["wall_seconds"], 1), "wall_seconds": round(wall, 1),
            # the machine is shared: 1-minute load average before and after the arm (2 cores)
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/vitforge-finetune-bench", help="scratch folder (data + runs)")
    a = p.parse_args()
    work = Path(a.work)
    data = export_subset(PARQUET, work / "cifar10_subset" / "train", a.per_class, a.seed)
    if (work / "runs").exists():
        shutil.rmtree(work / "runs")
    arms = {name: run_arm(data, work / "runs", name, name == "pretrained", a) for name in ("pretrained", "scratch")}
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(0).split()[-1].lower()
    results = {"dataset": f"CIFAR-10 train.parquet, {a.per_class} images/class ({10 * a.per_class} total), seed "
                          f"{a.seed}, upsampled 32 -> {a.img_size} px", "model": "timm:tf_efficientnet_lite0",
               "folds": a.folds, "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "threads": a.threads,
               "arms": arms,
               "accuracy_gain_points": round(arms["pretrained"]["oof_accuracy"] - arms["scratch"]["oof_accuracy"], 2)}
    path = save_result(f"finetune_pretrained_vs_scratch_{device}", results)
    print(json.dumps({k: {m: v[m] for m in ("oof_accuracy", "oof_macro_f1", "training_seconds", "wall_seconds")}
                      for k, v in arms.items()}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
