"""Time the selective-scan forms at the shapes MambaVision runs them (a script; pytest never collects it).

For each model the scan shapes come from a forward pass on the `meta` device (no compute): per hybrid stage, the
number of sequences (images x windows), channels h = C/2, length L = ws² and state size N. Each form is timed forward
(no grad; "auto" then picks the loop on CPU) and forward+backward (grads for u, δ, A, B, C, D, δ-bias): minimum,
median and standard deviation over `--reps` runs after one warm-up. On a shared machine the minimum is the least
disturbed run; the load average before and after is recorded. Results: benchmarks/results/scan_<device>.json.

    python benchmarks/scan.py                       # CPU, T at 224 and the CIFAR variant at 32
    python benchmarks/scan.py --device cuda --images 64 --chunks 16 32 64
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks._results` when run as a script

from benchmarks._results import save_result  # noqa: E402
from vitforge.models.layers.ssm_scan import kernel_available, resolve_impl, selective_scan_fn  # noqa: E402
from vitforge.models.mambavision import MambaVisionMixer  # noqa: E402
from vitforge.models.registry import create_model  # noqa: E402


def scan_shapes(model_name: str, images: int) -> list[dict]:
    """One entry per hybrid stage: the (sequences, h, L, N) its mixers scan, from a meta-device forward."""
    with torch.device("meta"):
        model = create_model(model_name).eval()
    _, H, W = model.pretrained_cfg["input_size"]
    seen: dict[str, dict] = {}

    def hook(name):
        def record(mod: MambaVisionMixer, args):
            seqs, L, C = args[0].shape  # (B·windows, ws², C)
            seen.setdefault(name, dict(level=name, seqs=seqs, h=mod.D.shape[0], L=L, N=mod.d_state))
        return record

    for i, level in enumerate(model.levels):
        mixers = [m for m in level.modules() if isinstance(m, MambaVisionMixer)]
        if mixers:
            mixers[0].register_forward_pre_hook(hook(f"levels.{i}"))
    with torch.no_grad():
        model(torch.empty(images, 3, H, W, device="meta"))
    return [dict(model=model_name, img=(H, W), **s) for s in seen.values()]


def make_inputs(case: dict, device: str, grad: bool) -> tuple[torch.Tensor, ...]:
    """Inputs shaped like the mixer's call: u, δ (seqs, h, L); A (h, N); B, C (seqs, N, L); D, δ-bias (h,)."""
    g = torch.Generator().manual_seed(0)
    S, h, L, N = case["seqs"], case["h"], case["L"], case["N"]
    tensors = (
        torch.randn(S, h, L, generator=g),
        0.5 * torch.randn(S, h, L, generator=g),
        -torch.arange(1, N + 1, dtype=torch.float32).repeat(h, 1),  # A = -exp(A_log) at init
        torch.randn(S, N, L, generator=g),
        torch.randn(S, N, L, generator=g),
        torch.ones(h),
        torch.zeros(h),
    )
    return tuple(t.to(device).requires_grad_(grad) for t in tensors)


def time_ms(fn, reps: int, device: str) -> dict:
    """Minimum, median and standard deviation of `fn()` wall time in ms, after one warm-up call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    std = statistics.stdev(times) if reps > 1 else 0.0
    return {"min": round(min(times), 3), "median": round(statistics.median(times), 3), "std": round(std, 3)}


def bench_form(case: dict, impl: str, chunk: int, reps: int, device: str) -> dict:
    """Forward (no grad) and forward+backward times of one form on one shape."""
    u, dt, A, B, C, D, db = make_inputs(case, device, grad=True)

    def run():
        return selective_scan_fn(u, dt, A, B, C, D, None, db, True, impl=impl, chunk_size=chunk)

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        run().sum().backward()

    name = f"chunked{chunk}" if impl == "chunked" else impl
    return dict(form=name, fwd_ms=time_ms(fwd, reps, device), fwd_bwd_ms=time_ms(fwd_bwd, reps, device))


def auto_picks(case: dict, device: str) -> dict:
    """What `impl="auto"` runs at this shape, for inference and for training."""
    probe = torch.empty(1, 1, case["L"], device=device)
    return {"auto_inference": resolve_impl("auto", probe, needs_grad=False),
            "auto_training": resolve_impl("auto", probe, needs_grad=True)}


def forms(device: str, chunks: list[int]) -> list[tuple[str, int]]:
    out = [("loop", 0), ("doubling", 0), *[("chunked", c) for c in chunks]]
    if device == "cuda" and kernel_available():
        out.append(("cuda", 0))
    return out


def device_kind(device: str) -> str:
    """'cpu', or a short GPU tag such as 'h100' for file names."""
    if device != "cuda":
        return "cpu"
    match = re.search(r"[a-z]+\d+", torch.cuda.get_device_name(0).lower().replace("nvidia", ""))
    return match.group(0) if match else "cuda"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", nargs="+", default=["mambavision_t", "mambavision_cifar"])
    p.add_argument("--images", type=int, default=8, help="images per batch (sequences = images x windows)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16], help="chunk sizes of the chunked form")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--name", default=None, help="result file stem (default scan_<device kind>)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for model in args.models:
        for case in scan_shapes(model, args.images):
            for impl, chunk in forms(args.device, args.chunks):
                row = {**case, **auto_picks(case, args.device), **bench_form(case, impl, chunk, args.reps, args.device)}
                rows.append(row)
                print({k: row[k] for k in ("model", "level", "seqs", "h", "L", "form", "fwd_ms", "fwd_bwd_ms")},
                      flush=True)
    results = dict(device=args.device, images=args.images, reps=args.reps, threads=torch.get_num_threads(), rows=rows,
                   loadavg_before=load_before, loadavg_after=os.getloadavg(), kernel_available=kernel_available())
    print("wrote", save_result(args.name or f"scan_{device_kind(args.device)}", results))


if __name__ == "__main__":
    main()
