"""`vitforge eval --tta saccadic12` on a CPU: an older vitforge against this one, in one run, as a ratio.

    python benchmarks/eval_cpu.py --before f4b5c86 --name eval_tta_cpu          # 150 images, 2 classes, 224 px
    python benchmarks/eval_cpu.py --before f4b5c86 --images 48 --repeats 1 --name eval_tta_cpu_smoke
    python benchmarks/eval_cpu.py --passes --name eval_tta_passes_cpu     # forward passes alone, in this process

What it builds (deterministic, in a temporary folder): an ImageFolder of N JPEG photos of varied size (300-1200 px
a side, smooth colour fields with grain, like real photos in size and entropy) in two classes, and a checkpoint of
`timm:tf_efficientnet_lite0` at 224 px (random weights: the speed of a forward pass does not depend on them).

What it runs: the same command line, `python -m vitforge eval CKPT --data DIR --tta saccadic12 --device cpu
--json`, with each version's defaults, alternating before/after `--repeats` times (so a busy machine slows both
alike). The older version's `src/` comes from `git archive REV`. Each run is a child process measured with
`os.wait4`: wall seconds, user and system CPU seconds and minor page faults of the process and its DataLoader
workers. The record holds medians, the ratios before/after, both runs' loss and top-1 (the results must agree), and
the load average before and after (other processes on the machine).

`--passes`: the TTA forward passes alone, in this process, on one random batch of 4 images (no decoding): one view
per pass (`tta_probs` default) against stacked views (`--stack` images per pass), first with glibc's default malloc
settings, then after `vitforge.runtime.prepare_cpu_inference()` (which cannot be undone, hence this order); user
and system CPU seconds and minor page faults from `resource.getrusage`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg: n photos of varied size, half per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, cls in enumerate(("chihuahua", "muffin")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n // 2 + (k < n % 2)):
            w, h = (int(v) for v in rng.integers(300, 1201, 2))
            coarse = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
            coarse[..., k] = np.maximum(coarse[..., k], 160)  # a class colour cast
            img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"{i:04d}.jpg", quality=90)
    return root


def make_checkpoint(path: Path, data: Path, model: str, size: int) -> Path:
    import torch

    from vitforge.checkpoint import save_checkpoint
    from vitforge.config import load_config, to_dict
    from vitforge.models.build import build_model

    torch.manual_seed(0)
    net = build_model(model, {"num_classes": 2})
    cfg = load_config(None, [f"data.train={data}", f"model.name={model}", f"data.img_size={size}"])
    pre = {"img_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "interpolation": "bicubic",
           "crop_pct": 0.875, "kind": "image"}
    save_checkpoint(path, {"model_name": model, "model_kwargs": net.vitforge_kwargs, "classes": ["chihuahua", "muffin"],
                           "preprocess": pre, "config": to_dict(cfg), "model": net.state_dict(),
                           "eval_weights": "model"})
    return path


def checkout(rev: str, dest: Path) -> Path:
    """`src/` of git revision `rev` under dest (a plain copy, no worktree)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def run_eval(src: Path, ckpt: Path, data: Path, tta: str, extra: list[str]) -> dict:
    """One `vitforge eval` child process: wall, user, sys, minor faults (with its workers), and its JSON."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env.pop("OMP_NUM_THREADS", None)  # each version chooses its own threads
    cmd = [sys.executable, "-m", "vitforge", "eval", str(ckpt), "--data", str(data), "--tta", tta, "--device", "cpu",
           "--json", *extra]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=src.parent)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read().decode()[-3000:]}")
        m = json.loads(out.read())
    return {"wall_s": round(wall, 2), "user_s": round(ru.ru_utime, 2), "sys_s": round(ru.ru_stime, 2),
            "minor_faults": ru.ru_minflt, "loss": m["with_tta"]["loss"], "top1": m["with_tta"]["top1"], "n": m["n"]}


def summarise(runs: list[dict]) -> dict:
    keys = ("wall_s", "user_s", "sys_s", "minor_faults")
    return {f"median_{k}": statistics.median(r[k] for r in runs) for k in keys}


def passes(a: argparse.Namespace) -> None:
    import resource

    import torch

    from vitforge.checkpoint import load_model
    from vitforge.eval.tta import tta_probs, tta_views
    from vitforge.runtime import prepare_cpu_inference

    tmp = Path(tempfile.mkdtemp(prefix="vitforge-evalcpu-"))
    try:
        ckpt = make_checkpoint(tmp / "model.pt", make_images(tmp / "val", 2), a.model, a.size)
        model = load_model(ckpt)[0].eval()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    x = torch.randn(4, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    views = tta_views(a.tta, mean=torch.tensor([0.485, 0.456, 0.406]), std=torch.tensor([0.229, 0.224, 0.225]))
    rows = []

    def measure(case: str, max_images: int | None) -> None:
        with torch.no_grad():
            tta_probs(model, x, views, max_images=max_images)  # warm-up
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(a.repeats):
                tta_probs(model, x, views, max_images=max_images)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append({"case": case, "images_per_pass": max_images or len(x), "wall_s": round(time.perf_counter() - t0,
                     2), "user_s": round(r1.ru_utime - r0.ru_utime, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2),
                     "minor_faults": r1.ru_minflt - r0.ru_minflt})
        print(json.dumps(rows[-1]), flush=True)

    measure("one view per pass, glibc defaults", None)
    measure(f"{a.stack} images per pass, glibc defaults", a.stack)
    settings = prepare_cpu_inference()
    measure("one view per pass, prepare_cpu_inference", None)
    measure(f"{a.stack} images per pass, prepare_cpu_inference", a.stack)
    what = (f"{a.repeats} x tta_probs over {len(views)} {a.tta} views of a batch of 4, {a.model} at {a.size} px, CPU, "
            f"{torch.get_num_threads()} threads")
    save_result(a.name, {"what": what, "settings": settings,
                         "rows": rows, "loadavg_end": os.getloadavg(), "usable_cpus": len(os.sched_getaffinity(0))})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="git revision of the older vitforge (e.g. f4b5c86); required without --passes")
    ap.add_argument("--passes", action="store_true", help="measure the forward passes alone (see above)")
    ap.add_argument("--stack", type=int, default=12, help="--passes: images per pass of the stacked case")
    ap.add_argument("--images", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tta", default="saccadic12")
    ap.add_argument("--model", default="timm:tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--after-args", nargs="*", default=[], help="extra eval options for the newer version only")
    ap.add_argument("--name", required=True, help="results file stem, e.g. eval_tta_cpu")
    a = ap.parse_args()
    if a.passes:
        passes(a)
        return
    if not a.before:
        ap.error("--before is required (or --passes)")

    tmp = Path(tempfile.mkdtemp(prefix="vitforge-evalcpu-"))
    try:
        data = make_images(tmp / "val", a.images)
        ckpt = make_checkpoint(tmp / "model.pt", data, a.model, a.size)
        srcs = {"before": checkout(a.before, tmp / "before"), "after": ROOT / "src"}
        load0 = os.getloadavg()
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(a.repeats):
            for which in ("before", "after"):
                res = run_eval(srcs[which], ckpt, data, a.tta, a.after_args if which == "after" else [])
                runs[which].append(res)
                print(f"repeat {r + 1} {which:6s} {json.dumps(res)}", flush=True)
        load1 = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    before, after = summarise(runs["before"]), summarise(runs["after"])
    ratio = {k.replace("median_", ""): round(before[k] / max(after[k], 1e-9), 2) for k in before}
    print(f"before/after: {json.dumps(ratio)}")
    save_result(a.name, {
        "what": f"vitforge eval --tta {a.tta} --device cpu, {a.images} JPEGs 300-1200 px, 2 classes, {a.model} at "
                f"{a.size} px; each version's defaults",
        "before_rev": a.before, "after_args": a.after_args, "repeats": a.repeats, "before": before, "after": after,
        "ratio_before_over_after": ratio, "runs": runs, "loadavg_start": load0, "loadavg_end": load1,
        "usable_cpus": len(os.sched_getaffinity(0)),
    })


if __name__ == "__main__":
    main()
