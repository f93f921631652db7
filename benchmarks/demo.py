"""Time `vitforge demo` end to end (process start to exit) and record its accuracy.

    python benchmarks/demo.py [--runs N]

Writes benchmarks/results/demo_cpu.json. The bar (issue 2): <= 90 s on 2 CPU cores with >= 95% validation top-1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402


def one_run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "vitforge", "demo", f"run.dir={tmp}"], capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        run = next(Path(tmp).iterdir())
        s = json.loads((run / "summary.json").read_text())
    return {"wall_seconds": round(secs, 2), "training_seconds": round(s["wall_seconds"], 2),
            "best_val_top1": round(s["best_val_top1"], 2), "best_epoch": s["best_epoch"], "val_images": s["val_images"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    for r in runs:
        print(r)
    walls = [r["wall_seconds"] for r in runs]
    accs = [r["best_val_top1"] for r in runs]
    summary = {"runs": runs, "wall_seconds_mean": round(statistics.mean(walls), 2),
               "wall_seconds_max": max(walls), "val_top1_mean": round(statistics.mean(accs), 2),
               "val_top1_min": min(accs), "bar": {"wall_seconds": 90, "val_top1": 95.0}}
    path = save_result("demo_cpu", summary, command=f"python benchmarks/demo.py --runs {args.runs}")
    print(json.dumps(summary, indent=2), "\n->", path)


if __name__ == "__main__":
    main()
