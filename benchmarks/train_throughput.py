"""Training throughput of our ViTs against timm's `VisionTransformer` of the same shape, same harness, same process.

    python benchmarks/train_throughput.py                          # CPU smoke: batch 32, eager, few steps
    python benchmarks/train_throughput.py --device cuda --modes default   # H100: batch 512, bf16, compile default
    python benchmarks/train_throughput.py --device cuda --modes max-autotune --pairs deit_kd

Pairs (ours vs timm, 32x32 inputs, patch 4, 10 classes, random weights; timm gets our model's dropout and drop-path
rates, which cost time too):
    deit_kd      ours `deit_kd_cifar` (the KD ViT of kiki101robo/AIRL_VIT-and-SAM2: conv stem, CLS + DIST, rel-pos
                 bias, 4 class-attention blocks) vs timm ViT dim 256 / depth 12 / 8 heads / MLP 4
    deit_kd_ref  the same, ours computed the way it was first written (unfold stem, one bias gather per block, full
                 attention in the class-attention blocks; same function, tests/models/test_vit_fast_paths.py): the
                 baseline of our speed-ups
    vit256       ours plain `VisionTransformer` with exactly timm's layout and function (CLS, learned positions)
                 vs the same timm ViT: the implementation comparison
    minivit      ours `minivit_cifar` (the Mini-ViT of AnanasClassic/ViT_SE_project) vs timm ViT dim 96 / depth 9 /
                 12 heads / MLP 2

One training step = forward under autocast (bf16 on CUDA), cross-entropy (mean over the heads of a two-head model),
backward, AdamW step (fused on CUDA), zero_grad(set_to_none). Inputs are a fixed random batch already on the device
(the data pipeline is measured by `aug_pipeline.py`). `torch.compile` wraps the model; its first-step time is
reported separately as `compile_s`. `max-autotune` and `reduce-overhead` use CUDA graphs. After warm-up the models
are timed in interleaved windows (ours, timm, ours, timm, ...) so slow drifts of clock or temperature hit both;
img/s is the median over windows. Results are merged into benchmarks/results/<--out>.json under "<pair>/<mode>"
keys (each with its settings), so one run per compile mode (each GPU command is limited to 10 minutes) accumulates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import device_tag, sync  # noqa: E402
from _results import RESULTS_DIR, save_result  # noqa: E402

DEIT_KD = dict(embed_dim=256, depth=12, num_heads=8, mlp_ratio=4.0, proj_drop_rate=0.05, attn_drop_rate=0.05,
               drop_path_rate=0.15)
TIMM_SHAPES = {  # timm VisionTransformer kwargs per pair
    "deit_kd": DEIT_KD,
    "deit_kd_ref": DEIT_KD,
    "vit256": dict(embed_dim=256, depth=12, num_heads=8, mlp_ratio=4.0),
    "minivit": dict(embed_dim=96, depth=9, num_heads=12, mlp_ratio=2.0, proj_drop_rate=0.1, attn_drop_rate=0.1),
}


class FirstWrittenDeiT(nn.Module):
    """`deit_kd_cifar` computed as first written (the baseline of the fast paths; same parameters and function)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        m = self.model
        pe = m.patch_embed
        t = pe.act(pe.bn(pe.conv(x)))  # (B, C, H, W)
        t = pe.proj(nn.functional.unfold(t, pe.patch_size, stride=pe.patch_size).transpose(1, 2))  # (B, N, D)
        t = m.pos_drop(torch.cat([*m.prefix_tokens(x.shape[0]), t], dim=1) + m.pos_embed)
        for i, blk in enumerate(m.blocks):
            bias = m.rel_pos[i]()
            if blk.__class__.__name__ != "ClassTokenBlock":
                t = blk(t, bias)
                continue
            k = blk.num_cls
            cls = t[:, :k] + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(t), bias)[:, :k]))  # full N x N attention
            cls = cls + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(cls))))
            t = torch.cat([cls, t[:, k:]], dim=1)
        return m.forward_head(m.norm(t))


def build_pair(pair: str) -> dict[str, nn.Module]:
    """{"ours": model, "timm": model} for a pair, random weights, 10 classes, 32x32."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from vitforge.models.registry import create_model
    from vitforge.models.vit import VisionTransformer

    common = dict(img_size=32, patch_size=4, num_classes=10)
    timm_model = TimmViT(**common, **TIMM_SHAPES[pair])
    if pair == "deit_kd":
        ours = create_model("deit_kd_cifar")
    elif pair == "deit_kd_ref":
        ours = FirstWrittenDeiT(create_model("deit_kd_cifar"))
    elif pair == "minivit":
        ours = create_model("minivit_cifar")
    else:
        ours = VisionTransformer(**common, **TIMM_SHAPES[pair])
    return {"ours": ours, "timm": timm_model}


def loss_of(out, y: torch.Tensor) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum(nn.functional.cross_entropy(o.float(), y) for o in outs) / len(outs)


class Runner:
    """One model's training step with its optimizer, compiled as asked."""

    def __init__(self, model: nn.Module, *, device, mode: str, amp: bool, channels_last: bool, batch: int):
        self.device = device
        model = model.to(device).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.params = sum(p.numel() for p in model.parameters())
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda" or None)
        self.model = model if mode == "off" else torch.compile(model, mode=None if mode == "default" else mode)
        self.amp = amp
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = loss_of(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, steps: int) -> float:
        """Seconds for `steps` steps, device work included."""
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return time.perf_counter() - t0


def run_pair(pair: str, mode: str, args, device: torch.device) -> dict:
    """Compile + warm up both models, then interleaved timing windows. Returns {impl: record}."""
    runners, out = {}, {}
    for impl, model in build_pair(pair).items():
        r = Runner(model, device=device, mode=mode, amp=args.amp, channels_last=args.channels_last, batch=args.batch)
        first = r.timed(1)  # compilation (and autotuning / graph capture) happens here
        warm = r.timed(args.warmup)
        runners[impl] = r
        out[impl] = {"params": r.params, "compile_s": round(first, 3), "warmup_s": round(warm, 3), "windows": []}
        print(f"{pair:8s} {impl:5s} {mode:14s} params {r.params:,}  first step {first:.1f} s", flush=True)
    for _ in range(args.repeats):
        for impl, r in runners.items():
            out[impl]["windows"].append(args.batch * args.steps / r.timed(args.steps))
    for impl, rec in out.items():
        w = rec["windows"]
        rec.update(img_per_s=round(statistics.median(w), 1), img_per_s_std=round(statistics.pstdev(w), 1),
                   windows=[round(v, 1) for v in w])
        print(f"{pair:8s} {impl:5s} {mode:14s} {rec['img_per_s']:10.1f} img/s (std {rec['img_per_s_std']:.1f})")
    out["ratio_ours_over_timm"] = round(out["ours"]["img_per_s"] / out["timm"]["img_per_s"], 3)
    print(f"{pair:8s} ratio ours/timm {out['ratio_ours_over_timm']:.3f}", flush=True)
    return out


def merge(name: str, new: dict) -> dict:
    """Previous results of the same file (other compile modes) + these."""
    path = RESULTS_DIR / f"{name}.json"
    old = json.loads(path.read_text())["results"].get("runs", {}) if path.exists() else {}
    return {**old, **new}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--pairs", nargs="+", default=["deit_kd", "vit256", "minivit"], choices=list(TIMM_SHAPES))
    p.add_argument("--modes", nargs="+", default=None,
                   help="off default reduce-overhead max-autotune (default: default on CUDA, off on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 512 on CUDA, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per timing window (default 50 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="steps after the first (default 10 CUDA, 1 CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timing windows per model (default 5 CUDA, 2 CPU)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 (default: bf16 autocast on CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs (conv stems)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", default=None, help="results file stem (default train_throughput_<cpu|gpu name>)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    for key, gpu, cpu in (("batch", 512, 32), ("steps", 50, 2), ("warmup", 10, 1), ("repeats", 5, 2)):
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    args.modes = args.modes or (["default"] if cuda else ["off"])
    args.amp = args.amp and cuda
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = {k: getattr(args, k) for k in ("batch", "steps", "warmup", "repeats", "amp", "channels_last")}
    settings.update(threads=torch.get_num_threads(), device=device_tag(device))
    runs = {}
    for mode in args.modes:
        for pair in args.pairs:
            runs[f"{pair}/{mode}"] = {**run_pair(pair, mode, args, device), "settings": settings}
    name = args.out or f"train_throughput_{device_tag(device)}"
    path = save_result(name, {"runs": merge(name, runs)})
    print("->", path)


if __name__ == "__main__":
    main()
