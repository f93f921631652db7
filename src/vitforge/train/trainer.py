"""The training loop: one `Trainer` per run (single process, or one per rank under torchrun).

`Trainer(cfg)` builds every part the configuration describes (`train/setup.py`); `fit()` runs the loop in
`Trainer._train`: the epoch loop and one optimizer step, top to bottom.

Resume is exact: the data order and every augmentation are functions of (seed, epoch, batch); the checkpoint holds
model, optimizer, scaler, EMA, RNG states and the position inside the epoch. Ctrl-C (SIGINT) or SIGTERM asks the
loop to stop at the next optimizer-step boundary, where it saves `last.pt`; `vitforge train --resume RUN` continues
from there and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import resource
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn as nn

from vitforge import runtime as D
from vitforge.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from vitforge.config import Config, epoch_at, load_config, to_dict
from vitforge.data.sources import NAMED_SOURCES
from vitforge.errors import CheckpointError, ConfigError, VitforgeError
from vitforge.eval.evaluate import collect_logits, evaluate
from vitforge.eval.metrics import label_metrics
from vitforge.eval.verify import check_attention
from vitforge.models.backbones import classifier_names
from vitforge.train import sam
from vitforge.train.budget import Budget
from vitforge.train.ema import ema_decay_at
from vitforge.train.oom import micro_batches
from vitforge.train.optim import set_lr
from vitforge.train.rundir import EpochReporter, RunDir, setup_file_logging
from vitforge.train.setup import TrainSetup, build, rng_state
from vitforge.train.trackers import run_info

log = logging.getLogger("vitforge")
HEAD_NAMES = ("head", "head_dist", "fc", "classifier")
# Keys a resumed run may change (anything else would make the checkpoint inconsistent with its config).
RESUMABLE_OVERRIDES = ("train.", "run.progress", "run.tensorboard", "data.num_workers", "data.eval_batch_size")


class StopRequested(Exception):
    """Raised inside the loop when a stop was requested; the run is saved and can be resumed."""


class Trainer:
    """Build everything a config describes (`train.setup.build`), then `fit()`.

    The built parts (model, optimizer, streams, EMA, lr schedule, ...) are `trainer.parts`, and read as attributes of
    the trainer too: `trainer.optimizer` is `trainer.parts.optimizer`, `trainer.state` is where the run is.

    Args:
        cfg: the run's configuration (ignored when resuming: the checkpoint's config is used, plus `overrides`).
        resume: a run directory or last.pt to continue.
        overrides: `key=value` changes applied on resume (train.*, run.progress, ... only).
        hooks: optional object with `on_step(trainer)` called after each optimizer step (tests, callbacks).
        download: False skips initial weights that would be downloaded (dry runs).
        started: the `vitforge.train.budget.clock()` reading train.budget counts from (default: before the run is
            built; the CLI passes its process start, so that start-up and imports count too).
    """

    def __init__(self, cfg: Config | None = None, *, resume: str | Path | None = None, overrides=(), hooks=None,
                 download: bool = True, started: float | None = None):
        ckpt = load_checkpoint(resume, prefer="last") if resume is not None else None
        if ckpt is not None:
            cfg = _resume_config(ckpt, overrides)
        else:  # the run records where its files are, wherever it is resumed or evaluated from
            assert cfg is not None
            cfg = absolute_paths(cfg)
        self.cfg = cfg
        self.budget = Budget.for_run(cfg, ckpt, started)  # train.budget: None, or its clock and plan
        self.parts: TrainSetup = build(cfg, ckpt, download=download)
        self.resumed = ckpt is not None
        self.run: RunDir | None = RunDir(Path(ckpt["path"]).parent.parent) if ckpt else None
        self.hooks = hooks
        self.reporter = EpochReporter(cfg.run.progress, self.parts.dist.main)
        self.stop_requested = False  # set by request_stop() or a signal; the loop stops at the next step boundary
        self.stop_signal: int | None = None  # the signal that asked to stop (the CLI's exit status is 128 + it)
        self.interrupted = False  # fit() returned early (stopped and saved; resumable), not at the end of the run
        self._saved_step: int | None = None  # the step last.pt holds (every rank agrees on it)

    def __getattr__(self, name: str):
        """The built parts as attributes (only names the trainer itself does not have reach here)."""
        if name == "parts":  # not built: no recursion
            raise AttributeError(name)
        return getattr(self.parts, name)

    def request_stop(self) -> None:
        """Stop at the next optimizer-step boundary, save last.pt, and return from `fit()` (Ctrl-C does this)."""
        self.stop_requested = True

    # ---- a run: directory, logging, trackers, signals around the loop ---------------------------------------------
    def fit(self) -> Path:
        """Train to the end (or until stopped / early-stopped); returns the run directory."""
        p = self.parts
        if self.run is None:
            self.run = _create_run(self.cfg, p.dist)  # takes the run's lock
        elif p.dist.main:
            self.run.acquire()  # one process per run: a second `--resume` of a live run is refused
        handler, old_signals = None, {}
        try:
            handler = setup_file_logging(self.run) if p.dist.main else None
            info = run_info(self.run, self.cfg, p.state.epoch if self.resumed else None)
            for tracker in p.trackers:  # metrics.jsonl (truncated to the resumed epoch), TensorBoard, W&B, MLflow
                tracker.start(info)
            self._announce()
            p.oom.say = self.reporter.message  # the back-off's one line also reaches the terminal
            old_signals = _install_signal_handlers(self)
            if self.budget is not None:  # measure the speed, fix train.epochs/max_steps to end inside the budget
                self.budget.prepare(self)
            self._train()
        except StopRequested:
            self._save_last()
            note = (f"stopped at epoch {p.state.epoch + 1}, batch {p.state.batch}; "
                    f"resume with: vitforge train --resume {self.run.path}")
            log.info(note)
            if p.dist.main:
                self.reporter.message(note, always=True)
            self.interrupted = True
        finally:
            _restore_signal_handlers(old_signals)
            for tracker in p.trackers:
                tracker.close()
            if handler:
                logging.getLogger("vitforge").removeHandler(handler)
            if p.dist.main:
                self.run.release()
        return self.run.path

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def _train(self) -> None:
        """The epoch loop, and inside it one optimizer step, top to bottom."""
        p, cfg, st = self.parts, self.cfg, self.parts.state
        t = cfg.train
        # Summed loss·batch not yet read back (reading it every step would synchronise with the device).
        loss_acc = torch.zeros((), device=p.device, dtype=p.acc_dtype)

        def fold_loss() -> None:  # into the checkpointed epoch total; synchronises with the device
            st.loss_sum += float(loss_acc)
            loss_acc.zero_()

        while st.epoch < t.epochs and not self._out_of_steps():
            # ---- epoch start: phase, label smoothing, data order
            t0, seen0 = time.perf_counter(), st.seen  # a resumed epoch counts only this session's images/s
            p.model.train()
            if t.head_epochs:  # two-phase fine-tuning: only the classifier trains in the first head_epochs
                _train_head_only(p.raw_model, st.epoch < t.head_epochs)
            smoothing = smoothing_at(st.epoch, t)
            p.criterion_base().label_smoothing = smoothing
            p.train_stream.set_epoch(st.epoch, st.batch, smoothing)
            self.reporter.start_epoch(st.epoch, t.epochs, len(p.train_stream), st.batch)
            if p.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(p.device)

            for window in step_windows(p.train_stream, t.grad_accum):  # the batches of one optimizer step
                # ---- one optimizer step over the window's micro-batches
                set_lr(p.optimizer, p.lr_for(st.step))
                if st.step == 0 and not st.seen and t.verify_attention and p.dist.main:
                    _verify_attention(p.raw_model, window[0][0], self.run.path)
                loss_acc += self.optimizer_step(window)  # forward/backward (SAM: twice), clipping, optimizer step
                st.step, st.batch = st.step + 1, st.batch + len(window)
                st.seen += sum(x.shape[0] for x, _ in window)
                if p.ema is not None and st.step % cfg.ema.every == 0:
                    p.ema.update(p.raw_model, ema_decay_at(st.epoch, t.epochs, cfg.ema.decay, cfg.ema.decay_end))

                # ---- after the step: progress, hooks, a requested stop, a mid-epoch checkpoint
                if self.reporter.bar is not None and st.step % 10 == 0:
                    fold_loss()
                    self.reporter.update(10 * t.grad_accum, loss=st.loss_sum / max(st.seen, 1))
                if self.hooks is not None and hasattr(self.hooks, "on_step"):
                    self.hooks.on_step(self)
                if self._stop_now():
                    fold_loss()
                    raise StopRequested
                if t.ckpt_every_steps and st.step % t.ckpt_every_steps == 0 and st.batch < len(p.train_stream):
                    fold_loss()
                    self._save_last()
                if self._out_of_steps():
                    break

            # ---- epoch end: metrics, validation, logging, checkpoint, early stop
            fold_loss()
            train_secs = time.perf_counter() - t0
            st.wall += train_secs
            record = self._end_epoch(train_secs, st.seen - seen0)
            if t.early_stop and "val_top1" in record and st.evals_since_best >= t.early_stop:
                self.reporter.message(f"early stop: no better val top-1 for {t.early_stop} evaluations")
                break
        self._finish()

    def optimizer_step(self, window: list) -> torch.Tensor:
        """One optimizer step over the window's micro-batches; returns the summed loss·batch (on the device). The loop
        runs it, and so does train.budget's speed measurement (`train/budget.py`)."""
        p, cfg = self.parts, self.cfg
        params = [q for g in p.optimizer.param_groups for q in g["params"]]
        loss = self._forward_backward(window)  # grads accumulated over the window, under autocast
        skip = False
        if cfg.optim.sam_rho > 0:  # SAM (train/sam.py): gradients again at w + e(w), then back to w
            if p.scaler is not None and not sam.grads_finite(params):  # fp16 overflow: skip, back off
                p.scaler.update(new_scale=p.scaler.get_scale() * p.scaler.get_backoff_factor())
                skip = True
            else:  # e(w) does not depend on the loss scale: fp16 gradients are used as they are
                eps = sam.perturb(params, cfg.optim.sam_rho, cfg.optim.sam_adaptive)
                p.optimizer.zero_grad(set_to_none=True)
                with sam.frozen_norm_stats(p.raw_model):  # BN running statistics count each batch once
                    self._forward_backward(window)
                sam.restore(params, eps)
        if not skip:
            if p.scaler is not None:
                p.scaler.unscale_(p.optimizer)
            if cfg.train.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
            if p.scaler is not None:
                p.scaler.step(p.optimizer)  # skipped (and the scale backed off) on inf/NaN gradients
                p.scaler.update()
            else:
                p.optimizer.step()
        p.optimizer.zero_grad(set_to_none=True)
        return loss

    def _forward_backward(self, window: list) -> torch.Tensor:
        """Gradients of the window's mean loss, accumulated over its micro-batches (DDP syncs on the last one only);
        returns the summed loss·batch (on the device). A device out-of-memory error halves the micro-batch and
        retries the window from its start (`train/oom.py`: same images, same effective batch)."""
        p = self.parts
        return p.oom.run(lambda size: self._passes(window, size), reset=lambda: p.optimizer.zero_grad(set_to_none=True))

    def _passes(self, window: list, size: int) -> torch.Tensor:
        p = self.parts
        total = torch.zeros((), device=p.device, dtype=p.acc_dtype)
        for x, y, weight, last in micro_batches(window, size):
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = p.model.no_sync() if p.dist.enabled and not last else contextlib.nullcontext()
            with sync:
                with p.autocast():
                    loss = p.criterion(p.model(x), y, x)
                scaled = loss * weight  # its images' share of the step: 1 / grad_accum for a whole batch
                (p.scaler.scale(scaled) if p.scaler is not None else scaled).backward()
            total += loss.detach().to(p.acc_dtype) * x.shape[0]
        return total

    def _out_of_steps(self) -> bool:
        return self.cfg.train.max_steps is not None and self.parts.state.step >= self.cfg.train.max_steps

    def _stop_now(self) -> bool:
        p = self.parts
        if not p.dist.enabled:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=p.device)
        D.all_reduce_sum(flag)  # every rank must stop at the same step (one tiny collective per step under DDP)
        return bool(flag.item() > 0)

    # ---- epoch end: evaluation, logging, checkpoints ------------------------------------------------------------
    def _end_epoch(self, train_secs: float, session_seen: int) -> dict:
        p, cfg, st = self.parts, self.cfg, self.parts.state
        seen = torch.tensor([st.seen, st.loss_sum, session_seen], device=p.device, dtype=p.acc_dtype)
        D.all_reduce_sum(seen)
        record = {"epoch": st.epoch, "step": st.step, "train_loss": seen[1].item() / max(seen[0].item(), 1),
                  "lr": p.lr_for(max(st.step - 1, 0)), "img_per_s": seen[2].item() / max(train_secs, 1e-9),
                  "epoch_seconds": train_secs, "peak_mem_mb": _peak_mem_mb(p.device)}
        last = st.epoch + 1 == cfg.train.epochs or self._out_of_steps()
        if p.val_stream is not None and ((st.epoch + 1) % cfg.train.eval_every == 0 or last):
            record.update(self._validate())
        st.epoch, st.batch, st.loss_sum, st.seen = st.epoch + 1, 0, 0.0, 0
        for tracker in p.trackers:  # metrics.jsonl, TensorBoard, W&B, MLflow (main rank only)
            tracker.log(st.step, record)
        if p.dist.main:
            self.reporter.end_epoch(_epoch_line(record, cfg.train.epochs))
        if st.epoch % cfg.train.ckpt_every_epochs == 0 or last:
            self._save_last()
        return record

    def _validate(self) -> dict:
        p, st = self.parts, self.parts.state
        if p.dist.enabled:  # BN running statistics drift per rank after the last forward: score rank 0's
            D.broadcast_buffers(p.raw_model)
            if p.ema is not None:
                D.broadcast_buffers(p.ema)
        model = p.ema.module if (p.ema is not None and self.cfg.ema.eval) else p.raw_model
        m = evaluate(model, p.val_stream, len(p.classes), autocast=p.autocast)
        rec = {"val_loss": m["loss"], "val_top1": m["top1"], "val_n": m["n"]}
        if m["top5"] is not None:  # only for more than 5 classes
            rec["val_top5"] = m["top5"]
        if m["top1"] > st.best_top1:
            st.best_top1, st.best_epoch, st.evals_since_best = m["top1"], st.epoch, 0
            rec["best"] = True
            if p.dist.main:
                self._save_best(model, m)
        else:
            st.evals_since_best += 1
        return rec

    # ---- persistence -----------------------------------------------------------------------------------------------
    def _save_last(self) -> None:
        p = self.parts
        self._saved_step = p.state.step  # on every rank: decisions that depend on it must agree
        rng = D.gather_objects(rng_state())  # every rank's generators: each resumes its own dropout stream
        if not p.dist.main:
            D.barrier()
            return
        payload = {**_payload(p), "model": p.raw_model.state_dict(), "optimizer": p.optimizer.state_dict(),
                   "scaler": p.scaler.state_dict() if p.scaler is not None else None,
                   "ema": p.ema.state_dict() if p.ema is not None else None,
                   "eval_weights": "ema" if (p.ema is not None and self.cfg.ema.eval) else "model",
                   "progress": asdict(p.state), "rng": rng, "oom": p.oom.state_dict(),
                   "budget": self.budget.state_dict() if self.budget is not None else None}
        save_checkpoint(self.run.last, payload)
        D.barrier()

    def _save_best(self, model: nn.Module, metrics: dict) -> None:
        p = self.parts
        payload = {**_payload(p), "model": model.state_dict(), "eval_weights": "model",
                   "metrics": {k: metrics[k] for k in ("top1", "top5", "loss", "n")}, "progress": asdict(p.state)}
        save_checkpoint(self.run.best, payload)

    def _announce(self) -> None:
        p = self.parts
        if not p.dist.main:
            return
        d = p.data
        msg = (f"run {self.run.path} | model {self.cfg.model.name} ({p.params[0]:,} params) | "
               f"{len(d.train)} train / {len(d.val) if d.val else 0} val images, {len(p.classes)} classes | "
               f"device {p.device}{f' x{p.dist.world}' if p.dist.enabled else ''} | "
               f"input {p.pre.img_size}px | {p.steps_per_epoch} steps/epoch")
        for note in p.notes:  # e.g. what data.batch_size=auto chose
            msg += f" | {note}"
        if p.unreadable:
            msg += f" | {len(p.unreadable)} unreadable image(s) skipped (see train.log)"
            for b in p.unreadable:
                log.warning("unreadable image skipped: %s", b)
        log.info(msg)
        self.reporter.message(msg)

    def _finish(self) -> None:
        p, st = self.parts, self.parts.state
        if self._saved_step != st.step:  # early stop between checkpoint epochs
            self._save_last()
        checks = _weight_checksums(p.raw_model) if p.dist.enabled else None
        best = _best_metrics(p, self.run.best) if p.val_stream is not None and st.best_epoch >= 0 else None
        if not p.dist.main:
            return
        metrics = self.run.read_metrics()
        last = metrics[-1] if metrics else {}
        summary = {"model": self.cfg.model.name, "params": p.params[0], "trainable_params": p.params[1],
                   "dataset": self.cfg.data.train, "train_images": len(p.data.train),
                   "val_images": len(p.data.val) if p.data.val else 0, "classes": p.classes,
                   "best_val_top1": st.best_top1 if st.best_top1 >= 0 else None,
                   "best_epoch": st.best_epoch if st.best_epoch >= 0 else None, "epochs_run": st.epoch,
                   "steps": st.step, "wall_seconds": st.wall, "final": last, "device": str(p.device),
                   "world_size": p.dist.world, "unreadable_images": p.unreadable}
        if checks is not None:
            summary["ddp_weight_checksums"] = checks
        if best is not None:
            summary["best_val_metrics"] = best
        if self.budget is not None:  # budget_s, planned_s, actual_s, the plan
            summary["budget"] = self.budget.summary()
        self.run.write_summary(summary)
        best = f"best val top-1 {st.best_top1:.2f}% (epoch {st.best_epoch + 1})" if st.best_top1 >= 0 else "no val"
        self.reporter.message(f"done: {best}, {st.wall:.1f} s training | {self.run.path}")


def step_windows(stream: Iterable, accum: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches of each optimizer step: windows of `accum` (x, y) batches, the last one shorter when the epoch's
    batch count is not a multiple of `accum` (`_forward_backward` splits them into micro-batches)."""
    window: list = []
    for x, y, _ in stream:
        window.append((x, y))
        if len(window) == accum:
            yield window
            window = []
    if window:
        yield window


def _train_head_only(model: nn.Module, head_only: bool) -> None:
    """Two-phase fine-tuning: with `head_only`, only the classifier's parameters take gradients."""
    heads = HEAD_NAMES + classifier_names(model)  # library backbones name their own classifier
    for name, q in model.named_parameters():
        q.requires_grad_(not head_only or name.split(".")[0] in heads)


def _verify_attention(model: nn.Module, x: torch.Tensor, run_path: Path) -> None:
    """`train.verify_attention`: check every attention module on the first batch, write the report, fail on a bad
    block."""
    with torch.no_grad():
        report = check_attention(model, x[:2])
    model.train()
    if report.get("blocks"):
        (run_path / "attention_check.json").write_text(_json(report))
        log.info("attention check: %d blocks, max |row-sum - 1| = %.2e, ok=%s", len(report["blocks"]),
                 report.get("max_err", 0.0), report["ok"])
        if not report["ok"]:
            bad = [b["name"] for b in report["blocks"] if not b["ok"]]
            raise VitforgeError(f"train.verify_attention: the attention check failed in {len(bad)} block(s) "
                                f"(first: {bad[0]}); see {run_path / 'attention_check.json'}")


def _payload(p: TrainSetup) -> dict:
    """What every checkpoint holds besides weights and state: enough to rebuild the model and its preprocessing."""
    return {"model_name": p.cfg.model.name, "model_kwargs": p.raw_model.vitforge_kwargs, "classes": p.classes,
            "preprocess": p.pre.to_dict(), "config": to_dict(p.cfg)}


def _best_metrics(p: TrainSetup, best_path: Path) -> dict:
    """best.pt on the validation split: accuracy, balanced accuracy (= AA), Cohen's kappa, macro F1, per-class
    recall. (Hyperspectral papers report OA = top-1, AA and kappa.)"""
    model = copy.deepcopy(p.raw_model)
    model.load_state_dict(load_checkpoint(best_path)["model"])
    logits, labels, _ = collect_logits(model, p.val_stream, autocast=p.autocast)
    m = label_metrics(labels.cpu().numpy(), logits.argmax(1).cpu().numpy(), len(p.classes))
    return {"top1": m["top1"], "balanced_accuracy": m["balanced_accuracy"], "kappa": m["kappa"],
            "macro_f1": m["macro_f1"],
            "per_class_recall": dict(zip(p.classes, (m["recall"] * 100).tolist(), strict=True))}


def _create_run(cfg: Config, dist: D.DistInfo) -> RunDir:
    run = RunDir.create(cfg, dataset_name=cfg.data.train) if dist.main else None
    if run is not None:
        run.acquire()  # before anything is written: a run started at the same moment under this name loses
    if dist.enabled:  # every rank needs the same path
        box = [str(run.path) if run else None]
        tdist.broadcast_object_list(box, src=0)
        run = run or RunDir(Path(box[0]))
    if dist.main:
        run.write_config(cfg)
    return run


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


def smoothing_at(epoch: int, tcfg) -> float:
    off = tcfg.smoothing_off_epoch  # an epoch, or a fraction of train.epochs
    return 0.0 if off is not None and epoch >= epoch_at(off, tcfg.epochs) else tcfg.label_smoothing


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
