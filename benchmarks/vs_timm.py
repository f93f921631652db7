"""Same data, model shape, recipe, machine and wall-clock budget: vitforge against the timm pipeline and plain PyTorch.

    python benchmarks/vs_timm.py --budgets 600 1200 --contestants vitforge timm       # the CPU comparison (long)
    python benchmarks/vs_timm.py --budgets 600 --contestants plain
    python benchmarks/vs_timm.py --device cuda --budgets 180 --contestants vitforge timm    # GPU (gpu_proof.sh)
    python benchmarks/vs_timm.py --budgets 30 --subset 2000 --val-split 500 --out vs_timm_cpu_tiny   # seconds
    python benchmarks/vs_timm.py --show                                      # table + time-to-accuracy, plot again

Data: the CIFAR-10 parquet, split by vitforge's own `stratified_split` (5,000 stratified validation images, seed 0)
so every contestant trains on the same 45,000 images and is scored on the same held-out set. Model shape: the
seed-001 Mini-ViT (`minivit_cifar`: D 96, depth 9, 12 heads, MLP 2, patch 4, dropout 0.1). Recipe: the numbers of
`recipes/cifar10/minivit.yaml` (AdamW lr / weight decay, warmup fraction, cosine to 0, label smoothing, random crop
pad 4 + flip + AutoAugment CIFAR-10 policy + random erasing, CutMix on half the batches), one augmented copy per
epoch (no repeated augmentation), the same batch size for everyone.

Contestants, each in its own fresh process (imports, data decoding and compilation count):
    vitforge  `python -m vitforge train RECIPE train.budget=B` (--vitforge-mode budget; vitforge fits its schedule to
              the time itself), or (--vitforge-mode epochs, for builds without train.budget) a two-epoch probe run on
              a few batches, then `train.epochs=E` from the speed the probe measured. --vitforge-set key=value adds
              overrides (a recipe change for a recipe result).
    timm      what a timm user writes from timm's own API: timm's `VisionTransformer` of the same dims, a torch
              DataLoader with workers and timm's `fast_collate`, `PrefetchLoader` (normalisation and random erasing
              on the device), `Mixup` (CutMix only) with its label smoothing, `SoftTargetCrossEntropy`,
              `create_optimizer_v2` and `create_scheduler_v2` (cosine with warmup, stepped per update). timm's
              `create_transform` has neither the pad-4 random crop nor AutoAugment's CIFAR-10 policy, so the per-image
              transforms are torchvision's (as timm users do for CIFAR).
    plain     plain PyTorch as seed 001 trained its Mini-ViT: torchvision transforms in a DataLoader (ToTensor,
              Normalize, RandomErasing in the workers), CutMix and the loss mix by hand, AdamW, LambdaLR warmup +
              cosine per step. Its model is vitforge's `minivit_cifar` module itself, so the model implementation is
              held equal and the contest is the data pipeline and loop.

Fairness: each contestant spends a short speed probe inside its budget (timm / plain: a few real steps and one full
evaluation on the real model, whose weights and optimizer state are then restored), then fixes the number of
optimizer steps that fills what is left (evaluations and checkpoints included), so its warmup + cosine schedule
decays to its end at the budget. timm and plain stop early (schedule cut) rather than overrun. Evaluations happen
after every k-th epoch (about --eval-points of them) and at the end, inside the budget. Every run starts cold: a fresh
torch.compile cache and (vitforge) a fresh decode cache. Workers default to the core count; the baselines compile on
CUDA and run eager on CPU unless --baseline-compile says otherwise.

Recorded per (contestant, budget): val top-1 against elapsed seconds since the process was launched, wall seconds
and the fraction of the budget used, images trained, end-to-end img/s, the plan. Then, from vitforge's curves, the
time-to-accuracy ratio: the budget a baseline had divided by the first time any vitforge run reached that baseline's
final accuracy (an evaluation point, no interpolation). Results: <results>/<--out>.json and <--out>.png.

Interruption: each finished (contestant, budget) result is saved as soon as it ends and skipped on a rerun (the same
command continues). A killed timm / plain run resumes from its last per-epoch checkpoint, a killed vitforge run from
its last.pt (`vitforge train --resume`); the time up to that checkpoint counts, the lost part does not, the new
process's start-up does. Work files live in --workdir (default runs/vs_timm/<--out>).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import device_tag, sync  # noqa: E402
from _results import RESULTS_DIR, save_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "cifar10" / "minivit.yaml"
CONTESTANTS = ("vitforge", "timm", "plain")
DATA_CANDIDATES = (REPO.parent / "shared" / "data" / "cifar10" / "train.parquet",
                   REPO / "benchmarks" / "gpu_carry" / "cifar10" / "train.parquet")
# timm VisionTransformer kwargs of the Mini-ViT's dims (one CLS token and learned positions: timm's own layout)
TIMM_MINIVIT = dict(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depth=9, num_heads=12, mlp_ratio=2.0,
                    qkv_bias=False, proj_drop_rate=0.1, attn_drop_rate=0.1)
COMMON_SETTINGS = ("device", "batch", "val_split", "subset", "recipe")


# ---- the recipe's numbers, shared by every contestant ----------------------------------------------------------------
def recipe_numbers(recipe: Path) -> dict:
    from vitforge.config import load_config

    cfg = load_config(str(recipe), [])
    return {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay, "label_smoothing": cfg.train.label_smoothing,
            "warmup_fraction": cfg.schedule.warmup_epochs / cfg.train.epochs, "min_lr": cfg.schedule.min_lr,
            "crop_padding": cfg.data.aug.crop_padding, "random_erasing": cfg.data.aug.random_erasing,
            "cutmix_alpha": cfg.data.mix.cutmix_alpha, "mix_prob": cfg.data.mix.prob,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std)}


# ---- data: the parquet, vitforge's split, decoded once per process ---------------------------------------------------
def split_indices(labels: np.ndarray, val_split: int, subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices exactly as `vitforge.data.dataset.open_data` makes them (split_seed 0, data.limit)."""
    from vitforge.data.split import stratified_split, stratified_subset

    classes = [str(k) for k in range(int(labels.max()) + 1)]
    tr, va = stratified_split(labels, val_split, 0, classes)
    if subset:
        tr = stratified_subset(tr, labels, subset, 0)
    return tr, va


def load_data(path: Path, val_split: int, subset: int | None) -> dict:
    """Decoded uint8 (N, 32, 32, 3) train / val images and int64 labels."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path)
    col = "img" if "img" in table.column_names else "image"
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False), dtype=np.int64)
    blobs = table.column(col).combine_chunks().field("bytes")
    tr, va = split_indices(labels, val_split, subset)

    def decode(idx: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.open(io.BytesIO(blobs[int(i)].as_py())).convert("RGB")) for i in idx])

    return {"train_x": decode(tr), "train_y": labels[tr], "val_x": decode(va), "val_y": labels[va],
            "classes": int(labels.max()) + 1}


class ArrayImages(torch.utils.data.Dataset):
    """Decoded images as PIL images through a per-image transform (what a DataLoader worker runs)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


# ---- the two baselines -----------------------------------------------------------------------------------------------
class Baseline:
    """What a contestant's training script holds: model, optimizer, scheduler, loader and one training step."""

    name = ""
    model: nn.Module  # compiled or not
    raw: nn.Module
    optimizer: torch.optim.Optimizer
    loader: object

    def __init__(self, data: dict, r: dict, args, device: torch.device):
        self.r, self.args, self.device = r, args, device
        self.amp = device.type == "cuda"
        self.batch = args.batch

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.args.compile_baselines else model

    def make_schedule(self, total: int, warmup: int) -> None:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """The scheduler after optimizer step number `step` (1-based)."""
        raise NotImplementedError

    def resume_schedule(self, step: int) -> None:
        """A resumed run: the scheduler where it was after `step` steps (a function of the step)."""
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimmBaseline(Baseline):
    name = "timm"

    def __init__(self, data: dict, r: dict, args, device: torch.device):
        super().__init__(data, r, args, device)
        from timm.data import Mixup
        from timm.data.loader import PrefetchLoader, fast_collate
        from timm.loss import SoftTargetCrossEntropy
        from timm.models.vision_transformer import VisionTransformer
        from timm.optim import create_optimizer_v2
        from torchvision import transforms as T

        self.raw = VisionTransformer(**TIMM_MINIVIT).to(device)
        self.model = self.compile(self.raw)
        extra = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = create_optimizer_v2(self.raw, opt="adamw", lr=r["lr"], weight_decay=r["weight_decay"],
                                             filter_bias_and_bn=False, **extra)  # the recipe decays every parameter
        train_tf = T.Compose([T.RandomCrop(32, padding=r["crop_padding"]), T.RandomHorizontalFlip(),
                              T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.PILToTensor()])  # uint8 for fast_collate
        loader = torch.utils.data.DataLoader(
            ArrayImages(data["train_x"], data["train_y"], train_tf), batch_size=args.batch, shuffle=True,
            num_workers=args.workers, collate_fn=fast_collate, drop_last=True, pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0)
        self.loader = PrefetchLoader(loader, mean=tuple(r["mean"]), std=tuple(r["std"]), device=device,
                                     re_prob=r["random_erasing"], re_mode="const")
        self.mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=r["cutmix_alpha"], prob=r["mix_prob"], switch_prob=0.0,
                           mode="batch", label_smoothing=r["label_smoothing"], num_classes=data["classes"])
        self.criterion = SoftTargetCrossEntropy()
        self.scheduler = None

    def make_schedule(self, total: int, warmup: int) -> None:
        from timm.scheduler import create_scheduler_v2

        # stepped per optimizer update (timm train.py's --sched-on-updates): the schedule length is in updates
        self.scheduler, _ = create_scheduler_v2(self.optimizer, sched="cosine", num_epochs=total, warmup_epochs=warmup,
                                                warmup_lr=self.r["lr"] * 0.0, min_lr=self.r["min_lr"],
                                                step_on_epochs=False, updates_per_epoch=1)

    def after_step(self, step: int) -> None:
        self.scheduler.step_update(num_updates=step)

    def resume_schedule(self, step: int) -> None:
        self.scheduler.step_update(num_updates=step)

    def train_step(self, x, y):
        x, target = self.mixup(x, y)
        with self.autocast():
            loss = self.criterion(self.model(x), target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


class PlainBaseline(Baseline):
    name = "plain"

    def __init__(self, data: dict, r: dict, args, device: torch.device):
        super().__init__(data, r, args, device)
        from torchvision import transforms as T

        from vitforge.models.registry import create_model

        self.raw = create_model("minivit_cifar").to(device)
        self.model = self.compile(self.raw)
        self.optimizer = torch.optim.AdamW(self.raw.parameters(), lr=r["lr"], weight_decay=r["weight_decay"],
                                           fused=True if device.type == "cuda" else None)
        train_tf = T.Compose([T.RandomCrop(32, padding=r["crop_padding"]), T.RandomHorizontalFlip(),
                              T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(),
                              T.Normalize(r["mean"], r["std"]), T.RandomErasing(p=r["random_erasing"])])
        self.batches = torch.utils.data.DataLoader(
            ArrayImages(data["train_x"], data["train_y"], train_tf), batch_size=args.batch, shuffle=True,
            num_workers=args.workers, drop_last=True, pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0)
        self.loader = self
        self.criterion = nn.CrossEntropyLoss(label_smoothing=r["label_smoothing"])
        self.scheduler = None

    def __iter__(self):
        for x, y in self.batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.batches)

    def make_schedule(self, total: int, warmup: int) -> None:
        def factor(step: int) -> float:
            if step < warmup:
                return step / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)

    def after_step(self, step: int) -> None:
        self.scheduler.step()

    def resume_schedule(self, step: int) -> None:
        self.scheduler.last_epoch = step - 1
        self.scheduler.step()

    def cutmix(self, x: torch.Tensor, y: torch.Tensor):
        """CutMix (Yun et al. 2019) on the whole batch with probability mix_prob: (x, y_a, y_b, lam)."""
        if random.random() >= self.r["mix_prob"]:
            return x, y, y, 1.0
        lam = np.random.beta(self.r["cutmix_alpha"], self.r["cutmix_alpha"])
        perm = torch.randperm(x.shape[0], device=x.device)
        H, W = x.shape[2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = np.random.randint(H), np.random.randint(W)
        y1, y2 = np.clip(cy - ch // 2, 0, H), np.clip(cy + ch // 2, 0, H)
        x1, x2 = np.clip(cx - cw // 2, 0, W), np.clip(cx + cw // 2, 0, W)
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / (H * W)
        return x, y, y[perm], lam

    def train_step(self, x, y):
        x, ya, yb, lam = self.cutmix(x, y)
        with self.autocast():
            out = self.model(x)
            loss = lam * self.criterion(out, ya) + (1.0 - lam) * self.criterion(out, yb)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


BASELINES = {"timm": TimmBaseline, "plain": PlainBaseline}


# ---- timing, evaluation, the plan ------------------------------------------------------------------------------------
class Clock:
    """Seconds of this contestant's budget spent: earlier processes' (up to their last checkpoint) + this one's since
    its launch (`t0`, wall clock of the driver)."""

    def __init__(self, t0: float, offset: float = 0.0):
        self.t0, self.offset = t0, offset

    def __call__(self) -> float:
        return self.offset + time.time() - self.t0


@torch.no_grad()
def evaluate(b: Baseline, val_x: torch.Tensor, val_y: torch.Tensor, batch: int) -> float:
    """Top-1 (%) on the held-out images (already normalised on the device)."""
    b.model.eval()
    correct = torch.zeros((), device=val_x.device, dtype=torch.long)
    for i in range(0, len(val_y), batch):
        with b.autocast():
            out = b.model(val_x[i:i + batch])
        correct += (out.argmax(-1) == val_y[i:i + batch]).sum()
    b.model.train()
    return 100.0 * correct.item() / len(val_y)


def eval_every(epochs: float, points: int) -> int:
    """Evaluate after every k-th epoch so that about `points` evaluations happen (the end always evaluates)."""
    return max(1, round(math.ceil(epochs) / max(points, 1)))


def count_evals(total_steps: int, steps_per_epoch: int, points: int) -> int:
    full = total_steps // steps_per_epoch
    k = eval_every(total_steps / steps_per_epoch, points)
    return full // k + (0 if (full % k == 0 and total_steps % steps_per_epoch == 0 and full) else 1)


def plan_steps(left_s: float, step_s: float, eval_s: float, epoch_extra_s: float, steps_per_epoch: int,
               points: int) -> int:
    """Optimizer steps that fill `left_s` seconds, counting the evaluations and per-epoch costs they bring."""
    total = max(1, int(left_s / step_s))
    for _ in range(20):  # fixed point: more steps -> more epochs -> more evaluations -> fewer steps
        epochs = math.ceil(total / steps_per_epoch)
        cost = count_evals(total, steps_per_epoch, points) * eval_s + epochs * epoch_extra_s
        new = max(1, int((left_s - cost) / step_s))
        if new == total:
            break
        total = new
    return total


def probe(b: Baseline, val: tuple, args, clock: Clock) -> dict:
    """A few real steps (the first ones compile) and one full evaluation, timed; then the weights and the optimizer
    state are put back, so training starts from the same initial state as without the probe."""
    model_state = copy.deepcopy(b.raw.state_dict())
    opt_state = copy.deepcopy(b.optimizer.state_dict())
    it = iter(b.loader)

    def batch():
        nonlocal it
        try:
            return next(it)
        except StopIteration:
            it = iter(b.loader)
            return next(it)

    t = clock()
    for _ in range(args.probe_warmup):
        b.train_step(*batch())
    sync(b.device)
    t1 = clock()
    n = 0
    while n < args.probe_steps or clock() - t1 < args.probe_fraction * args.budget:  # at least 1.5% of the budget
        b.train_step(*batch())
        n += 1
        if n % 5 == 0:  # the clock sees the device work now and then
            sync(b.device)
    sync(b.device)
    t2 = clock()
    evaluate(b, *val, args.eval_batch)  # compiles the eval graph when compiled
    t3 = clock()
    eval_s = t3 - t2
    if args.compile_baselines:
        evaluate(b, *val, args.eval_batch)
        eval_s = clock() - t3
    del it
    b.raw.load_state_dict(model_state)
    b.optimizer.load_state_dict(opt_state)
    return {"warmup_steps": args.probe_warmup, "warmup_s": round(t1 - t, 3), "steps": n, "step_s": (t2 - t1) / n,
            "eval_s": eval_s, "probe_s": round(clock() - t, 3)}


def run_baseline(args) -> None:
    """One (timm | plain, budget) run in this process; writes <workdir>/result.json."""
    work = Path(args.workdir)
    ckpt_path, out_path = work / "ckpt.pt", work / "result.json"
    resumed = ckpt_path.is_file()
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=True) if resumed else None
    clock = Clock(args.t0, ck["elapsed"] if ck else 0.0)
    budget = args.budget
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    r = recipe_numbers(Path(args.recipe))
    data = load_data(Path(args.data), args.val_split, args.subset)
    mean = torch.tensor(r["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(r["std"], device=device).view(1, 3, 1, 1)
    val_x = (torch.from_numpy(data["val_x"]).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
    val = (val_x.contiguous(), torch.from_numpy(data["val_y"]).to(device))
    b = BASELINES[args.worker](data, r, args, device)
    spe = len(b.loader)
    setup_s = clock() - (ck["elapsed"] if ck else 0.0)
    if ck:
        b.raw.load_state_dict(ck["model"])
        b.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        plan, points, step, epoch, sessions = ck["plan"], ck["points"], ck["step"], ck["epoch"], ck["sessions"] + 1
    else:
        pr = probe(b, val, args, clock)
        t = clock()
        torch.save({"probe": True, "model": b.raw.state_dict()}, work / "probe_save.pt")  # one checkpoint's cost
        save_s = clock() - t
        (work / "probe_save.pt").unlink()
        left = budget - clock() - args.margin * budget
        total = plan_steps(left, pr["step_s"], pr["eval_s"], save_s, spe, args.eval_points)
        plan = {"probe": pr, "setup_s": round(setup_s, 3), "checkpoint_s": round(save_s, 4), "steps_per_epoch": spe,
                "steps": total, "epochs": round(total / spe, 3), "warmup_steps": round(total * r["warmup_fraction"]),
                "eval_every": eval_every(total / spe, args.eval_points), "planned_at_s": round(clock(), 3)}
        points, step, epoch, sessions = [], 0, 0, 1
        print(f"{b.name} {budget:.0f}s: {total} steps = {total / spe:.2f} epochs at "
              f"{args.batch / pr['step_s']:.0f} img/s (probe), eval {pr['eval_s']:.1f}s, setup {setup_s:.1f}s",
              flush=True)
    b.make_schedule(plan["steps"], plan["warmup_steps"])
    if step:
        b.resume_schedule(step)
    step_s, eval_s = plan["probe"]["step_s"], plan["probe"]["eval_s"]
    cut = None
    loss_sum = torch.zeros((), device=device)
    while step < plan["steps"] and cut is None:
        done_epoch = True
        for x, y in b.loader:
            if step >= plan["steps"]:
                done_epoch = False
                break
            if clock() + step_s + eval_s > budget * (1 - args.margin / 2):  # the plan was optimistic: stop in time
                cut, done_epoch = step, False
                break
            loss_sum += b.train_step(x, y)
            step += 1
            b.after_step(step)
        sync(device)
        epoch += done_epoch
        last = step >= plan["steps"] or cut is not None
        if last or (done_epoch and epoch % plan["eval_every"] == 0):
            top1 = evaluate(b, *val, args.eval_batch)
            points.append({"epoch": round(step / spe, 3), "step": step, "seconds": round(clock(), 3),
                           "val_top1": round(top1, 3)})
            print(f"{b.name} {budget:.0f}s: epoch {step / spe:.2f} step {step} {clock():.1f}s val top-1 {top1:.2f}",
                  flush=True)
        if not last:
            torch.save({"model": b.raw.state_dict(), "optimizer": b.optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "plan": plan, "points": points, "step": step, "epoch": epoch,
                        "sessions": sessions, "elapsed": clock()}, ckpt_path)
    end = clock()
    result = {"plan": plan, "points": points, "steps": step, "images": step * args.batch, "cut_at_step": cut,
              "worker_end_s": round(end, 3), "offset_s": clock.offset, "sessions": sessions,
              "threads": torch.get_num_threads(), "final_loss_sum": float(loss_sum),
              "params": sum(p.numel() for p in b.raw.parameters())}
    out_path.write_text(json.dumps(result, indent=2) + "\n")


# ---- vitforge: the CLI in a child process, its curve stamped as metrics.jsonl grows ----------------------------------
def vitforge_has_budget() -> bool:
    from vitforge.config import TrainConfig

    return "budget" in getattr(TrainConfig, "__dataclass_fields__", {})


def vitforge_overrides(args, work: Path, name: str) -> list[str]:
    o = [f"data.train={args.data}", f"data.val_split={args.val_split}", "data.split_seed=0",
         f"data.batch_size={args.batch}", "data.aug.repeats=1", f"train.device={args.device}",
         f"data.cache_dir={work / 'decode_cache'}", f"run.dir={work}", f"run.name={name}", "run.tensorboard=false",
         "run.progress=plain"]
    if args.subset:
        o.append(f"data.limit={args.subset}")
    return o + list(args.vitforge_set)


def watch(cmd: list[str], env: dict, run_dir: Path, clock: Clock, log: Path, seen: dict[int, dict],
          on_record=None) -> int:
    """Run `cmd`; stamp each new metrics.jsonl record (by epoch) with the clock when it appears (`on_record()` after
    each). Returns the exit status."""
    metrics = run_dir / "metrics.jsonl"
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while True:
            rc = proc.poll()
            if metrics.is_file():
                for line in metrics.read_text().splitlines():
                    rec = json.loads(line) if line.strip() else None
                    if rec is not None and rec["epoch"] not in seen:
                        seen[rec["epoch"]] = {**rec, "seconds": round(clock(), 3)}
                        if on_record is not None:
                            on_record()
            if rc is not None:
                return rc
            time.sleep(0.2)


def child_env(work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor_cache"), PYTHONUNBUFFERED="1")
    return env


def run_vitforge(args, budget: float, work: Path) -> dict:
    """One (vitforge, budget) run: returns the run record (points, plan, wall seconds)."""
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    env = child_env(work)
    base = [sys.executable, "-m", "vitforge", "train"]
    run_dir = work / "run"
    seen: dict[int, dict] = {}  # epoch -> its metrics record, stamped

    def save() -> None:
        state["records"] = [seen[e] for e in sorted(seen)]
        state_path.write_text(json.dumps(state, indent=2) + "\n")

    if (run_dir / "checkpoints" / "last.pt").is_file() and state.get("main_overrides"):  # continue a killed run
        from vitforge.checkpoint import load_checkpoint

        done = load_checkpoint(run_dir, prefer="last")["progress"]["epoch"]  # epochs its last.pt holds
        seen.update({r["epoch"]: r for r in state.get("records", []) if r["epoch"] < done})
        # the time through its last checkpoint counts (saved right after that epoch's record); the rest is lost
        clock = Clock(time.time(), seen[max(seen)]["seconds"] if seen else state["main_started_s"])
        cmd = base + ["--resume", str(run_dir)] + [o for o in state["main_overrides"] if o.startswith("train.")]
    else:  # a fresh start (a main run killed before its first checkpoint starts over: that time is not counted)
        shutil.rmtree(run_dir, ignore_errors=True)
        state = {"sessions": []}
        clock = Clock(time.time(), 0.0)
        overrides = vitforge_overrides(args, work, "run")
        if args.vitforge_mode == "epochs":
            pr = probe_vitforge(args, work, env, clock)
            state["probe"] = pr
            left = budget - clock() - args.margin * budget
            per_epoch = pr["steps_per_epoch"] * pr["step_s"] + pr["epoch_extra_s"]
            epochs = 1
            for e in range(1, 100_000):  # the most epochs whose run (evaluations included) fits what is left
                k = eval_every(e, args.eval_points)
                evals = e // k + (0 if e % k == 0 else 1)
                if pr["setup_s"] + pr["compile_extra_s"] + e * per_epoch + evals * pr["eval_s"] > left:
                    break
                epochs = e
            k = eval_every(epochs, args.eval_points)
            warmup = round(epochs * recipe_numbers(Path(args.recipe))["warmup_fraction"], 4)
            overrides += [f"train.epochs={epochs}", f"train.eval_every={k}", f"schedule.warmup_epochs={warmup}"]
            state["plan"] = {"epochs": epochs, "eval_every": k, "planned_at_s": round(clock(), 3)}
            print(f"vitforge {budget:.0f}s: {epochs} epochs at {args.batch / pr['step_s']:.0f} img/s (probe), "
                  f"eval {pr['eval_s']:.1f}s, setup {pr['setup_s']:.1f}s", flush=True)
        else:
            overrides.append(f"train.budget={int(budget)}")
            state["plan"] = {"budget": int(budget)}
        state["main_overrides"] = overrides
        state["main_started_s"] = round(clock(), 3)
        cmd = base + [str(args.recipe)] + overrides
    state["sessions"].append({"resumed": "--resume" in cmd, "started_s": round(clock(), 3)})
    save()
    rc = watch(cmd, env, run_dir, clock, work / "vitforge.log", seen, save)
    end = clock()
    save()
    if rc != 0:
        tail = (work / "vitforge.log").read_text()[-2000:]
        raise SystemExit(f"vitforge train exited with {rc}; log {work / 'vitforge.log'}:\n{tail}")
    records = [seen[e] for e in sorted(seen)]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    images = sum(r.get("img_per_s", 0) * r.get("epoch_seconds", 0) for r in records)
    points = [{"epoch": r["epoch"] + 1, "step": r.get("step"), "seconds": r["seconds"],
               "val_top1": round(r["val_top1"], 3)} for r in records if r.get("val_top1") is not None]
    return {"plan": state.get("plan"), "probe": state.get("probe"), "points": points, "images": round(images),
            "steps": records[-1].get("step") if records else 0, "wall_s": round(end, 3),
            "train_img_per_s": round(images / max(sum(r.get("epoch_seconds", 0) for r in records), 1e-9), 1),
            "sessions": len(state["sessions"]), "overrides": state["main_overrides"],
            "summary_wall_seconds": summary.get("wall_seconds")}


def probe_vitforge(args, work: Path, env: dict, clock: Clock) -> dict:
    """Three short epochs of a few batches through the same CLI (same decode cache as the real run), evaluating only
    after the third: setup seconds, the first epoch's extra (compilation), seconds per step, the per-epoch cost
    outside the steps (checkpoint, epoch start), seconds per evaluation."""
    steps = max(args.probe_steps, 2)
    overrides = [o for o in vitforge_overrides(args, work, "probe") if not o.startswith("data.limit=")]
    overrides += [f"data.limit={steps * args.batch}", "train.epochs=3", "train.eval_every=3",
                  "schedule.warmup_epochs=0"]
    seen: dict[int, dict] = {}
    shutil.rmtree(work / "probe", ignore_errors=True)
    start = clock()
    rc = watch([sys.executable, "-m", "vitforge", "train", str(args.recipe), *overrides], env, work / "probe", clock,
               work / "vitforge_probe.log", seen)
    if rc != 0 or len(seen) < 3:
        raise SystemExit(f"the vitforge probe failed (exit {rc}); see {work / 'vitforge_probe.log'}")
    e1, e2, e3 = seen[0], seen[1], seen[2]
    step_s = (e2["epoch_seconds"] + e3["epoch_seconds"]) / (e3["step"] - e1["step"])
    extra = max(0.0, (e2["seconds"] - e1["seconds"]) - e2["epoch_seconds"])
    eval_s = max(0.0, (e3["seconds"] - e2["seconds"]) - e3["epoch_seconds"] - extra)
    return {"steps_per_epoch": len(split_indices_from(args)) // args.batch,  # the trainer drops a last partial batch
            "step_s": step_s, "epoch_extra_s": extra, "eval_s": eval_s,
            "setup_s": max(0.0, e1["seconds"] - start - e1["epoch_seconds"]),
            "compile_extra_s": max(0.0, e1["epoch_seconds"] - e1["step"] * step_s),
            "probe_s": round(clock() - start, 3)}


def split_indices_from(args) -> np.ndarray:
    import pyarrow.parquet as pq

    labels = np.asarray(pq.read_table(args.data, columns=["label"]).column("label").to_numpy(), dtype=np.int64)
    return split_indices(labels, args.val_split, args.subset)[0]


# ---- the driver ------------------------------------------------------------------------------------------------------
def run_one(args, contestant: str, budget: float, work: Path) -> dict:
    """Run (or continue) one contestant for one budget in fresh child processes; its record."""
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]  # a shared machine shows here
    if contestant == "vitforge":
        rec = run_vitforge(args, budget, work)
        settings = {"mode": args.vitforge_mode, "overrides": rec.pop("overrides")}
    else:
        out = work / "result.json"
        if not out.is_file():
            t0 = time.time()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contestant, "--budget", str(budget),
                   "--t0", repr(t0), "--workdir", str(work), *worker_argv(args)]
            with open(work / f"{contestant}.log", "a") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(work), cwd=REPO).returncode
            exited = time.time()
            if rc != 0:
                tail = (work / f"{contestant}.log").read_text()[-2000:]
                raise SystemExit(f"{contestant} exited with {rc}; log {work / (contestant + '.log')}:\n{tail}")
            res = json.loads(out.read_text())
            res["wall_s"] = round(res["offset_s"] + exited - t0, 3)
            out.write_text(json.dumps(res, indent=2) + "\n")
        rec = json.loads(out.read_text())
        settings = {"workers": args.workers, "compile": args.compile_baselines, "threads": rec.pop("threads")}
    pts = rec["points"]
    within = [p["val_top1"] for p in pts if p["seconds"] <= budget]
    rec.update(contestant=contestant, budget_s=budget, settings=settings,
               budget_used=round(rec["wall_s"] / budget, 4),
               final_top1=pts[-1]["val_top1"] if pts else None, top1_within_budget=within[-1] if within else None,
               img_per_s_end_to_end=round(rec["images"] / rec["wall_s"], 1),
               loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    for sub in ("decode_cache", "inductor_cache", "run/checkpoints", "probe"):  # large and no longer needed
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "ckpt.pt").unlink(missing_ok=True)
    return rec


def worker_argv(args) -> list[str]:
    argv = ["--device", args.device, "--data", str(args.data), "--recipe", str(args.recipe), "--batch",
            str(args.batch), "--eval-batch", str(args.eval_batch), "--val-split", str(args.val_split),
            "--workers", str(args.workers), "--baseline-compile", "on" if args.compile_baselines else "off",
            "--eval-points", str(args.eval_points), "--probe-steps", str(args.probe_steps), "--probe-warmup",
            str(args.probe_warmup), "--probe-fraction", str(args.probe_fraction), "--margin", str(args.margin)]
    if args.subset:
        argv += ["--subset", str(args.subset)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def analyse(runs: dict) -> dict:
    """Time-to-accuracy of vitforge against each baseline run, and top-1 differences at equal budgets."""
    vf = [r for r in runs.values() if r["contestant"] == "vitforge"]
    tta, equal = {}, {}
    for key, r in sorted(runs.items()):
        if r["contestant"] == "vitforge" or r["top1_within_budget"] is None:
            continue
        target = r["top1_within_budget"]
        hits = sorted((p["seconds"], v["budget_s"]) for v in vf for p in v["points"] if p["val_top1"] >= target)
        t, run_budget = hits[0] if hits else (None, None)
        tta[key] = {"target_top1": target, "baseline_budget_s": r["budget_s"], "vitforge_seconds": t,
                    "vitforge_run_budget_s": run_budget,
                    "ratio": round(r["budget_s"] / t, 3) if t else None}
        same = next((v for v in vf if v["budget_s"] == r["budget_s"]), None)
        if same is not None and same["top1_within_budget"] is not None:
            equal[key] = {"vitforge_top1": same["top1_within_budget"], "baseline_top1": target,
                          "difference": round(same["top1_within_budget"] - target, 3)}
    return {"time_to_accuracy": tta, "equal_budget": equal}


def plot(runs: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"vitforge": "tab:red", "timm": "tab:blue", "plain": "tab:gray"}
    styles = ["-", "--", ":", "-."]
    budgets = sorted({r["budget_s"] for r in runs.values()})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, r in sorted(runs.items()):
        pts = r["points"]
        ax.plot([p["seconds"] / 60 for p in pts], [p["val_top1"] for p in pts], marker="o", ms=3,
                color=colors.get(r["contestant"]), ls=styles[budgets.index(r["budget_s"]) % len(styles)],
                label=f"{r['contestant']} ({r['budget_s'] / 60:g} min budget)")
    for b in budgets:
        ax.axvline(b / 60, color="k", lw=0.5, alpha=0.3)
    ax.set_xlabel("wall-clock minutes since launch (setup, compilation and evaluation included)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show(results: dict) -> None:
    print(f"{'run':16s} {'wall s':>8s} {'used':>6s} {'epochs':>7s} {'img/s e2e':>10s} {'top-1':>7s}")
    for key, r in sorted(results["runs"].items(), key=lambda kv: (kv[1]["budget_s"], kv[0])):
        epochs = r["points"][-1]["epoch"] if r["points"] else 0
        top1 = r["top1_within_budget"]
        print(f"{key:16s} {r['wall_s']:8.1f} {r['budget_used']:6.1%} {epochs:7.2f} {r['img_per_s_end_to_end']:10.1f} "
              f"{'-' if top1 is None else f'{top1:7.2f}'}")
    for key, a in results["analysis"]["time_to_accuracy"].items():
        got = "not reached" if a["vitforge_seconds"] is None else \
            f"{a['vitforge_seconds']:.0f}s (ratio {a['ratio']:.2f}x, vitforge {a['vitforge_run_budget_s']:g}s run)"
        print(f"vitforge to {key}'s {a['target_top1']:.2f}%: {got}")
    for key, a in results["analysis"]["equal_budget"].items():
        print(f"equal budget {key}: vitforge {a['vitforge_top1']:.2f}% vs {a['baseline_top1']:.2f}% "
              f"({a['difference']:+.2f})")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[600.0, 1200.0], help="seconds per contestant")
    p.add_argument("--contestants", nargs="+", default=list(CONTESTANTS), choices=CONTESTANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--data", type=Path, default=next((d for d in DATA_CANDIDATES if d.is_file()), DATA_CANDIDATES[0]))
    p.add_argument("--recipe", type=Path, default=RECIPE, help="recipe whose numbers every contestant uses")
    p.add_argument("--batch", type=int, default=None, help="batch size of every contestant (CPU 512, CUDA 1024)")
    p.add_argument("--eval-batch", type=int, default=1000)
    p.add_argument("--val-split", type=int, default=5000, help="stratified held-out images (seed 0)")
    p.add_argument("--subset", type=int, default=None, help="train on a stratified subset of this many images")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers of timm / plain")
    p.add_argument("--threads", type=int, default=None, help="torch threads of timm / plain (default torch's)")
    p.add_argument("--baseline-compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile for timm / plain (auto: on CUDA only)")
    p.add_argument("--eval-points", type=int, default=5, help="about this many evaluations per run (+ the last)")
    p.add_argument("--probe-steps", type=int, default=None, help="timed probe steps, at least (CPU 4, CUDA 30)")
    p.add_argument("--probe-fraction", type=float, default=0.015, help="timed probe steps last this share of the "
                   "budget at least")
    p.add_argument("--probe-warmup", type=int, default=None, help="probe steps before timing (CPU 1, CUDA 10)")
    p.add_argument("--margin", type=float, default=0.02,
                   help="share of the budget kept free (process exit, timing noise)")
    p.add_argument("--vitforge-mode", choices=("budget", "epochs"), default="budget",
                   help="budget: train.budget=B; epochs: train.epochs from a probe run (builds without train.budget)")
    p.add_argument("--vitforge-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the vitforge run (repeatable)")
    p.add_argument("--out", default=None, help="results file stem (default vs_timm_<device>)")
    p.add_argument("--workdir", type=Path, default=None, help="work files (default runs/vs_timm/<out>)")
    p.add_argument("--fresh", action="store_true", help="forget the runs already in the results file")
    p.add_argument("--show", action="store_true", help="print the results (and redraw the plot), run nothing")
    p.add_argument("--worker", choices=list(BASELINES), help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    for key, gpu, cpu in (("batch", 1024, 512), ("probe_steps", 30, 4), ("probe_warmup", 10, 1)):
        if getattr(args, key) is None:
            setattr(args, key, gpu if cuda else cpu)
    args.compile_baselines = args.baseline_compile == "on" or (args.baseline_compile == "auto" and cuda)
    if args.batch % 2:
        p.error("--batch must be even (timm's Mixup pairs the batch with its flip)")
    bad = [o for o in args.vitforge_set if "=" not in o]
    if bad:
        p.error(f"--vitforge-set wants KEY=VALUE, got {bad[0]!r}")
    if args.worker is None and not args.show and not args.data.is_file():
        p.error(f"{args.data} not found; pass --data PATH")
    args.out = args.out or f"vs_timm_{device_tag(torch.device(args.device))}"
    args.workdir = args.workdir or REPO / "runs" / "vs_timm" / args.out
    args.data, args.recipe = args.data.resolve(), args.recipe.resolve()
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_baseline(args)
        return
    path = RESULTS_DIR / f"{args.out}.json"
    old = json.loads(path.read_text())["results"] if path.is_file() and not args.fresh else None
    if args.show:
        if old is None:
            raise SystemExit(f"{path}: no results yet")
        plot(old["runs"], path.with_suffix(".png"), old["settings"]["title"])
        show(old)
        return
    settings = {"device": device_tag(torch.device(args.device)), "batch": args.batch, "val_split": args.val_split,
                "subset": args.subset, "recipe": args.recipe.relative_to(REPO).as_posix()
                if args.recipe.is_relative_to(REPO) else str(args.recipe), "data": args.data.name,
                "eval_points": args.eval_points, "margin": args.margin, "cold_start": True}
    settings["title"] = (f"Mini-ViT on CIFAR-10 ({settings['device']}, {os.cpu_count()} cores), same wall-clock budget"
                         + (f", {args.subset} train images" if args.subset else ""))
    if old is not None:
        differ = [k for k in COMMON_SETTINGS if old["settings"].get(k) != settings[k]]
        if differ:
            raise SystemExit(f"{path} holds runs made with other settings ({', '.join(differ)}); pass --out NAME "
                             f"for a separate file or --fresh to replace it")
    if "vitforge" in args.contestants and args.vitforge_mode == "budget" and not vitforge_has_budget():
        raise SystemExit("this vitforge has no train.budget: use --vitforge-mode epochs")
    runs = dict(old["runs"]) if old else {}
    command = " ".join(["python", *sys.argv])
    for budget in args.budgets:
        for c in args.contestants:
            key = f"{c}/{budget:g}"
            if key in runs:
                print(f"{key}: done earlier (top-1 {runs[key]['top1_within_budget']}), skipped")
                continue
            print(f"{key}: running", flush=True)
            runs[key] = run_one(args, c, budget, args.workdir / key.replace("/", "_"))
            r = runs[key]
            print(f"{key}: top-1 {r['top1_within_budget']} in {r['wall_s']:.1f}s ({r['budget_used']:.1%} of the "
                  f"budget), {r['img_per_s_end_to_end']:.0f} img/s end to end", flush=True)
            results = {"settings": settings, "runs": runs, "analysis": analyse(runs)}
            save_result(args.out, results, command=command)
            plot(runs, path.with_suffix(".png"), settings["title"])
    results = {"settings": settings, "runs": runs, "analysis": analyse(runs)}
    print("->", save_result(args.out, results, command=command))
    show(results)


if __name__ == "__main__":
    main()
