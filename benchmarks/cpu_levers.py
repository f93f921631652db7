"""What each CPU lever does to end-to-end training speed of the vitforge trainer (Mini-ViT CIFAR-10 recipe).

    python benchmarks/cpu_levers.py --data /path/to/cifar10/train.parquet                  # every cheap lever
    python benchmarks/cpu_levers.py --data ... --levers compile --steps 4 --repeats 1     # compile: minutes each

Each lever is a pair of settings, "before" and "after", given as `key=value` overrides of the recipe
(`recipes/cifar10/minivit.yaml`, with a small stratified subset, a small batch and no validation so that a run is
seconds). One measurement builds a `Trainer`, runs `fit()` for `warmup + steps` optimizer steps and times the
trainer's own loop (data, augmentation, forward/backward, optimizer, bookkeeping) between the end of the last warm-up
step and the end of the last step, from `on_step` hooks: img/s = steps x batch / seconds. Setup, the first steps and
the end-of-run checkpoint are not counted (compile time is reported on its own, as the first steps' seconds).

The machine may be shared, so the two settings of a lever are measured side by side, alternating (A B, B A, A B,
...), and the figure of merit is the median over repeats of the ratio after/before of adjacent runs: a slow
drift or a burst of foreign load hits both sides of a ratio alike.

`floor` compares the trainer (after) with a minimal hand loop (before): the same model, optimizer, loss and
autocast built by the same `Trainer`, stepping over batches taken from the same stream beforehand (no data work
while timed): the ratio is the share of the floor speed the whole pipeline keeps.

Every measurement runs in a fresh process (process-wide settings such as threads and malloc start from their
defaults). Results are merged into benchmarks/results/cpu_levers_<device>.json under the lever's name (each with its
settings), so runs for separate levers accumulate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import RESULTS_DIR, save_result  # noqa: E402

from vitforge import runtime as D  # noqa: E402
from vitforge.config import load_config  # noqa: E402
from vitforge.models.layers import attention  # noqa: E402
from vitforge.resources import find_recipe  # noqa: E402
from vitforge.train.optim import set_lr  # noqa: E402
from vitforge.train.trainer import Trainer  # noqa: E402

RECIPE = "recipes/cifar10/minivit.yaml"
# lever -> (before, after): overrides of the recipe. Every lever names both of its settings explicitly, so that a
# changed default does not silently change what a lever compares.
LEVERS: dict[str, tuple[list[str], list[str]]] = {
    "threads": (["train.threads=1"], [f"train.threads={D.usable_cpus()}"]),
    "aug_backend": (["data.aug.backend=workers"], ["data.aug.backend=device"]),
    "workers": (["data.aug.backend=workers", "data.num_workers=2"],
                ["data.aug.backend=workers", "data.num_workers=1"]),
    "amp_bf16": (["train.amp=off"], ["train.amp=bf16"]),
    "channels_last": (["train.channels_last=false"], ["train.channels_last=true"]),
    "fused_adamw": (["optim.fused=false"], ["optim.fused=true"]),
    # attention under dropout on a CPU: PyTorch's SDPA math fallback vs our manual path (models/layers/attention.py)
    "attn_cpu_dropout": (["--torch-sdpa-on-cpu"], []),
    "compile": (["train.compile=off"], ["train.compile=default"]),
    # glibc keeps freed blocks below 32 MiB in the process (runtime.prepare_cpu_inference's malloc setting)
    "malloc_keep": ([], ["--keep-freed-memory"]),
    "floor": ([], []),  # before: the hand loop; after: the trainer (same settings)
}
CHEAP = [k for k in LEVERS if k != "compile"]
# Levers that can be switched between two optimizer steps of one process: measured also step by step, alternating
# A B A B ... over the same model, optimizer and batches (noise cancels far better than between runs minutes apart).
STEP_LEVERS = ("attn_cpu_dropout", "amp_bf16")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its live child processes (DataLoader workers): read from
    /proc on Linux (children's ticks are counted while they run, not only once reaped); elsewhere this process's."""
    own = time.process_time()
    try:
        me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:  # ppid; then utime, stime are fields 14, 15 of stat (11, 12 after the name)
                own += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError, AttributeError):
        pass
    return own


class StepClock:
    """`on_step` hook: wall and CPU time at the end of every optimizer step."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float]] = []

    def on_step(self, trainer) -> None:
        self.times.append((time.perf_counter(), cpu_seconds()))


def rates(times: list[tuple[float, float]], start: float, args) -> dict:
    """img/s over the timed steps, CPU milliseconds per image over them, and the seconds before them."""
    (w0, c0), (w1, c1) = times[args.warmup - 1], times[-1]
    n = args.steps * args.batch
    return {"img_per_s": n / (w1 - w0), "cpu_ms_per_img": 1000 * (c1 - c0) / n, "first_s": w0 - start}


def config(args, extra: list[str], run_dir: str):
    base = [f"data.train={args.data}", f"data.limit={args.limit}", "data.val_split=0",
            f"data.batch_size={args.batch}", "train.epochs=2", "schedule.warmup_epochs=1",
            f"train.max_steps={args.warmup + args.steps}", "train.compile=off", "train.verify_attention=false",
            f"run.dir={run_dir}", "run.progress=none", "run.tensorboard=false", *args.set]
    return load_config(str(find_recipe(RECIPE)), [*base, *extra])


def run_trainer(args, extra: list[str], run_dir: str) -> dict:
    """img/s of `Trainer.fit()` over the steps after the warm-up; `first_s`: setup end -> end of warm-up."""
    clock = StepClock()
    trainer = Trainer(config(args, extra, run_dir), hooks=clock)
    t0 = time.perf_counter()
    trainer.fit()
    out = rates(clock.times, t0, args)
    del trainer
    D.release_memory()
    return out


def run_floor(args, extra: list[str], run_dir: str) -> dict:
    """The same parts stepped by a minimal loop over batches drawn from the stream before the clock starts."""
    trainer = Trainer(config(args, extra, run_dir))
    p = trainer.parts
    p.train_stream.set_epoch(0, 0, p.cfg.train.label_smoothing)
    batches = []
    for x, y, _ in p.train_stream:
        batches.append((x, y))
        if len(batches) == args.warmup + args.steps:
            break
    p.model.train()
    times = []
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        set_lr(p.optimizer, p.lr_for(i))
        with p.autocast():
            loss = p.criterion(p.model(x), y, x)
        loss.backward()
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter(), cpu_seconds()))
    out = rates(times, t0, args)
    del trainer, batches
    D.release_memory()
    return out


def run_step_interleaved(args, lever: str, run_dir: str) -> dict:
    """Per-step alternation of a lever's two settings inside one training process (model step only: batches are
    taken from the stream beforehand). Returns the median over pairs of time(before) / time(after)."""
    trainer = Trainer(config(args, [], run_dir))
    p = trainer.parts
    p.train_stream.set_epoch(0, 0, p.cfg.train.label_smoothing)
    batches = [(x, y) for x, y, _ in p.train_stream][: args.step_pairs * 2 + 2]
    p.model.train()

    def step(x, y, after: bool) -> float:
        attention.MANUAL_FOR_CPU_DROPOUT = after or lever != "attn_cpu_dropout"
        amp = D.autocast(p.device, torch.bfloat16) if (lever == "amp_bf16" and after) else p.autocast()
        t = time.perf_counter()
        with amp:
            loss = p.criterion(p.model(x), y, x)
        loss.backward()
        p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(*batches[0], False), step(*batches[1], True)  # warm-up of both settings
    ratios, secs = [], {"before": [], "after": []}
    for i in range(2, len(batches) - 1, 2):
        first_after = (i // 2) % 2 == 1  # alternate which goes first
        a = step(*batches[i], first_after)
        b = step(*batches[i + 1], not first_after)
        tb, ta = (b, a) if first_after else (a, b)
        secs["before"].append(tb), secs["after"].append(ta)
        ratios.append(tb / ta)
    return {"ratio_after_over_before": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
            "step_s_before": [round(x, 3) for x in secs["before"]],
            "step_s_after": [round(x, 3) for x in secs["after"]],
            "settings": {"batch": args.batch, "pairs": len(ratios)}}


def child(args) -> None:
    """One measurement in this (fresh) process; prints its result as the last line."""
    spec = json.loads(args.child)
    flags = [o for o in spec if o.startswith("--")]
    overrides = [o for o in spec if not o.startswith("--")]
    if "--keep-freed-memory" in flags:
        D._keep_freed_memory()
    if "--torch-sdpa-on-cpu" in flags:
        attention.MANUAL_FOR_CPU_DROPOUT = False
    with tempfile.TemporaryDirectory() as tmp:
        if "--step-interleaved" in flags:
            out = run_step_interleaved(args, overrides[0], tmp)
        else:
            out = (run_floor if "--floor" in flags else run_trainer)(args, overrides, tmp)
    print("RESULT " + json.dumps(out))


def run_child(args, spec: list[str]) -> dict:
    """A measurement in a fresh process: process-wide settings (threads, malloc) start from PyTorch's defaults."""
    cmd = [sys.executable, __file__, "--data", args.data, "--limit", str(args.limit), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--steps", str(args.steps), "--set", *args.set, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode or not lines:
        raise RuntimeError(f"measurement {spec} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def measure(lever: str, args) -> dict:
    before, after = LEVERS[lever]
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    ratios, cpu_ratios = [], []
    for r in range(args.repeats):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        got = {}
        for side in order:
            spec = before if side == "before" else after
            if lever == "floor" and side == "before":
                spec = [*spec, "--floor"]
            got[side] = run_child(args, spec)
            runs[side].append(got[side])
            g = got[side]
            print(f"{lever} {side}: {g['img_per_s']:.1f} img/s, {g['cpu_ms_per_img']:.1f} CPU ms/img "
                  f"(first steps {g['first_s']:.1f} s)", flush=True)
        ratios.append(got["after"]["img_per_s"] / got["before"]["img_per_s"])
        cpu_ratios.append(got["before"]["cpu_ms_per_img"] / got["after"]["cpu_ms_per_img"])

    def summary(rs: list[dict]) -> dict:
        v = [x["img_per_s"] for x in rs]
        return {"img_per_s": round(statistics.median(v), 2), "img_per_s_all": [round(x, 2) for x in v],
                "cpu_ms_per_img_all": [round(x["cpu_ms_per_img"], 2) for x in rs],
                "first_s_all": [round(x["first_s"], 2) for x in rs]}

    return {"before": {"overrides": before if lever != "floor" else "hand loop", **summary(runs["before"])},
            "after": {"overrides": after if lever != "floor" else "Trainer.fit", **summary(runs["after"])},
            "ratio_after_over_before": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            # CPU time per image, before/after: less sensitive to foreign load than wall time, blind to parallelism
            "cpu_ratio_before_over_after": round(statistics.median(cpu_ratios), 3),
            "settings": {"recipe": RECIPE, "limit": args.limit, "batch": args.batch, "warmup": args.warmup,
                         "steps": args.steps, "repeats": args.repeats, "set": args.set,
                         "usable_cpus": D.usable_cpus(), "torch_threads": torch.get_num_threads()}}


def merge(name: str, new: dict) -> dict:
    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text())["results"].get("levers", {}) if path.exists() else {}
    old.update(new)
    return {"levers": old}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 train.parquet (the recipe's data.train)")
    ap.add_argument("--levers", nargs="*", default=CHEAP, choices=list(LEVERS))
    ap.add_argument("--limit", type=int, default=3000, help="training images (stratified subset)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="before/after pairs per lever (alternating order)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for both sides of every lever")
    ap.add_argument("--out", default="cpu_levers_cpu")
    ap.add_argument("--step-levers", nargs="*", default=[], choices=STEP_LEVERS,
                    help="also measure these levers step by step, alternating inside one process")
    ap.add_argument("--step-pairs", type=int, default=6, help="alternating step pairs for --step-levers")
    ap.add_argument("--run-timeout", type=float, default=900, help="seconds allowed for one measurement")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON list: overrides and flags
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the clock starts at the end of a step)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child(args)
        return
    new = {}
    for lever in args.step_levers:
        new[f"{lever}/step_interleaved"] = run_child(args, ["--step-interleaved", lever])
        print(f"== {lever} (step by step): after/before = {new[lever + '/step_interleaved']}", flush=True)
    for lever in args.levers:
        new[lever] = measure(lever, args)
        print(f"== {lever}: after/before = {new[lever]['ratio_after_over_before']:.3f} {new[lever]['ratios']}",
              flush=True)
    print(save_result(args.out, merge(args.out, new)))


if __name__ == "__main__":
    main()
