"""Images per second of the training data pipeline alone at 32x32 (no model), through the library's own stream.

    python benchmarks/aug_pipeline.py                                  # CPU: device path on the CPU + 2 workers
    python benchmarks/aug_pipeline.py --device cuda --workers 4 8 16   # H100 (the bar: >= 100,000 img/s)
    python benchmarks/aug_pipeline.py --device cuda --workers --compile-policies   # + torch.compile'd policy ops

Each configuration builds `vitforge.data.streams.build_train_stream` exactly as the trainer does and drains batches:
uint8 images -> random crop (pad 4) -> flip -> [per-sample policy] -> normalise -> RandomErasing 0.25 ->
Mixup 0.4 / CutMix 1.0 (per-batch switch). Paths:

    device   decoded images on the training device, everything batched there (`gpu_policies` for the policies)
    workers  per-sample torchvision v2 transforms in N DataLoader worker processes, then the batched tail

Policies: none, autoaugment (CIFAR-10), trivialaugment (wide), randaugment (n2m9). Data: the CIFAR-10 parquet
(45,000 training images after the 5,000 validation hold-out), or `--synthetic` random images of the same shape.
Time = batches after 2 warm-up batches, ending with a device synchronisation; img/s is the median of `--repeats`.
`--compile-policies` routes the device policies' op application through torch.compile (`gpu_policies.compile_policy`);
its compilation happens in the warm-up of the first repeat and is reported as `first_warmup_s`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import device_tag, sync  # noqa: E402
from _results import save_result  # noqa: E402

from vitforge.config import AugConfig, DataConfig, MixConfig  # noqa: E402
from vitforge.data.dataset import Split, open_data
from vitforge.data.gpu_policies import compile_policy  # noqa: E402
from vitforge.data.preprocess import Preprocess
from vitforge.data.sources import ArraySource  # noqa: E402
from vitforge.data.streams import StreamOptions, build_train_stream

REPO = Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10" / "train.parquet"
POLICIES = {"none": {}, "autoaugment": {"auto_augment": "cifar10"}, "trivialaugment": {"trivial_augment": True},
            "randaugment": {"rand_augment": "n2m9"}}
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def train_split(args) -> Split:
    """The training split the recipes use (stratified 5,000-image hold-out, seed 0), or synthetic images."""
    if args.synthetic:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (45_000, 32, 32, 3), dtype=np.uint8)
        src = ArraySource(images, rng.integers(0, 10, 45_000), [str(i) for i in range(10)], "synthetic")
        return Split(src, np.arange(45_000), src.labels)
    return open_data(DataConfig(train=str(args.data), val_split=5000, split_seed=0)).train


def build(split: Split, policy: str, path: str, workers: int, batch: int, device: torch.device):
    aug = AugConfig(crop_padding=4, hflip=True, random_erasing=0.25, backend=path, **POLICIES[policy])
    mix = MixConfig(mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    cfg = DataConfig(train="unused", batch_size=batch, num_workers=workers, aug=aug, mix=mix)
    opt = StreamOptions(batch_size=batch, device=device, seed=0, num_workers=workers, device_cache="on")
    return build_train_stream(split, Preprocess(32, MEAN, STD), cfg, opt, num_classes=10)


def drain(stream, batches: int, device: torch.device) -> tuple[float, float]:
    """(img/s over `batches` batches, seconds of the two warm-up batches before them); a fresh epoch each time."""
    stream.set_epoch(0)
    it = iter(stream)
    t0 = time.perf_counter()
    for _ in range(2):
        next(it)
    sync(device)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, _, _ = next(it)
        n += x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0), warm


def measure(split, policy: str, path: str, workers: int, batch: int, args, device) -> dict:
    stream = build(split, policy, path, workers, batch, device)
    kind = type(stream.loader).__name__
    expected = "DeviceLoader" if path == "device" else "WorkerLoader"
    assert kind == expected, f"{path} path built a {kind}"
    compiled = bool(args.compile_policies and stream.policy is not None)
    if compiled:
        compile_policy(stream.policy)
    batches = min(args.batches, len(stream) - 2)
    runs = [drain(stream, batches, device) for _ in range(args.repeats)]
    rates = [r for r, _ in runs]
    rec = {"path": path, "policy": policy, "workers": workers if path == "workers" else 0, "batch": batch,
           "compiled_policy": compiled, "batches": batches, "img_per_s": round(statistics.median(rates), 1),
           "img_per_s_all": [round(r, 1) for r in rates], "first_warmup_s": round(runs[0][1], 2)}
    print(f"{path:8s} {policy:15s} workers {rec['workers']:2d} batch {batch:5d}{' compiled' if compiled else ''}  "
          f"{rec['img_per_s']:12,.0f} img/s", flush=True)
    return rec


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", type=Path, default=CIFAR)
    p.add_argument("--synthetic", action="store_true", help="random uint8 images instead of the parquet")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--workers", nargs="*", type=int, default=[2], help="worker counts for the workers path")
    p.add_argument("--worker-policies", nargs="+", default=["autoaugment", "trivialaugment"], choices=list(POLICIES))
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--compile-policies", action="store_true", help="torch.compile the device policies' ops")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default 80 CUDA, 8 CPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--out", default=None, help="results file stem (default aug_pipeline_<device>)")
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = 80 if args.device.startswith("cuda") else 8
    if not args.synthetic and not args.data.is_file():
        p.error(f"{args.data} not found; pass --data PATH or --synthetic")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    split = train_split(args)
    runs = [measure(split, pol, "device", 0, b, args, device) for b in args.batch for pol in args.policies]
    runs += [measure(split, pol, "workers", n, args.batch[0], args, device)
             for pol in args.worker_policies for n in args.workers]
    settings = {"data": "synthetic" if args.synthetic else str(args.data), "train_images": len(split),
                "threads": torch.get_num_threads(), "device": str(device)}
    results = {"settings": settings, "runs": runs, "bar_img_per_s": 100_000}
    path = save_result(args.out or f"aug_pipeline_{device_tag(device)}", results)
    print("->", path)


if __name__ == "__main__":
    main()
