"""Memory of a 5-fold `vitforge cv` on the CPU, fold by fold: does it grow from one fold to the next?

    python benchmarks/cv_memory.py                       # -> benchmarks/results/cv_memory_cpu.json
    python benchmarks/cv_memory.py --images 300 --epochs 1 --name cv_memory_cpu_smoke

What it runs: `run_cv` (the library side of `vitforge cv`) on `synthetic:N,size=32` (deterministic, nothing to
download) with `vit_tiny_patch16_224` at 32 px (5.7M parameters, 4 tokens: cheap to run, while a fold's model + AdamW
state + EMA is ~90 MB, so a fold left behind shows), each configuration in a fresh child process:

- `release` (this vitforge): each fold's trainer is dropped and `vitforge.runtime.release_memory` runs between folds
  and after each out-of-fold evaluation;
- `no-release`: the same with `release_memory` replaced by a no-op in `vitforge.commands.cv` and
  `vitforge.eval.ensemble` (what it was before), for comparison.

Measured in the child: resident set size (VmRSS from /proc/self/status) sampled every 20 ms by a thread, reported
per fold as the peak while the fold trained and predicted, and the RSS after the fold finished (after its release);
plus `ru_maxrss`. Flat means the per-fold peaks do not grow with the fold index (the record holds the growth from
fold 1 to fold 5 and the largest step between consecutive folds).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Sampler:
    """A thread sampling RSS; `fold` (set by the training hook) says which fold a sample belongs to."""

    def __init__(self, every: float = 0.02):
        self.fold, self.peaks, self.every = -1, {}, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            r = rss_mb()
            self.peaks[self.fold] = max(self.peaks.get(self.fold, 0.0), r)
            time.sleep(self.every)

    def on_step(self, trainer) -> None:  # the CV's training hook
        self.fold = trainer.cfg.data.fold


def child(args: argparse.Namespace) -> None:
    """One CV in this process; prints one JSON line."""
    import torch

    from vitforge.commands import cv as cv_mod
    from vitforge.config import load_config
    from vitforge.eval import ensemble

    torch.set_num_threads(args.threads)
    if args.mode == "no-release":
        cv_mod.release_memory = ensemble.release_memory = lambda: None
    after: dict[int, float] = {}
    sampler = Sampler()

    class Recorded(cv_mod.CrossValidation):
        def _record(self, fold: int, result: dict) -> None:
            super()._record(fold, result)
            after[fold] = rss_mb()  # after the fold's training, release and out-of-fold evaluation
            sampler.fold = fold + 0.5  # between folds (the next fold's first step sets the next index)

    cfg = load_config(None, [f"data.train=synthetic:{args.images},size=32,classes=10", f"model.name={args.model}",
                             "data.img_size=32", "data.batch_size=32", f"train.epochs={args.epochs}",
                             "train.device=cpu", f"train.threads={args.threads}", "ema.enabled=true",
                             "run.progress=none", "run.tensorboard=false", f"run.dir={args.dir}", "run.name=cv"])
    start = rss_mb()
    sampler.thread.start()
    t0 = time.perf_counter()
    summary = Recorded(cfg, args.folds, hooks=sampler).run()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.thread.join()
    peaks = [round(sampler.peaks.get(k, float("nan")), 1) for k in range(args.folds)]
    ends = [round(after[k], 1) for k in range(args.folds)]
    print(json.dumps({"mode": args.mode, "rss_start_mb": round(start, 1), "peak_rss_mb_per_fold": peaks,
                      "rss_after_fold_mb": ends, "ru_maxrss_mb": round(resource.getrusage(
                          resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "growth_fold1_to_last_mb": round(peaks[-1] - peaks[0], 1),
                      "largest_step_between_folds_mb": round(max(b - a for a, b in zip(peaks, peaks[1:])), 1),
                      "oof_accuracy": summary["overall"]["accuracy"], "wall_s": round(wall, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--modes", nargs="+", default=["release", "no-release"], choices=["release", "no-release"])
    ap.add_argument("--name", default="cv_memory_cpu")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # set in the child process
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mode:
        child(a)
        return
    runs = {}
    for mode in a.modes:
        with tempfile.TemporaryDirectory(prefix="vitforge-cvmem-") as tmp:
            cmd = [sys.executable, __file__, "--mode", mode, "--dir", tmp, "--images", str(a.images), "--folds",
                   str(a.folds), "--epochs", str(a.epochs), "--threads", str(a.threads), "--model", a.model]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VITFORGE_CACHE": str(Path(tmp) / "cache")}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(runs[mode]), flush=True)
    save_result(a.name, {
        "what": f"run_cv, {a.folds} folds, synthetic:{a.images},size=32 (10 classes), {a.model} at 32 px, AdamW + EMA, "
                f"{a.epochs} epoch(s) per fold, batch 32, {a.threads} threads, CPU; RSS per fold (peak while it ran, "
                f"and after it finished)",
        "runs": runs, "usable_cpus": len(os.sched_getaffinity(0)),
    })


if __name__ == "__main__":
    main()
