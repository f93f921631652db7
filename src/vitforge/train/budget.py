"""Time-budgeted training (`train.budget`): measure the run's own speed, then fix its length so that it ends inside
the budget.

The budget is wall-clock from the moment the run starts counting (the process start under the CLI, the Trainer's
creation in a library call): setup, compilation, the measurement itself, every validation and checkpoint, and the
final evaluation of best.pt all count. Before the first real step `Budget.prepare`

1. runs a few optimizer steps through the trainer's own step (data stream, forward/backward, SAM, clipping,
   optimizer, EMA) -- the first ones untimed (compilation, allocator and optimizer-state warm-up), then timed between
   two device synchronisations; times the first batch of an epoch (the stream's start-up latency), a few validation
   batches, and writing a checkpoint;
2. restores everything those steps changed (weights, buffers, optimizer, scaler, EMA, RNGs, OOM back-off) exactly,
   so the run that follows is bitwise the run of its planned length;
3. on rank 0, picks the largest number of optimizer steps N whose predicted cost (`run_seconds`: steps, epoch
   starts, validations, checkpoints, the final evaluation) fits in what is left of the budget less a safety margin,
   and broadcasts it;
4. sets train.max_steps = N and train.epochs = ceil(N / steps per epoch) and rebuilds the lr schedule for N steps.

From then on the run is an epoch run of that length: the lr decays to its minimum at step N, the EMA ramp, label
smoothing and mixing windows given as fractions of train.epochs refer to the planned epochs, and the final partial
epoch stops at step N (as train.max_steps does). A run configured with those two numbers and no budget ends with the
same weights. The plan (and the seconds spent so far) is saved in last.pt; a resumed run continues it unchanged, so
resume stays exact, and the seconds of earlier sessions count in the summary's `actual_s`.

Why a schedule fitted to the budget rather than a run stopped when time is up (Lightning's `max_time`): a schedule
that decays to its minimum exactly at the end of the budget trains a better model in the same time (Li et al.,
"Budgeted Training: Rethinking Deep Neural Network Training Under Resource Constraints", ICLR 2020).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, fields

import torch

from vitforge import runtime as D
from vitforge.checkpoint import save_checkpoint
from vitforge.config import load_config, parse_duration, to_dict
from vitforge.errors import CheckpointError, ConfigError
from vitforge.train.optim import lr_schedule, set_lr
from vitforge.train.setup import rng_state, set_rng_state

log = logging.getLogger("vitforge")

SAFETY = 0.03  # plan to end this fraction of the budget early: step times measured over seconds vary by a few %
MIN_TIMED_STEPS, MAX_TIMED_STEPS = 1, 50  # slow steps: the warm-up step and one timed one (both are undone)
EVAL_TIMED_BATCHES = 2


def clock() -> float:
    """The budget's clock (monotonic seconds); tests replace it."""
    return time.monotonic()


def process_start() -> float:
    """The `clock()` reading of this process's start (the CLI's budgets count from there: imports included)."""
    return clock() - D.process_age()


@dataclass
class Costs:
    """Measured seconds of what a run does (rank 0's measurement)."""

    step_s: float  # one optimizer step, data included (steady state)
    images_per_step: int  # images of one optimizer step over all ranks
    epoch_s: float = 0.0  # an epoch's start: the stream's first batch
    eval_s: float = 0.0  # one validation pass (0 without validation data)
    save_s: float = 0.0  # writing last.pt (model, optimizer, EMA, RNG states)
    best_s: float = 0.0  # writing best.pt (weights only)


@dataclass
class Plan:
    """The decision, saved in last.pt (plain numbers) and reported in summary.json."""

    budget: str  # as given (15m)
    budget_s: float
    steps: int  # planned optimizer steps (train.max_steps)
    epochs: int  # ceil(steps / steps per epoch) (train.epochs)
    steps_per_epoch: int
    planned_s: float  # predicted seconds from the start of the clock to the end of the run
    img_per_s: float  # measured training images/s (all ranks)
    step_s: float
    eval_s: float
    save_s: float
    best_s: float
    epoch_s: float
    measured_at_s: float  # seconds spent when the plan was made (setup, compilation, measurement)

    def line(self) -> str:
        """`budget 15m: 3,412 steps ≈ 11.6 epochs at 412 img/s measured`."""
        spec = self.budget if not _is_number(self.budget) else f"{self.budget}s"
        return (f"budget {spec}: {self.steps:,} steps ≈ {self.steps / self.steps_per_epoch:.1f} epochs at "
                f"{self.img_per_s:,.0f} img/s measured")

    @classmethod
    def from_dict(cls, d: dict, path: str) -> Plan:
        names = {f.name: f.type for f in fields(cls)}
        ok = isinstance(d, dict) and set(d) >= set(names) and isinstance(d["budget"], str) and all(
            isinstance(d[k], (int, float)) and not isinstance(d[k], bool) for k in names if k != "budget")
        if not ok:
            raise CheckpointError(f"{path}: field 'budget' is not a train.budget plan (damaged or crafted)")
        return cls(**{k: d[k] for k in names})


def evaluations(epochs: int, every: int) -> int:
    """Validations of an `epochs`-epoch run: every `every` epochs and after the last."""
    return epochs // every + (1 if epochs % every else 0)


def run_seconds(steps: int, costs: Costs, *, steps_per_epoch: int, eval_every: int, ckpt_every_epochs: int,
                ckpt_every_steps: int | None = None) -> float:
    """Predicted seconds of a run of `steps` optimizer steps from its first step to its end: the steps, each epoch's
    start, the validations (each may write best.pt), the checkpoints (every `ckpt_every_epochs` epochs and the last
    one; `ckpt_every_steps` inside epochs) and the final evaluation of best.pt."""
    epochs = math.ceil(steps / steps_per_epoch)
    evals = evaluations(epochs, eval_every) if costs.eval_s > 0 else 0
    saves = evaluations(epochs, ckpt_every_epochs) + (steps // ckpt_every_steps if ckpt_every_steps else 0)
    final = costs.eval_s  # summary.json's metrics of best.pt: one more pass over the validation data
    return (steps * costs.step_s + epochs * costs.epoch_s + evals * (costs.eval_s + costs.best_s)
            + saves * costs.save_s + final)


def fit_steps(available_s: float, costs: Costs, *, cap: int | None = None, **run) -> int:
    """The largest number of steps whose `run_seconds` fits in `available_s` (0 if not even one step does), at most
    `cap`. `run_seconds` grows with the steps, so a bisection finds it."""
    lo, hi = 0, max(0, int(available_s / max(costs.step_s, 1e-9)))  # the steps alone bound it
    if cap is not None:
        hi = min(hi, cap)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if run_seconds(mid, costs, **run) <= available_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Budget:
    """`train.budget` of one run: its clock, its plan (made by `prepare`, or restored from last.pt) and the seconds
    spent in earlier sessions.

    Args:
        spec: train.budget as configured.
        started: the clock reading the budget counts from.
        stored: the checkpoint's `budget` field when resuming.
    """

    def __init__(self, spec: str, started: float, stored: dict | None = None, path: str = "last.pt"):
        self.spec, self.budget_s, self.started = spec, parse_duration(spec), started
        self.plan: Plan | None = None
        self.before_s = 0.0  # seconds spent by earlier sessions (up to their last checkpoint)
        if stored is not None:
            self.plan = Plan.from_dict(stored.get("plan"), path)
            before = stored.get("elapsed_s")
            if not isinstance(before, (int, float)) or isinstance(before, bool) or not before >= 0:
                raise CheckpointError(f"{path}: field 'budget' has no elapsed_s (damaged or crafted)")
            self.before_s = float(before)

    @classmethod
    def for_run(cls, cfg, ckpt: dict | None, started: float | None = None) -> Budget | None:
        """The run's budget (None without train.budget), counting from `started` (default: now). A resumed run keeps
        the plan its last.pt holds; a budget cannot be added to, or changed in, a run that already has its
        schedule."""
        spec = cfg.train.budget
        stored = ckpt.get("budget") if ckpt else None
        if ckpt is not None and (spec is None) != (stored is None):
            raise ConfigError("train.budget: a resumed run keeps the length it started with " + (
                "(it had no budget); start a new run to train to a budget" if stored is None else
                "(its budget plan); it cannot be removed"))
        if spec is None:
            return None
        budget = cls(spec, clock() if started is None else started, stored, ckpt["path"] if ckpt else "last.pt")
        if budget.plan is not None and parse_duration(spec) != budget.plan.budget_s:
            raise ConfigError(f"train.budget: this run was planned for {budget.plan.budget}; a resumed run continues "
                              f"its plan ({budget.plan.steps:,} steps), start a new run for another budget")
        return budget

    def elapsed(self) -> float:
        """Seconds spent on this run: earlier sessions plus this one."""
        return self.before_s + clock() - self.started

    def state_dict(self) -> dict:
        """What last.pt keeps: the plan and the seconds spent so far."""
        return {"plan": asdict(self.plan) if self.plan else None, "elapsed_s": self.elapsed()}

    def summary(self) -> dict:
        """summary.json's `budget`: the budget, the plan and the seconds it took."""
        p = self.plan
        actual = self.elapsed()
        return {"budget": self.spec, "budget_s": self.budget_s, "planned_s": p.planned_s, "actual_s": actual,
                "over_pct": 100 * (actual / self.budget_s - 1), "planned_steps": p.steps, "planned_epochs": p.epochs,
                "img_per_s": p.img_per_s, "step_s": p.step_s, "eval_s": p.eval_s, "save_s": p.save_s,
                "best_s": p.best_s, "epoch_s": p.epoch_s, "measured_at_s": p.measured_at_s}

    # ---- before the first step -------------------------------------------------------------------------------------
    def prepare(self, trainer) -> None:
        """Measure, plan (rank 0, broadcast) and apply; a resumed run only checks its stored plan. `trainer` is the
        `Trainer` (its `parts`, `cfg`, `run`, `reporter` and `optimizer_step(window)`)."""
        p = trainer.parts
        if self.plan is None:
            costs = measure(trainer, self.budget_s)
            decision = None
            if p.dist.main:
                try:
                    decision = asdict(self._decide(costs, p.cfg, p.steps_per_epoch))
                except ConfigError as e:
                    decision = {"error": str(e)}
            decision = D.broadcast_object(decision)  # one plan for every rank
            if "error" in decision:
                raise ConfigError(decision["error"])
            self.plan = Plan(**decision)
            apply_plan(p, self.plan)
            if p.dist.main:
                trainer.run.write_config(p.cfg)  # config.yaml says the planned length
                log.info("%s (train.budget: planned %.1f s of %.1f s: %.3f s/step, %.2f s/validation, %.2f s/save, "
                         "%.1f s spent before training)", self.plan.line(), self.plan.planned_s, self.budget_s,
                         self.plan.step_s, self.plan.eval_s, self.plan.save_s, self.plan.measured_at_s)
                trainer.reporter.message(self.plan.line(), always=True)

    def _decide(self, costs: Costs, cfg, steps_per_epoch: int) -> Plan:
        t = cfg.train
        spent = self.elapsed()
        run = dict(steps_per_epoch=steps_per_epoch, eval_every=t.eval_every, ckpt_every_epochs=t.ckpt_every_epochs,
                   ckpt_every_steps=t.ckpt_every_steps)
        steps = fit_steps(self.budget_s * (1 - SAFETY) - spent, costs, cap=t.max_steps, **run)
        img_s = costs.images_per_step / costs.step_s
        about = f"{steps:,} optimizer step(s) ({steps / steps_per_epoch:.2f} epochs at {img_s:,.0f} img/s measured)"
        if steps < 1:
            raise ConfigError(f"train.budget: {self.spec} leaves no time to train: {spent:.1f} s went to setup and "
                              f"measuring, and one step with its evaluation takes "
                              f"{run_seconds(1, costs, **run):.1f} s; give more time")
        warmup = int(round(cfg.schedule.warmup_epochs * steps_per_epoch)) + t.head_epochs * steps_per_epoch
        if steps <= warmup:
            raise ConfigError(f"train.budget: {self.spec} leaves time for {about}, not more than the {warmup} steps of "
                              f"schedule.warmup_epochs/train.head_epochs; give more time or a shorter warmup")
        epochs = math.ceil(steps / steps_per_epoch)
        try:  # the recipe's epoch settings must still make sense for the planned epochs (head phase, mixing window)
            load_config(to_dict(cfg), [f"train.epochs={epochs}", f"train.max_steps={steps}"])
        except ConfigError as e:
            raise ConfigError(f"train.budget: {self.spec} leaves time for {about}, too short for this recipe: "
                              f"{e}") from None
        return Plan(budget=str(self.spec), budget_s=self.budget_s, steps=steps, epochs=epochs,
                    steps_per_epoch=steps_per_epoch, planned_s=spent + run_seconds(steps, costs, **run),
                    img_per_s=img_s, step_s=costs.step_s, eval_s=costs.eval_s, save_s=costs.save_s,
                    best_s=costs.best_s, epoch_s=costs.epoch_s, measured_at_s=spent)


def apply_plan(p, plan: Plan) -> None:
    """Make the built run (`TrainSetup`) the epoch run of the plan's length: train.epochs/max_steps, the lr schedule
    and the stream's epoch count (mixing windows given as fractions of the run)."""
    t = p.cfg.train
    t.epochs, t.max_steps = plan.epochs, plan.steps
    p.total_steps = plan.steps
    p.lr_for = lr_schedule(p.cfg, p.steps_per_epoch, plan.steps)
    p.train_stream.epochs = plan.epochs


# ---- measuring -------------------------------------------------------------------------------------------------------
def measure(trainer, budget_s: float) -> Costs:
    """Time this run's optimizer steps, an epoch's start, a validation pass and a checkpoint, then restore every state
    the steps changed. Every rank runs the same steps (DDP's collectives); rank 0's numbers decide."""
    p = trainer.parts
    saved = _snapshot(p)
    try:
        costs = _time_steps(trainer, budget_s)
        if p.val_stream is not None:
            costs.eval_s = _time_validation(p)
        if p.dist.main:
            costs.save_s, costs.best_s = _time_saves(p, trainer.run.path)
    finally:
        _restore(p, saved)
    return costs


def _windows(p):
    """The optimizer steps' windows of (x, y) batches, epoch after epoch (epoch 0, 1, ... of the data order)."""
    accum = p.cfg.train.grad_accum
    for epoch in itertools.count():
        p.train_stream.set_epoch(epoch, 0, p.cfg.train.label_smoothing)
        it = iter(p.train_stream)
        while window := [(x, y) for x, y, _ in itertools.islice(it, accum)]:
            yield window


def _time_steps(trainer, budget_s: float) -> Costs:
    p = trainer.parts
    p.model.train()
    set_lr(p.optimizer, p.lr_for(0))
    windows = _windows(p)
    t0 = clock()
    first = next(windows)
    D.synchronize(p.device)
    epoch_s = clock() - t0  # the stream's start-up: the first batch of an epoch
    warm = [first] + ([next(windows)] if p.cfg.train.compile != "off" else [])  # compilation, optimizer state
    t0 = clock()
    for k, w in enumerate(warm, start=1):
        _step(trainer, p, w, k)
    D.synchronize(p.device)
    warm_s = (clock() - t0) / len(warm)
    # As many timed steps as fit in ~1% of the budget (judged by the warm-up step), the same count on every rank.
    n = D.broadcast_object(max(MIN_TIMED_STEPS, min(MAX_TIMED_STEPS, int(0.01 * budget_s / max(warm_s, 1e-6)))))
    images = 0
    t0 = clock()
    for k, w in enumerate(itertools.islice(windows, n), start=len(warm) + 1):
        _step(trainer, p, w, k)
        images += sum(x.shape[0] for x, _ in w)
    D.synchronize(p.device)
    step_s = (clock() - t0) / n
    windows.close()
    return Costs(step_s=step_s, images_per_step=round(images / n) * p.dist.world, epoch_s=epoch_s)


def _step(trainer, p, window, k: int) -> None:
    """Optimizer step number `k` (1-based) as the loop runs it, with its EMA update every ema.every steps."""
    trainer.optimizer_step(window)
    if p.ema is not None and k % p.cfg.ema.every == 0:
        p.ema.update(p.raw_model, p.cfg.ema.decay)


@torch.no_grad()
def _time_validation(p) -> float:
    """One validation pass: the first batch's latency, then the per-batch time of a few batches times the batches."""
    model = p.ema.module if (p.ema is not None and p.cfg.ema.eval) else p.raw_model
    was_training = model.training
    model.eval()
    batches = len(p.val_stream)

    def passes():
        while True:
            yield from p.val_stream

    try:
        it = passes()
        t0 = clock()
        x, _, _ = next(it)
        D.synchronize(p.device)
        fill_s = clock() - t0
        with p.autocast():
            model(x)  # warm-up
        D.synchronize(p.device)
        n = min(EVAL_TIMED_BATCHES, batches)
        t0 = clock()
        for x, _, _ in itertools.islice(it, n):
            with p.autocast():
                model(x)
        D.synchronize(p.device)
        per_batch = (clock() - t0) / n
        it.close()
    finally:
        model.train(was_training)
    return fill_s + per_batch * batches


def _time_saves(p, run_dir) -> tuple[float, float]:
    """Writing last.pt (model, optimizer, EMA, RNG states) and best.pt (weights) as the run writes them: the payload
    built (the config as a dict, the state dicts) and saved (`save_checkpoint`: provenance, temporary file, rename),
    to a probe file that is removed afterwards."""
    probe = run_dir / "checkpoints" / ".budget-probe.pt"

    def common() -> dict:
        return {"config": to_dict(p.cfg), "classes": p.classes, "preprocess": p.pre.to_dict(),
                "model": p.raw_model.state_dict()}

    out = []
    try:
        for payload in (lambda: {**common(), "optimizer": p.optimizer.state_dict(), "rng": [rng_state()],
                                 "ema": p.ema.state_dict() if p.ema is not None else None}, common):
            t0 = clock()
            save_checkpoint(probe, payload())
            out.append(clock() - t0)
    finally:
        probe.unlink(missing_ok=True)
    return out[0], out[1]


def _snapshot(p) -> dict:
    clone = lambda sd: {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)  # noqa: E731
                        for k, v in sd.items()}
    return {"model": clone(p.raw_model.state_dict()), "optimizer": copy.deepcopy(p.optimizer.state_dict()),
            "scaler": p.scaler.state_dict() if p.scaler is not None else None,
            "ema": clone(p.ema.state_dict()) if p.ema is not None else None, "oom": p.oom.state_dict(),
            "rng": rng_state(), "training": p.raw_model.training}


def _restore(p, s: dict) -> None:
    p.raw_model.load_state_dict(s["model"])
    p.optimizer.load_state_dict(s["optimizer"])
    p.optimizer.zero_grad(set_to_none=True)
    if p.scaler is not None:
        p.scaler.load_state_dict(s["scaler"])
    if p.ema is not None:
        p.ema.load_state_dict(s["ema"])
    p.oom.load_state_dict(s["oom"])
    set_rng_state(s["rng"], p.device)
    p.raw_model.train(s["training"])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
