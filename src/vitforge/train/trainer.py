"""The training loop: one `Trainer` per run (single process, or one per rank under torchrun).

Resume is exact: the data order and every augmentation are functions of (seed, epoch, batch); the checkpoint holds
model, optimizer, scaler, EMA, RNG states and the position inside the epoch. Ctrl-C (SIGINT) or SIGTERM asks the
loop to stop at the next optimizer-step boundary, where it saves `last.pt`; `vitforge train --resume RUN` continues
from there and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import resource
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from vitforge import runtime as D
from vitforge.checkpoint import checkpoint_config, checkpoint_model, load_checkpoint, save_checkpoint
from vitforge.config import Config, load_config, to_dict
from vitforge.data import StreamOptions, build_eval_stream, build_train_stream, open_data, resolve_preprocess
from vitforge.data.dataset import FeatureSource
from vitforge.data.decoded import use_device_cache
from vitforge.data.sources import NAMED_SOURCES, default_cache_dir
from vitforge.errors import CheckpointError, ConfigError, VitforgeError, first_line
from vitforge.eval.evaluate import collect_logits, evaluate
from vitforge.eval.metrics import label_metrics
from vitforge.eval.verify import check_attention
from vitforge.models.backbones import NAMED_WEIGHTS, classifier_names, layer_decay_ids, load_initial_weights
from vitforge.models.build import build_model, count_params, model_input_cfg, model_kwargs
from vitforge.models.layers.checkpointing import supports_grad_checkpointing
from vitforge.models.pretrained import load_state_strict
from vitforge.train import sam
from vitforge.train.distill import build_criterion
from vitforge.train.ema import ModelEma, ema_decay_at
from vitforge.train.losses import ClassificationLoss
from vitforge.train.optim import build_optimizer, lr_at, param_groups, set_lr
from vitforge.train.rundir import Progress, RunDir, Trackers, setup_file_logging

log = logging.getLogger("vitforge")
HEAD_NAMES = ("head", "head_dist", "fc", "classifier")
# Keys a resumed run may change (anything else would make the checkpoint inconsistent with its config).
RESUMABLE_OVERRIDES = ("train.", "run.progress", "run.tensorboard", "data.num_workers", "data.eval_batch_size")


@dataclass
class Progress_:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # epoch being run (or next to run)
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = -1
    evals_since_best: int = 0
    wall: float = 0.0  # training seconds so far (all sessions)
    loss_sum: float = 0.0  # running sums of the current epoch (exact epoch metrics across resumes)
    seen: int = 0


class StopRequested(Exception):
    """Raised inside the loop when a stop was requested; the run is saved and can be resumed."""


class Trainer:
    """Build everything a config describes, then `fit()`.

    Args:
        cfg: the run's configuration (ignored when resuming: the checkpoint's config is used, plus `overrides`).
        resume: a run directory or last.pt to continue.
        overrides: `key=value` changes applied on resume (train.*, run.progress, ... only).
        hooks: optional object with `on_step(trainer)` called after each optimizer step (tests, callbacks).
    """

    def __init__(self, cfg: Config | None = None, *, resume: str | Path | None = None, overrides=(), hooks=None,
                 download: bool = True):
        ckpt = None
        if resume is not None:
            ckpt = load_checkpoint(resume, prefer="last")
            cfg = _resume_config(ckpt, overrides)
        assert cfg is not None
        if ckpt is None:  # the run records where its files are, wherever it is resumed or evaluated from
            cfg = absolute_paths(cfg)
        self.cfg, self.hooks, self.download = cfg, hooks, download
        self.stop_requested = False
        self.stop_signal: int | None = None
        self.dist = D.init_distributed(D.device_kind(cfg.train.device))
        self.device = D.pick_device(cfg.train.device, self.dist)
        self._setup(ckpt)

    # ---- setup ------------------------------------------------------------------------------------------------------
    def _setup(self, ckpt: dict | None) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _seed_everything(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        elif torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest conv kernels
        self.data = open_data(cfg.data)
        self.classes = self.data.classes
        if ckpt:
            self.model = checkpoint_model(ckpt)
        else:
            self.model = build_model(cfg.model.name, model_kwargs(cfg, num_classes=len(self.classes)))
        remote = cfg.model.pretrained in ("hub", *NAMED_WEIGHTS)
        if cfg.model.pretrained and not ckpt and (self.download or not remote):
            load_initial_weights(self.model, cfg.model.pretrained)  # hub, named source or local file
        self.params = count_params(self.model)
        small = use_device_cache(self.data.train, cfg.data.device_cache)
        self.pre = resolve_preprocess(cfg.data, self.data.train, model_input_cfg(self.model),
                                      pretrained=bool(cfg.model.pretrained), device_cache=small,
                                      cache_dir=self._cache_dir())
        self._build_streams()
        self._build_optimization()
        self.state = Progress_()
        self.run = RunDir(Path(ckpt["path"]).parent.parent) if ckpt else None
        self.resumed = bool(ckpt)
        if ckpt:
            self._restore(ckpt)
        # Different dropout/drop-path draws per rank (same weights: DDP broadcasts rank 0's at wrap time).
        if self.dist.enabled and not ckpt:
            torch.manual_seed(cfg.train.seed + 1000 * self.dist.rank)
        self._wrap()

    def _cache_dir(self) -> Path:
        return Path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else default_cache_dir()

    def _build_streams(self) -> None:
        cfg = self.cfg
        opt = StreamOptions(batch_size=cfg.data.batch_size, device=self.device, seed=cfg.train.seed,
                            rank=self.dist.rank, world=self.dist.world, num_workers=cfg.data.num_workers,
                            device_cache=cfg.data.device_cache, cache_dir=self._cache_dir(), epochs=cfg.train.epochs)
        self.train_stream = build_train_stream(self.data.train, self.pre, cfg.data, opt, num_classes=len(self.classes),
                                               balanced=cfg.train.class_balance == "sampler")
        if len(self.train_stream) == 0:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {len(self.data.train)} "
                              f"training images per process; lower it")
        self.val_stream = None
        if self.data.val is not None:
            opt.batch_size = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
            self.val_stream = build_eval_stream(self.data.val, self.pre, opt)
        bad = self.train_stream.bad + (self.val_stream.bad if self.val_stream is not None else [])
        self.unreadable = sorted(set(bad))

    def _build_optimization(self) -> None:
        cfg = self.cfg
        self.model.to(self.device)
        if cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if cfg.train.grad_checkpointing:
            if not supports_grad_checkpointing(self.model):
                raise ConfigError(f"train.grad_checkpointing: model {cfg.model.name!r} does not support it")
            self.model.set_grad_checkpointing(True)
        decay = layer_decay_ids(self.model) if cfg.optim.layer_decay else (None, None)
        self.groups = param_groups(self.model, cfg.optim, *decay)
        self.optimizer = build_optimizer(self.groups, cfg.optim, self.device)
        self.amp_dtype = D.amp_dtype(cfg.train.amp, self.device)
        self._probe_input()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.ema = ModelEma(self.model, cfg.ema.warmup, power=cfg.ema.warmup_power,
                            gamma=cfg.ema.warmup_gamma) if cfg.ema.enabled else None
        self.criterion = self._criterion().to(self.device)
        self.steps_per_epoch = math.ceil(len(self.train_stream) / cfg.train.grad_accum)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)

    def _probe_input(self) -> None:
        """One zero image through the model (eval mode, no gradients; no state or RNG changes) before any run
        directory exists: a model that cannot take this data's input (channels, bands, size) is a one-line error
        naming the model here, not a traceback at the first training step."""
        src = self.data.train.source
        if isinstance(src, FeatureSource):
            shape = tuple(src.features.shape[1:])
        else:
            shape = (3, self.pre.img_size, self.pre.img_size)
        x = torch.zeros((1, *shape), device=self.device)
        if self.cfg.train.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                self.model(x)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise ConfigError(f"model.name: {self.cfg.model.name!r} cannot take this data's input {shape}: "
                              f"{first_line(e)}") from e
        finally:
            self.model.train(was_training)

    def _criterion(self) -> nn.Module:
        cfg = self.cfg
        weight = None
        if cfg.train.class_balance == "weights":
            counts = np.bincount(self.data.train.labels[self.data.train.indices], minlength=len(self.classes))
            w = counts.sum() / (len(self.classes) * np.maximum(counts, 1))
            weight = torch.tensor(w, dtype=torch.float32)
        base = ClassificationLoss(cfg.train.label_smoothing, weight)
        if not cfg.distill.teacher:
            return base
        return build_criterion(cfg.distill, base, num_classes=len(self.classes), device=self.device,
                               classes=self.classes, preprocess=self.pre.to_dict())

    def _wrap(self) -> None:
        self.raw_model = self.model
        model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # A head-only phase leaves backbone parameters without gradients, which DDP must be told about.
            unused = self.cfg.train.head_epochs > 0
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
        if self.cfg.train.compile != "off":
            mode = None if self.cfg.train.compile == "default" else self.cfg.train.compile
            model = torch.compile(model, mode=mode)
        self.model = model

    @property
    def acc_dtype(self) -> torch.dtype:
        """Loss/count accumulators: float64, except on Apple MPS, which has no float64."""
        return torch.float32 if self.device.type == "mps" else torch.float64

    def autocast(self):
        return D.autocast(self.device, self.amp_dtype)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def fit(self) -> Path:
        """Train to the end (or until stopped / early-stopped); returns the run directory."""
        if self.run is None:
            self.run = self._create_run()
        elif self.dist.main:
            self.run.acquire()  # one process per run: a second `--resume` of a live run is refused
        try:
            return self._fit_locked()
        finally:
            if self.dist.main:
                self.run.release()

    def _fit_locked(self) -> Path:
        cfg = self.cfg
        if self.resumed and self.dist.main:
            self.run.truncate_metrics(self.state.epoch)
        handler = setup_file_logging(self.run) if self.dist.main else None
        self.progress = Progress(cfg.run.progress, self.dist.main)
        self.trackers = Trackers(self.run, cfg, self.dist.main)
        self._announce()
        old = _install_signal_handlers(self)
        try:
            self._epochs()
        except StopRequested:
            self._save_last()
            note = (f"stopped at epoch {self.state.epoch + 1}, batch {self.state.batch}; "
                    f"resume with: vitforge train --resume {self.run.path}")
            log.info(note)
            if self.dist.main:
                self.progress.message(note, always=True)
            self.interrupted = True
        finally:
            _restore_signal_handlers(old)
            self.trackers.close()
            if handler:
                logging.getLogger("vitforge").removeHandler(handler)
        return self.run.path

    def _epochs(self) -> None:
        cfg, st = self.cfg, self.state
        self.interrupted = False
        while st.epoch < cfg.train.epochs and not self._steps_exhausted():
            t0, seen0 = time.perf_counter(), st.seen  # a resumed epoch counts only this session's images/s
            self._train_one_epoch()
            train_secs = time.perf_counter() - t0
            st.wall += train_secs
            record = self._end_epoch(train_secs, st.seen - seen0)
            if self._early_stop(record):
                break
        self._finish()

    def _steps_exhausted(self) -> bool:
        return self.cfg.train.max_steps is not None and self.state.step >= self.cfg.train.max_steps

    def _train_one_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        self.model.train()
        self._set_phase(st.epoch)
        set_lr(self.optimizer, self.lr_for(st.step))
        smoothing = _smoothing_at(st.epoch, cfg.train)
        self.criterion_base().label_smoothing = smoothing
        self.train_stream.set_epoch(st.epoch, st.batch, smoothing)
        self.progress.start_epoch(st.epoch, cfg.train.epochs, len(self.train_stream), st.batch)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        # Summed loss·batch of the epoch not yet read back (reading it would synchronise with the device every step).
        self._loss_acc = torch.zeros((), device=self.device, dtype=self.acc_dtype)
        window: list = []
        for x, y, _ in self.train_stream:
            window.append((x, y))
            if len(window) == cfg.train.grad_accum:
                self._step_and_bookkeep(window)
                window = []
                if self._steps_exhausted():
                    break
        if window:
            self._step_and_bookkeep(window)
        self._fold_loss()

    def _step_and_bookkeep(self, window: list) -> None:
        self._loss_acc += self._optimizer_step(window)
        self.state.batch += len(window)
        self._after_step()

    def _fold_loss(self) -> None:
        """Move the device-side loss sum into the (checkpointed) epoch totals; this synchronises with the device."""
        self.state.loss_sum += float(self._loss_acc)
        self._loss_acc.zero_()

    def _optimizer_step(self, window: list) -> torch.Tensor:
        """One optimizer step over `window` micro-batches (SAM: two passes). Returns the summed loss·batch."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        loss_sum = self._forward_backward(window)
        if self.cfg.optim.sam_rho <= 0 or self._sam_second_pass(window, params):
            self._apply_gradients(params)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.seen += sum(x.shape[0] for x, _ in window)
        if self.ema is not None and self.state.step % self.cfg.ema.every == 0:
            cfg = self.cfg
            self.ema.update(self.raw_model, ema_decay_at(self.state.epoch, cfg.train.epochs, cfg.ema.decay,
                                                          cfg.ema.decay_end))
        return loss_sum

    def _sam_second_pass(self, window: list, params: list) -> bool:
        """SAM: move to w + e(w) along the first-pass gradient, recompute the gradients there, move back.

        The perturbation direction does not depend on the loss scale, so fp16 gradients are used as they are; if
        they overflowed, the step is skipped and the scale backed off (as GradScaler does for a plain step).
        Returns False when the step must be skipped.
        """
        if self.scaler is not None and not sam.grads_finite(params):
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
            return False
        eps = sam.perturb(params, self.cfg.optim.sam_rho, self.cfg.optim.sam_adaptive)
        self.optimizer.zero_grad(set_to_none=True)
        with sam.frozen_norm_stats(self.raw_model):  # BN running statistics count each batch once
            self._forward_backward(window)
        sam.restore(params, eps)
        return True

    def _apply_gradients(self, params: list) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.train.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped (and the scale backed off) on inf/NaN gradients
            self.scaler.update()
        else:
            self.optimizer.step()

    def _forward_backward(self, window: list) -> torch.Tensor:
        total = torch.zeros((), device=self.device, dtype=self.acc_dtype)
        n = len(window)
        for i, (x, y) in enumerate(window):
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = contextlib.nullcontext()
            if self.dist.enabled and i < n - 1:
                sync = self.model.no_sync()
            with sync:
                if self.state.step == 0 and i == 0 and not self.state.seen:
                    self._first_step_checks(x)
                with self.autocast():
                    out = self.model(x)
                    loss = self.criterion(out, y, x)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach().to(self.acc_dtype) * x.shape[0]
        return total

    def _after_step(self) -> None:
        """Per-step bookkeeping: lr of the next step, progress, hooks, stop requests, mid-epoch checkpoints."""
        st = self.state
        set_lr(self.optimizer, self.lr_for(st.step))
        if self.progress.bar is not None and st.step % 10 == 0:
            self._fold_loss()
            self.progress.update(10 * self.cfg.train.grad_accum, loss=st.loss_sum / max(st.seen, 1))
        if self.hooks is not None and hasattr(self.hooks, "on_step"):
            self.hooks.on_step(self)
        if self._stop_now():
            self._fold_loss()
            raise StopRequested
        every = self.cfg.train.ckpt_every_steps
        if every and st.step % every == 0 and st.batch < len(self.train_stream):
            self._fold_loss()
            self._save_last()

    def _stop_now(self) -> bool:
        if not self.dist.enabled:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        D.all_reduce_sum(flag)  # every rank must stop at the same step (one tiny collective per step under DDP)
        return bool(flag.item() > 0)

    def request_stop(self) -> None:
        """Stop at the next optimizer-step boundary, save last.pt, and return from `fit()` (Ctrl-C does this)."""
        self.stop_requested = True

    def lr_for(self, step: int) -> float:
        cfg = self.cfg
        head_steps = cfg.train.head_epochs * self.steps_per_epoch
        if step < head_steps:
            return cfg.train.head_lr or cfg.optim.lr
        warmup = int(round(cfg.schedule.warmup_epochs * self.steps_per_epoch))
        return lr_at(step - head_steps, total=self.total_steps - head_steps, warmup=warmup, peak=cfg.optim.lr,
                     cfg=cfg.schedule)

    def criterion_base(self) -> ClassificationLoss:
        return getattr(self.criterion, "base", self.criterion)

    def _set_phase(self, epoch: int) -> None:
        """Two-phase fine-tuning: only the classifier head trains during the first `train.head_epochs` epochs."""
        if not self.cfg.train.head_epochs:
            return
        head_only = epoch < self.cfg.train.head_epochs
        heads = HEAD_NAMES + classifier_names(self.raw_model)  # library backbones name their own classifier
        for name, p in self.raw_model.named_parameters():
            p.requires_grad_(not head_only or name.split(".")[0] in heads)

    def _first_step_checks(self, x: torch.Tensor) -> None:
        if not (self.cfg.train.verify_attention and self.dist.main):
            return
        with torch.no_grad():
            report = check_attention(self.raw_model, x[:2])
        self.raw_model.train()
        if report.get("blocks"):
            (self.run.path / "attention_check.json").write_text(_json(report))
            log.info("attention check: %d blocks, max |row-sum - 1| = %.2e, ok=%s", len(report["blocks"]),
                     report.get("max_err", 0.0), report["ok"])
            if not report["ok"]:
                bad = [b["name"] for b in report["blocks"] if not b["ok"]]
                raise VitforgeError(f"train.verify_attention: the attention check failed in {len(bad)} block(s) "
                                    f"(first: {bad[0]}); see {self.run.path / 'attention_check.json'}")

    # ---- epoch end: evaluation, logging, checkpoints ------------------------------------------------------------
    def _end_epoch(self, train_secs: float, session_seen: int) -> dict:
        cfg, st = self.cfg, self.state
        seen = torch.tensor([st.seen, st.loss_sum, session_seen], device=self.device, dtype=self.acc_dtype)
        D.all_reduce_sum(seen)
        record = {"epoch": st.epoch, "step": st.step, "train_loss": seen[1].item() / max(seen[0].item(), 1),
                  "lr": self.lr_for(max(st.step - 1, 0)), "img_per_s": seen[2].item() / max(train_secs, 1e-9),
                  "epoch_seconds": train_secs, "peak_mem_mb": _peak_mem_mb(self.device)}
        last = st.epoch + 1 == cfg.train.epochs or self._steps_exhausted()
        if self.val_stream is not None and ((st.epoch + 1) % cfg.train.eval_every == 0 or last):
            record.update(self._validate())
        st.epoch, st.batch, st.loss_sum, st.seen = st.epoch + 1, 0, 0.0, 0
        if self.dist.main:
            self.run.append_metrics(record)
            self.trackers.scalars({f"train/{k}": record[k] for k in ("train_loss", "lr", "img_per_s")}, st.step)
            self.trackers.scalars({f"val/{k[4:]}": v for k, v in record.items() if k.startswith("val_")}, st.step)
            self.progress.end_epoch(_epoch_line(record, cfg.train.epochs))
        if st.epoch % cfg.train.ckpt_every_epochs == 0 or last:
            self._save_last()
        return record

    def _validate(self) -> dict:
        cfg, st = self.cfg, self.state
        if self.dist.enabled:  # BN running statistics drift per rank after the last forward: score rank 0's
            D.broadcast_buffers(self.raw_model)
            if self.ema is not None:
                D.broadcast_buffers(self.ema)
        model = self.ema.module if (self.ema is not None and cfg.ema.eval) else self.raw_model
        m = evaluate(model, self.val_stream, len(self.classes), autocast=self.autocast)
        rec = {"val_loss": m["loss"], "val_top1": m["top1"], "val_n": m["n"]}
        if m["top5"] is not None:  # only for more than 5 classes
            rec["val_top5"] = m["top5"]
        if m["top1"] > st.best_top1:
            st.best_top1, st.best_epoch, st.evals_since_best = m["top1"], st.epoch, 0
            rec["best"] = True
            if self.dist.main:
                self._save_best(model, m)
        else:
            st.evals_since_best += 1
        return rec

    def _early_stop(self, record: dict) -> bool:
        patience = self.cfg.train.early_stop
        if patience and "val_top1" in record and self.state.evals_since_best >= patience:
            self.progress.message(f"early stop: no better val top-1 for {patience} evaluations")
            return True
        return False

    # ---- persistence -----------------------------------------------------------------------------------------------
    def _common_payload(self) -> dict:
        return {"model_name": self.cfg.model.name, "model_kwargs": self.raw_model.vitforge_kwargs,
                "classes": self.classes, "preprocess": self.pre.to_dict(), "config": to_dict(self.cfg)}

    def _save_last(self) -> None:
        self._saved_step = self.state.step  # on every rank: decisions that depend on it must agree
        rng = D.gather_objects(_rng_state())  # every rank's generators: each resumes its own dropout stream
        if not self.dist.main:
            D.barrier()
            return
        payload = {**self._common_payload(), "model": self.raw_model.state_dict(),
                   "optimizer": self.optimizer.state_dict(),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                   "ema": self.ema.state_dict() if self.ema is not None else None,
                   "eval_weights": "ema" if (self.ema is not None and self.cfg.ema.eval) else "model",
                   "progress": asdict(self.state), "rng": rng}
        save_checkpoint(self.run.last, payload)
        D.barrier()

    def _save_best(self, model: nn.Module, metrics: dict) -> None:
        payload = {**self._common_payload(), "model": model.state_dict(), "eval_weights": "model",
                   "metrics": {k: metrics[k] for k in ("top1", "top5", "loss", "n")},
                   "progress": asdict(self.state)}
        save_checkpoint(self.run.best, payload)

    def _restore(self, ckpt: dict) -> None:
        """Model, optimizer, scaler, EMA, progress and RNG states from last.pt; a part that does not fit this run
        (a damaged or crafted file) is a one-line `CheckpointError` naming the file and the part."""
        path = ckpt["path"]
        load_state_strict(self.model, ckpt["model"], path)
        with _restoring(path, "optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            with _restoring(path, "scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            load_state_strict(self.ema, ckpt["ema"], f"{path} (EMA weights)")
        self.state = _progress(ckpt["progress"], path)
        with _restoring(path, "rng"):
            rng = ckpt["rng"]
            if isinstance(rng, list):  # one state per rank (a different world size reuses them round-robin)
                rng = rng[self.dist.rank % len(rng)]
            _set_rng_state(rng, self.device)

    def _create_run(self) -> RunDir:
        run = RunDir.create(self.cfg, dataset_name=self.cfg.data.train) if self.dist.main else None
        if run is not None:
            run.acquire()  # before anything is written: a run started at the same moment under this name loses
        if self.dist.enabled:  # every rank needs the same path
            import torch.distributed as dist

            box = [str(run.path) if run else None]
            dist.broadcast_object_list(box, src=0)
            run = run or RunDir(Path(box[0]))
        if self.dist.main:
            run.write_config(self.cfg)
        return run

    def _best_metrics(self) -> dict:
        """best.pt on the validation split: accuracy, balanced accuracy (= AA), Cohen's kappa, macro F1, per-class
        recall. (Hyperspectral papers report OA = top-1, AA and kappa.)"""
        model = copy.deepcopy(self.raw_model)
        model.load_state_dict(load_checkpoint(self.run.best)["model"])
        logits, labels, _ = collect_logits(model, self.val_stream, autocast=self.autocast)
        m = label_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), len(self.classes))
        return {"top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"], "kappa": m["kappa"],
                "macro_f1": m["macro_f1"],
                "per_class_recall": dict(zip(self.classes, (m["recall"] * 100).tolist(), strict=True))}

    def _announce(self) -> None:
        if not self.dist.main:
            return
        d = self.data
        msg = (f"run {self.run.path} | model {self.cfg.model.name} ({self.params[0]:,} params) | "
               f"{len(d.train)} train / {len(d.val) if d.val else 0} val images, {len(self.classes)} classes | "
               f"device {self.device}{f' x{self.dist.world}' if self.dist.enabled else ''} | "
               f"input {self.pre.img_size}px | {self.steps_per_epoch} steps/epoch")
        if self.unreadable:
            msg += f" | {len(self.unreadable)} unreadable image(s) skipped (see train.log)"
            for b in self.unreadable:
                log.warning("unreadable image skipped: %s", b)
        log.info(msg)
        self.progress.message(msg)

    def _finish(self) -> None:
        st = self.state
        if getattr(self, "_saved_step", None) != st.step:  # early stop between checkpoint epochs
            self._save_last()
        checks = _weight_checksums(self.raw_model) if self.dist.enabled else None
        best = self._best_metrics() if self.val_stream is not None and st.best_epoch >= 0 else None
        if not self.dist.main:
            return
        metrics = self.run.read_metrics()
        last = metrics[-1] if metrics else {}
        summary = {"model": self.cfg.model.name, "params": self.params[0], "trainable_params": self.params[1],
                   "dataset": self.cfg.data.train, "train_images": len(self.data.train),
                   "val_images": len(self.data.val) if self.data.val else 0, "classes": self.classes,
                   "best_val_top1": st.best_top1 if st.best_top1 >= 0 else None,
                   "best_epoch": st.best_epoch if st.best_epoch >= 0 else None, "epochs_run": st.epoch,
                   "steps": st.step, "wall_seconds": st.wall, "final": last, "device": str(self.device),
                   "world_size": self.dist.world, "unreadable_images": self.unreadable}
        if checks is not None:
            summary["ddp_weight_checksums"] = checks
        if best is not None:
            summary["best_val_metrics"] = best
        self.run.write_summary(summary)
        best = f"best val top-1 {st.best_top1:.2f}% (epoch {st.best_epoch + 1})" if st.best_top1 >= 0 else "no val"
        self.progress.message(f"done: {best}, {st.wall:.1f} s training | {self.run.path}")


# ---- helpers ---------------------------------------------------------------------------------------------------------
def _resume_config(ckpt: dict, overrides) -> Config:
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(RESUMABLE_OVERRIDES)]
    if bad:
        raise ConfigError(f"{bad[0].split('=')[0]}: cannot be changed when resuming (allowed: "
                          f"{', '.join(RESUMABLE_OVERRIDES)}); start a new run instead")
    if "optimizer" not in ckpt:
        raise ConfigError(f"{ckpt['path']}: holds no training state (best.pt); resume from a run dir or last.pt")
    missing = [k for k in ("progress", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt['path']}: training state without its {' and '.join(map(repr, missing))} "
                              f"field(s) (damaged or crafted)")
    cfg = checkpoint_config(ckpt)
    if cfg.model.name != ckpt["model_name"]:
        raise CheckpointError(f"{ckpt['path']}: its model_name {ckpt['model_name']!r} differs from its config's "
                              f"model.name {cfg.model.name!r} (damaged or crafted)")
    return load_config(to_dict(cfg), overrides)


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


def _progress(d: dict, path: str) -> Progress_:
    """`Progress_` from a checkpoint, each field of the type it has here (a number as a string would only fail
    somewhere deep in the loop)."""
    defaults = Progress_()
    unknown = [k for k in d if k not in asdict(defaults)]
    bad = [k for k, v in d.items() if k not in unknown and not (
        isinstance(v, (int, float)) and not isinstance(v, bool)
        and (isinstance(getattr(defaults, k), float) or isinstance(v, int)))]
    if unknown or bad:
        k = (unknown or bad)[0]
        raise CheckpointError(f"{path}: field 'progress' has " + (f"an unknown key {str(k)[:40]!r}" if unknown else
                                                                  f"{k} = {str(d[k])[:40]!r}, not a number"))
    return Progress_(**d)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _smoothing_at(epoch: int, tcfg) -> float:
    off = tcfg.smoothing_off_epoch
    return 0.0 if off is not None and epoch >= off else tcfg.label_smoothing


def _rng_state() -> dict:
    """Every generator's state as plain data (tensors, lists, tuples, numbers): what `torch.load(weights_only=True)`
    reads back without any allow-list. numpy's MT19937 keys (624 uint32) travel as an int64 tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]  # format 1 checkpoints hold an ndarray here, format 2 an int64 tensor
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda"])


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


def _weight_checksums(model: nn.Module) -> list[float]:
    """Sum of |w| over all parameters, gathered from every rank (they must agree under DDP)."""
    s = torch.stack([p.detach().double().abs().sum() for p in model.parameters()]).sum().reshape(1)
    return D.gather_cat(s.to(next(model.parameters()).device)).tolist()


def _epoch_line(r: dict, epochs: int) -> str:
    s = f"epoch {r['epoch'] + 1}/{epochs}  loss {r['train_loss']:.4f}  lr {r['lr']:.2e}"
    if "val_top1" in r:
        s += f"  val_loss {r['val_loss']:.4f}  val_top1 {r['val_top1']:.2f}%"
        s += f"  val_top5 {r['val_top5']:.2f}%" if r.get("val_top5") is not None else ""
        s += " *" if r.get("best") else ""
    return s + f"  {r['img_per_s']:.0f} img/s  {r['epoch_seconds']:.1f}s"


def _json(obj) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` whose file and folder settings that exist relative to the working directory are absolute
    (`data.train/val/extra` keep a `:split` suffix; names such as `digits` or a registered teacher stay as they are),
    so that `--resume`, `eval` and `report` work from any directory."""
    cfg = copy.deepcopy(cfg)

    def fix(value: str | None) -> str | None:
        if not value or value.split(":")[0] in NAMED_SOURCES:
            return value
        path, sep, split = value.partition(":") if not Path(value).exists() else (value, "", "")
        p = Path(path).expanduser()
        return str(p.resolve()) + sep + split if p.exists() else value

    d = cfg.data
    d.train, d.val, d.extra, d.cache_dir = fix(d.train), fix(d.val), fix(d.extra), fix(d.cache_dir)
    d.hsi.gt, d.hsi.extra_band = fix(d.hsi.gt), fix(d.hsi.extra_band)
    cfg.model.pretrained = fix(cfg.model.pretrained)
    cfg.distill.teacher = fix(cfg.distill.teacher)
    return cfg


def _install_signal_handlers(trainer: Trainer):
    """First Ctrl-C/SIGTERM: stop cleanly at the next step boundary. Second Ctrl-C: stop immediately."""
    def handler(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        trainer.stop_signal = signum

    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: no signal handling
        return {}


def _restore_signal_handlers(old: dict) -> None:
    for s, h in old.items():
        signal.signal(s, h)


def train(cfg: Config | None = None, *, resume=None, overrides=(), hooks=None) -> Path:
    """Library entry point: train (or resume) a run and return its directory."""
    return Trainer(cfg, resume=resume, overrides=overrides, hooks=hooks).fit()
