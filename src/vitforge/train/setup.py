"""Everything a run's configuration describes, built once before the loop: `build(cfg, ckpt)` -> `TrainSetup`.

    process group, device, trackers -> seeds and threads -> data -> model (+ initial weights) -> preprocessing ->
    model on the device, AMP, input probe -> data.batch_size=auto resolved -> streams -> optimizer -> EMA -> loss ->
    steps and the lr schedule -> OOM back-off -> (resume: restored states) -> DDP / compile

Nothing here writes a file: a configuration that cannot run (a model that cannot take the data, a batch larger than
the data, a tracker package that is not installed) fails here, before any run directory exists.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitforge import runtime as D
from vitforge.checkpoint import checkpoint_model
from vitforge.config import Config
from vitforge.data import (
    OpenedData,
    Preprocess,
    StreamOptions,
    build_eval_stream,
    build_train_stream,
    open_data,
    resolve_preprocess,
)
from vitforge.data.dataset import FeatureSource
from vitforge.data.decoded import use_device_cache
from vitforge.data.sources import default_cache_dir
from vitforge.data.streams import EvalStream, TrainStream
from vitforge.errors import CheckpointError, ConfigError, VitforgeError, first_line
from vitforge.models.backbones import NAMED_WEIGHTS, layer_decay_ids, load_initial_weights
from vitforge.models.build import build_model, count_params, model_input_cfg, model_kwargs
from vitforge.models.layers.checkpointing import supports_grad_checkpointing
from vitforge.models.pretrained import load_state_strict
from vitforge.train.distill import build_criterion
from vitforge.train.ema import ModelEma
from vitforge.train.losses import ClassificationLoss
from vitforge.train.oom import OomBackoff, auto_batch_size
from vitforge.train.optim import build_optimizer, lr_schedule, param_groups
from vitforge.train.rundir import RunState
from vitforge.train.trackers import Tracker, build_trackers


@dataclass
class TrainSetup:
    """The built parts of a run. `model` is what the loop calls (DDP- and/or compile-wrapped); `raw_model` is the
    module itself (what is saved, averaged by the EMA and evaluated)."""

    cfg: Config
    dist: D.DistInfo
    device: torch.device
    data: OpenedData
    classes: list[str]
    raw_model: nn.Module
    model: nn.Module
    params: tuple[int, int]  # (all, trainable)
    pre: Preprocess
    train_stream: TrainStream
    val_stream: EvalStream | None
    unreadable: list[str]  # images the streams skip
    groups: list[dict]  # parameter groups (names, weight decay, lr_scale)
    optimizer: torch.optim.Optimizer
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None  # fp16 only
    ema: ModelEma | None
    criterion: nn.Module  # (inputs) -> loss; a DistillationLoss wraps the classification loss
    steps_per_epoch: int
    total_steps: int
    lr_for: Callable[[int], float]  # optimizer step -> learning rate (`optim.lr_at` with this run's settings)
    trackers: list[Tracker]  # started when the run directory exists
    state: RunState  # fresh, or restored from the checkpoint
    oom: OomBackoff  # the micro-batch each forward/backward pass uses (halved on a device out-of-memory error)
    notes: list[str]  # lines for the run's announcement (e.g. what data.batch_size=auto chose)

    def autocast(self):
        return D.autocast(self.device, self.amp_dtype)

    def criterion_base(self) -> ClassificationLoss:
        """The classification loss (where label smoothing is set), inside a distillation loss or not."""
        return getattr(self.criterion, "base", self.criterion)

    @property
    def acc_dtype(self) -> torch.dtype:
        """Loss/count accumulators: float64, except on Apple MPS, which has no float64."""
        return torch.float32 if self.device.type == "mps" else torch.float64


def build(cfg: Config, ckpt: dict | None = None, *, download: bool = True) -> TrainSetup:
    """Build every part `cfg` describes; with `ckpt` (a last.pt), restore model, optimizer, scaler, EMA, state and
    RNGs from it. `download=False` skips initial weights that would be fetched from the network (dry runs)."""
    t, dist = cfg.train, D.init_distributed(D.device_kind(cfg.train.device))
    device = D.pick_device(t.device, dist)
    trackers = build_trackers(cfg, main=dist.main)  # first: a tracker package that is missing fails fast
    if t.threads:
        torch.set_num_threads(t.threads)
    elif device.type == "cpu":
        D.cap_cpu_threads()  # no more intra-op threads than usable cores (affinity, cgroup quota)
    seed_everything(t.seed)
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest conv kernels

    data = open_data(cfg.data)
    classes = data.classes
    if ckpt:
        model = checkpoint_model(ckpt)
    else:
        model = build_model(cfg.model.name, model_kwargs(cfg, num_classes=len(classes)))
    remote = cfg.model.pretrained in ("hub", *NAMED_WEIGHTS)
    if cfg.model.pretrained and not ckpt and (download or not remote):
        load_initial_weights(model, cfg.model.pretrained)  # hub, named source or local file
    params = count_params(model)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    pre = resolve_preprocess(cfg.data, data.train, model_input_cfg(model), pretrained=bool(cfg.model.pretrained),
                             device_cache=use_device_cache(data.train, cfg.data.device_cache), cache_dir=cache_dir)

    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    if t.grad_checkpointing:
        if not supports_grad_checkpointing(model):
            raise ConfigError(f"train.grad_checkpointing: model {cfg.model.name!r} does not support it")
        model.set_grad_checkpointing(True)
    amp_dtype = D.amp_dtype(t.amp, device)
    notes: list[str] = []
    if device.type == "cpu" and amp_dtype == torch.bfloat16 and not D.cpu_has_bf16():
        notes.append("train.amp=bf16 on a CPU without native bf16 (avx512_bf16/amx_bf16): emulated, usually slower "
                     "than train.amp=off")
    shape = _input_shape(data.train.source, pre.img_size)
    _probe_input(model, shape, device, amp_dtype, cfg)
    if cfg.data.batch_size == "auto":  # resolved once: config.yaml and every checkpoint hold the number
        cfg.data.batch_size = auto_batch_size(
            model, lambda: build_optimizer(param_groups(model, cfg.optim), cfg.optim, device), shape, len(classes),
            device, limit=max(1, len(data.train) // dist.world), autocast=lambda: D.autocast(device, amp_dtype),
            channels_last=t.channels_last, say=notes.append)

    opt = StreamOptions(batch_size=cfg.data.batch_size, device=device, seed=t.seed, rank=dist.rank, world=dist.world,
                        num_workers=cfg.data.num_workers, device_cache=cfg.data.device_cache, cache_dir=cache_dir,
                        epochs=t.epochs)
    train_stream = build_train_stream(data.train, pre, cfg.data, opt, num_classes=len(classes),
                                      balanced=t.class_balance == "sampler")
    if len(train_stream) == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {len(data.train)} "
                          f"training images per process; lower it")
    val_stream = None
    if data.val is not None:
        opt.batch_size = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
        val_stream = build_eval_stream(data.val, pre, opt)
    unreadable = sorted(set(train_stream.bad + (val_stream.bad if val_stream is not None else [])))
    groups = param_groups(model, cfg.optim, *(layer_decay_ids(model) if cfg.optim.layer_decay else (None, None)))
    optimizer = build_optimizer(groups, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    ema = ModelEma(model, cfg.ema.warmup, power=cfg.ema.warmup_power,
                   gamma=cfg.ema.warmup_gamma) if cfg.ema.enabled else None
    criterion = _criterion(cfg, data, classes, pre, device).to(device)
    steps_per_epoch = math.ceil(len(train_stream) / t.grad_accum)
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    oom = OomBackoff(cfg.data.batch_size, t.grad_accum, enabled=not dist.enabled)  # DDP: a lone retry would hang
    state = RunState()
    if ckpt:
        state = _restore(ckpt, model, optimizer, scaler, ema, oom, dist, device)
    elif dist.enabled:  # different dropout/drop-path draws per rank (same weights: DDP broadcasts rank 0's at wrap)
        torch.manual_seed(t.seed + 1000 * dist.rank)
    return TrainSetup(cfg=cfg, dist=dist, device=device, data=data, classes=classes, raw_model=model,
                      model=_wrap(model, cfg, dist, device), params=params, pre=pre, train_stream=train_stream,
                      val_stream=val_stream, unreadable=unreadable, groups=groups, optimizer=optimizer,
                      amp_dtype=amp_dtype, scaler=scaler, ema=ema, criterion=criterion,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                      lr_for=lr_schedule(cfg, steps_per_epoch, total_steps), trackers=trackers, state=state, oom=oom,
                      notes=notes)


def _input_shape(source, img_size: int) -> tuple[int, ...]:
    """One training input's shape: a feature tensor's (hyperspectral patches), else (3, S, S)."""
    return tuple(source.features.shape[1:]) if isinstance(source, FeatureSource) else (3, img_size, img_size)


def _probe_input(model: nn.Module, shape: tuple[int, ...], device: torch.device, amp_dtype, cfg: Config) -> None:
    """One zero input of `shape` through the model (eval mode, no gradients; no state or RNG changes) before any run
    directory exists: a model that cannot take this data's input (channels, bands, size) is a one-line error
    naming the model here, not a traceback at the first training step."""
    x = torch.zeros((1, *shape), device=device)
    if cfg.train.channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), D.autocast(device, amp_dtype):
            model(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(f"model.name: {cfg.model.name!r} cannot take this data's input {shape}: "
                          f"{first_line(e)}") from e
    finally:
        model.train(was_training)


def _criterion(cfg: Config, data: OpenedData, classes: list[str], pre: Preprocess, device: torch.device) -> nn.Module:
    weight = None
    if cfg.train.class_balance == "weights":
        counts = np.bincount(data.train.labels[data.train.indices], minlength=len(classes))
        w = counts.sum() / (len(classes) * np.maximum(counts, 1))
        weight = torch.tensor(w, dtype=torch.float32)
    base = ClassificationLoss(cfg.train.label_smoothing, weight)
    if not cfg.distill.teacher:
        return base
    return build_criterion(cfg.distill, base, num_classes=len(classes), device=device, classes=classes,
                           preprocess=pre.to_dict())


def _wrap(model: nn.Module, cfg: Config, dist: D.DistInfo, device: torch.device) -> nn.Module:
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        # A head-only phase leaves backbone parameters without gradients, which DDP must be told about.
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                    find_unused_parameters=cfg.train.head_epochs > 0)
    if cfg.train.compile != "off":
        model = torch.compile(model, mode=None if cfg.train.compile == "default" else cfg.train.compile)
    return model


# ---- resume ------------------------------------------------------------------------------------------------------
def _restore(ckpt: dict, model, optimizer, scaler, ema, oom: OomBackoff, dist: D.DistInfo,
             device: torch.device) -> RunState:
    """Model, optimizer, scaler, EMA, run state and RNG states from last.pt; a part that does not fit this run
    (a damaged or crafted file) is a one-line `CheckpointError` naming the file and the part."""
    path = ckpt["path"]
    load_state_strict(model, ckpt["model"], path)
    with _restoring(path, "optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        with _restoring(path, "scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and ckpt.get("ema"):
        load_state_strict(ema, ckpt["ema"], f"{path} (EMA weights)")
    state = RunState.from_checkpoint(ckpt["progress"], path)
    if ckpt.get("oom"):  # the micro-batch an out-of-memory back-off had reached
        with _restoring(path, "oom"):
            oom.load_state_dict(ckpt["oom"])
    with _restoring(path, "rng"):
        rng = ckpt["rng"]
        if isinstance(rng, list):  # one state per rank (a different world size reuses them round-robin)
            rng = rng[dist.rank % len(rng)]
        set_rng_state(rng, device)
    return state


@contextlib.contextmanager
def _restoring(path: str, part: str):
    """Turn what a state that does not fit raises (torch and numpy raise KeyError, ValueError, TypeError, ...) into
    a one-line `CheckpointError` naming the checkpoint and the part."""
    try:
        yield
    except VitforgeError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: its {part} state does not fit this run ({type(e).__name__}: "
                              f"{first_line(e, 160)})") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as plain data (tensors, lists, tuples, numbers): what `torch.load(weights_only=True)`
    reads back without any allow-list. numpy's MT19937 keys (624 uint32) travel as an int64 tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]  # format 1 checkpoints hold an ndarray here, format 2 an int64 tensor
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])
