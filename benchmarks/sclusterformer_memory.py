"""Peak memory of one SClusterFormer-RGB training step: the stride-1 configuration of the Kaggle RGB adaptation in
rajanikant04/plant_disease_classification (commit af233c0) vs the optimized one.

One step = forward, cross-entropy, backward, AdamW step (the Kaggle recipe's optimizer), fp32, random data, 4 classes.
Configurations (all `sclusterformer_rgb` widths: stem 64, one stage of width 32, depth 2, 8 cluster heads of width 24):

  stride1_seed    every pixel a token (first embeddings 3x3 stride 1, no token cap), with the upstream
                  formulation that adaptation ran: broadcast cluster attention, materialised fusion attention matrix
  stride1_lean    the same tokens with vitforge's default matmul cluster attention and SDPA fusion
  optimized_seed  4x4 stride-4 embeddings, 16² tokens, pooled to 64, with the upstream formulation
  optimized       the same with vitforge's defaults (what `sclusterformer_rgb` builds)

With every pixel a token the fusion's token-mixing projection is an N x N Conv1d (N = 4,096 or 9,216), so that
configuration also carries 17M / 85M extra parameters; it is the consistent form of the fusion, not that
adaptation's code (which did not run as committed: see `SClusterFormerRGB`'s docstring).

Every configuration runs in a fresh subprocess. On CUDA the number is `torch.cuda.max_memory_allocated`; on CPU it
is the peak resident set size of that process (VmHWM, reset to the current RSS just before the step through
/proc/self/clear_refs, so import-time peaks do not count), reported with the RSS just before the step (Python, torch,
model, optimizer, batch) and the difference. A small warm-up step on a throwaway model comes first, so that
first-use costs (library code paged in, kernel caches, cuBLAS/oneDNN workspaces) are not charged to the step.

Before running anything, the live-tensor peak of the step is estimated from the tensor sizes with PyTorch's
MemTracker under FakeTensorMode (no memory is allocated). On CPU, a configuration whose estimate exceeds
`--ram-budget-gib` is not run at its batch size: it is measured at the two largest smaller batch sizes that fit and
extrapolated linearly in the batch size, and marked `"measured": false`.

    python -m benchmarks.sclusterformer_memory            # from the repository root; CPU, or the GPU if there is one
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks._results import save_result
from vitforge.models.registry import create_model

STRIDE1 = dict(first_kernel=3, first_stride=1, first_padding=1, token_cap=None)
SEED_IMPL = dict(cluster_impl="broadcast", attn_impl="manual")
CONFIGS = {
    "stride1_seed": {**STRIDE1, **SEED_IMPL},
    "stride1_lean": STRIDE1,
    "optimized_seed": SEED_IMPL,
    "optimized": {},
}
NUM_CLASSES = 4
MIB = 2**20


def build(config: str, img: int, device: str):
    model = create_model("sclusterformer_rgb", img_size=img, num_classes=NUM_CLASSES, **CONFIGS[config])
    if device != "cpu":  # (a no-op .to("cpu") fails under FakeTensorMode once MemTracker holds weakrefs)
        model.to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def batch(n: int, img: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, img, img, device=device), torch.arange(n, device=device) % NUM_CLASSES


def tokens(config: str, img: int) -> int:
    model = create_model("sclusterformer_rgb", img_size=img, **CONFIGS[config])
    return model.fusion.token_proj.out_channels  # tokens per branch entering the fusion


@functools.cache
def estimate_mib(config: str, img: int, n: int) -> dict | None:
    """Live-tensor bytes of one step from the tensor sizes alone (MemTracker under FakeTensorMode), in MiB."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        return None
    with FakeTensorMode():
        model, opt = build(config, img, "cpu")
        tracker = MemTracker()
        tracker.track_external(model, opt)
        with tracker:
            train_step(model, opt, *batch(n, img, "cpu"))
        peak = tracker.get_tracker_snapshot("peak")
    by_kind = next(iter(peak.values()))  # one device
    return {str(k).split(".")[-1].lower(): round(v / MIB, 1) for k, v in by_kind.items()}


def dominant_tensors_mib(config: str, img: int, n: int) -> dict:
    """Closed-form sizes of the largest single tensors (fp32): a (B·heads, centres, tokens, head width) cluster
    tensor of the broadcast formulation, and one (B, heads, tokens, tokens) fusion attention matrix."""
    model = create_model("sclusterformer_rgb", img_size=img, **CONFIGS[config])
    attn = model.upper.stages[0][0].attn
    n_tok, n_fuse = model.upper.out_grid[0] * model.upper.out_grid[1], model.fusion.token_proj.out_channels
    M = attn.centres[0] * attn.centres[1]
    return {
        "cluster_bmnd": round(n * attn.heads * M * n_tok * attn.head_dim * 4 / MIB, 1),
        "fusion_attention": round(n * model.fusion.heads * n_fuse * n_fuse * 4 / MIB, 1),
    }


# ---- measuring in a fresh process ---------------------------------------------------------------------------------
def child(spec: dict) -> dict:
    """Run one training step as specified; return the memory numbers (called inside the subprocess)."""
    device, img, n = spec["device"], spec["img"], spec["batch"]
    torch.manual_seed(0)
    warm_up(spec["config"], device)
    model, opt = build(spec["config"], img, device)
    x, y = batch(n, img, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_peak_rss()
    t0 = time.perf_counter()
    train_step(model, opt, x, y)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status_bytes("VmHWM")
    return {"peak_mib": round(peak / MIB, 1), "before_step_mib": round(before / MIB, 1),
            "step_mib": round((peak - before) / MIB, 1), "step_s": round(time.perf_counter() - t0, 2)}


def warm_up(config: str, device: str) -> None:
    """One small step on a throwaway model (32 x 32, batch 2), so that library code paged in on first use, kernel
    caches and workspaces (oneDNN, cuBLAS) are in place before the measured step and do not count as its memory."""
    model, opt = build(config, 32, device)
    train_step(model, opt, *batch(2, 32, device))
    del model, opt
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024  # kB


def _reset_peak_rss() -> int:
    """Reset the peak RSS to the current RSS (Linux >= 4.0), so that import-time peaks do not hide the step's;
    return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_bytes("VmRSS")


@functools.cache
def measure(config: str, img: int, n: int, device: str) -> dict:
    spec = json.dumps(dict(config=config, img=img, batch=n, device=device))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sclusterformer_memory", "--child", spec], cwd=root,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"error": tail[0], "oom": "out of memory" in proc.stderr.lower()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) / 2**20


# ---- one table row -------------------------------------------------------------------------------------------------
def run_row(config: str, img: int, n: int, device: str, budget_gib: float) -> dict:
    est = estimate_mib(config, img, n)
    row = {"config": config, "img": img, "batch": n, "tokens_into_fusion": tokens(config, img),
           "estimate_live_tensors_mib": est, "dominant_tensors_mib": dominant_tensors_mib(config, img, n)}
    fits = device == "cuda" or est is None or est["total"] / 1024 <= min(budget_gib, 0.8 * available_gib())
    if fits:
        row.update(measure(config, img, n, device), measured=True)
        return row
    row.update(measured=False, **extrapolate(config, img, n, budget_gib))
    return row


def extrapolate(config: str, img: int, n: int, budget_gib: float) -> dict:
    """Measure at the two largest batch sizes below `n` whose estimate fits the budget; extend linearly to `n`."""
    limit = min(budget_gib, 0.8 * available_gib())
    fitting = [b for b in (1, 2, 4, 8, 16) if b < n and estimate_mib(config, img, b)["total"] / 1024 <= limit]
    if len(fitting) < 2:
        return {"estimated": {"note": "no two smaller batch sizes fit the RAM budget"}}
    b1, b2 = fitting[-2:]
    m1, m2 = (measure(config, img, b, "cpu") for b in (b1, b2))
    if "error" in m1 or "error" in m2:
        return {"estimated": {"note": "a smaller-batch measurement failed", "runs": {b1: m1, b2: m2}}}
    slope = (m2["peak_mib"] - m1["peak_mib"]) / (b2 - b1)
    return {"estimated": {
        "peak_mib": round(m2["peak_mib"] + slope * (n - b2), 1),
        "method": f"linear in batch size through the measured peaks at batch {b1} and {b2}",
        "measured_at": {b1: m1, b2: m2},
    }}


def peak_of(row: dict) -> float | None:
    return row.get("peak_mib", (row.get("estimated") or {}).get("peak_mib"))


def summarize(rows: list[dict]) -> list[dict]:
    """Per (image size, batch): tokens and peak ratios of the stride-1 configuration to the optimized ones."""
    by = {(r["config"], r["img"], r["batch"]): r for r in rows}
    out = []
    for img, n in sorted({(r["img"], r["batch"]) for r in rows}):
        s1, opt_seed, opt = (by.get((c, img, n)) for c in ("stride1_seed", "optimized_seed", "optimized"))
        if not (s1 and opt_seed and opt) or None in (peak_of(s1), peak_of(opt_seed), peak_of(opt)):
            continue
        out.append({
            "img": img, "batch": n, "tokens": [s1["tokens_into_fusion"], opt["tokens_into_fusion"]],
            "token_reduction": s1["tokens_into_fusion"] / opt["tokens_into_fusion"],
            "stride1_seed_measured": s1["measured"],
            "peak_ratio_same_formulation": round(peak_of(s1) / peak_of(opt_seed), 1),
            "peak_ratio_vs_default": round(peak_of(s1) / peak_of(opt), 1),
            "live_tensor_ratio_same_formulation": round(s1["estimate_live_tensors_mib"]["total"]
                                                        / opt_seed["estimate_live_tensors_mib"]["total"], 1),
        })
    return out


def device_kind() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    return next((k for k in ("h200", "h100", "a100", "l4", "t4", "v100") if k in name), "cuda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--ram-budget-gib", type=float, default=8.0, help="CPU: largest estimated step to run as is")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for config in args.configs:
        for img in args.sizes:
            for n in args.batches:
                rows.append(run_row(config, img, n, device, args.ram_budget_gib))
                print(json.dumps(rows[-1]), flush=True)
    kind = device_kind()
    results = {"device": device, "metric": "cuda max_memory_allocated" if device == "cuda" else "peak RSS (VmHWM)",
               "dtype": "float32", "optimizer": "AdamW", "ram_budget_gib": args.ram_budget_gib,
               "summary": summarize(rows), "rows": rows}
    command = " ".join(["python -m benchmarks.sclusterformer_memory", *sys.argv[1:]])
    print(save_result(f"sclusterformer_memory_{kind}", results, command=command))


if __name__ == "__main__":
    main()
