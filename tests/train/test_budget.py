"""train.budget: duration parsing, the plan's arithmetic, a budgeted run is the epoch run of its planned length
(bitwise), exact resume of the stored plan, the summary, DDP (one plan for every rank) and a budget for a whole
`vitforge cv`.

The budget's clock is replaced by a fake one that advances a fixed tick per reading, so every measured time, and
with it the plan, is the same on every machine: no test depends on how fast this one is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vitforge.checkpoint import load_checkpoint
from vitforge.commands.cv import CrossValidation
from vitforge.config import load_config, parse_duration
from vitforge.errors import ConfigError
from vitforge.train import budget as B
from vitforge.train.optim import lr_at
from vitforge.train.trainer import Trainer, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Dropout, drop path, crop, erasing, Mixup/CutMix (off after half the run), label smoothing (off after 0.8 of it),
# EMA and accumulation: every schedule that a planned length moves.
BUSY = ["model.name=vit_demo", "model.args.drop_rate=0.1", "model.drop_path_rate=0.1", "data.train=digits",
        "data.limit=320", "data.val_split=0.2", "data.batch_size=32", "data.aug.crop_padding=1",
        "data.aug.random_erasing=0.25", "data.mix.mixup_alpha=0.4", "data.mix.cutmix_alpha=1.0", "data.mix.prob=0.8",
        "data.mix.off_epoch=0.5", "train.smoothing_off_epoch=0.8", "ema.enabled=true", "ema.decay=0.9",
        "ema.decay_end=0.95", "train.grad_accum=2", "train.label_smoothing=0.1", "train.epochs=3",
        "schedule.warmup_epochs=1", "train.device=cpu", "run.progress=none", "train.threads=1"]
BUDGET = "train.budget=4.3s"
SPARSE = ["train.eval_every=10", "train.ckpt_every_epochs=10"]  # validate and save at the end only


class FakeClock:
    """Advances `tick` seconds at every reading."""

    def __init__(self, tick: float = 0.05):
        self.t, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


@pytest.fixture
def fake_clock(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(B, "clock", clock)
    return clock


def _cfg(tmp_path: Path, *extra: str, name: str = "r"):
    return load_config(None, [*BUSY, f"run.dir={tmp_path}", f"run.name={name}", *extra])


def _assert_same_weights(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a, prefer="last"), load_checkpoint(b, prefer="last")
    assert ca["progress"]["step"] == cb["progress"]["step"]
    for part in ("model", "ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    drop = ("img_per_s", "epoch_seconds", "peak_mem_mb", "train_loss")
    ma, mb = ([{k: v for k, v in json.loads(x).items() if k not in drop} for x in (r / "metrics.jsonl").read_text()
               .splitlines()] for r in (a, b))
    assert ma == mb


# ---- parsing ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [("900", 900), (900, 900), ("12.5", 12.5), ("90s", 90), ("15m", 900),
                                            ("15min", 900), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400),
                                            ("1h2m3s", 3723), (" 15M ", 900)])
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["15x", "0", "-5", "m", "1h30", "h30m", "inf", "nan", "", "15 m s", "1e400"])
def test_bad_durations_name_the_key(value):
    with pytest.raises(ConfigError, match=r"^train\.budget: .* is not a duration > 0"):
        parse_duration(value)


def test_config_reads_a_budget():
    assert load_config(None, ["train.budget=15m"]).train.budget_seconds == 900
    assert load_config(None, ["train.budget=900"]).train.budget_seconds == 900  # a YAML number
    assert load_config({"train": {"budget": 90}}).train.budget == "90"
    assert load_config(None, []).train.budget_seconds is None
    with pytest.raises(ConfigError, match=r"^train\.budget: '2d'"):
        load_config(None, ["train.budget=2d"])
    with pytest.raises(ConfigError, match=r"^train\.smoothing_off_epoch"):
        load_config(None, ["train.smoothing_off_epoch=1.5"])


# ---- the plan's arithmetic -------------------------------------------------------------------------------------------
COSTS = B.Costs(step_s=0.5, images_per_step=64, epoch_s=0.1, eval_s=2.0, save_s=0.3, best_s=0.1)
RUN = dict(steps_per_epoch=10, eval_every=2, ckpt_every_epochs=1)


def test_run_seconds_counts_steps_epochs_evaluations_and_saves():
    assert B.evaluations(5, 2) == 3 and B.evaluations(4, 2) == 2 and B.evaluations(1, 3) == 1
    # 20 steps = 2 epochs: 2 epoch starts, 1 validation (+ best.pt), 2 checkpoints, the final evaluation of best.pt.
    assert B.run_seconds(20, COSTS, **RUN) == pytest.approx(20 * 0.5 + 2 * 0.1 + 1 * 2.1 + 2 * 0.3 + 2.0)
    # 21 steps start a third epoch, which ends with a validation: 0.5 + 0.1 + 2.1 + 0.3 more.
    assert B.run_seconds(21, COSTS, **RUN) == pytest.approx(B.run_seconds(20, COSTS, **RUN) + 3.0)
    assert B.run_seconds(20, COSTS, **RUN, ckpt_every_steps=5) == pytest.approx(
        B.run_seconds(20, COSTS, **RUN) + 4 * 0.3)
    no_val = B.Costs(step_s=0.5, images_per_step=64)
    assert B.run_seconds(20, no_val, **RUN) == 10.0


@pytest.mark.parametrize("available", [3.0, 5.0, 14.9, 15.0, 17.8, 100.0, 1234.5])
def test_fit_steps_is_the_longest_run_that_fits(available):
    n = B.fit_steps(available, COSTS, **RUN)
    assert n == 0 or B.run_seconds(n, COSTS, **RUN) <= available
    assert B.run_seconds(n + 1, COSTS, **RUN) > available
    assert B.fit_steps(14.9, COSTS, **RUN) == 20  # exactly the 20-step run above
    assert B.fit_steps(available, COSTS, cap=7, **RUN) == min(n, 7)  # train.max_steps caps the plan


def test_plan_line():
    plan = B.Plan(budget="15m", budget_s=900, steps=3412, epochs=12, steps_per_epoch=294, planned_s=870,
                  img_per_s=412.3, step_s=0.3, eval_s=1, save_s=0.1, best_s=0.1, epoch_s=0.01, measured_at_s=20)
    assert plan.line() == "budget 15m: 3,412 steps ≈ 11.6 epochs at 412 img/s measured"
    plan.budget = "900"
    assert plan.line().startswith("budget 900s: ")


# ---- a budgeted run --------------------------------------------------------------------------------------------------
def test_budgeted_run_is_the_epoch_run_of_its_planned_length(tmp_path, fake_clock):
    run = train(_cfg(tmp_path, BUDGET, *SPARSE, name="budget"))
    s = json.loads((run / "summary.json").read_text())["budget"]
    n, e = s["planned_steps"], s["planned_epochs"]
    # The plan: the longest run whose predicted cost fits in the budget less the margin, after what was spent.
    costs = B.Costs(step_s=s["step_s"], images_per_step=64, epoch_s=s["epoch_s"], eval_s=s["eval_s"],
                    save_s=s["save_s"], best_s=s["best_s"])
    run_args = dict(steps_per_epoch=5, eval_every=10, ckpt_every_epochs=10)
    assert n == B.fit_steps(4.3 * (1 - B.SAFETY) - s["measured_at_s"], costs, **run_args)
    assert e == -(-n // 5) and e not in (3, n // 5)  # another length than the recipe's, with a partial last epoch
    assert s["budget_s"] == 4.3 and s["planned_s"] <= 4.3 * (1 - B.SAFETY) and s["actual_s"] > s["measured_at_s"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == n and summary["epochs_run"] == e
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (saved["epochs"], saved["max_steps"], saved["budget"]) == (e, n, "4.3s")

    # The schedule ends at the planned step: the last step ran at lr_at(n - 1), lr_at(n) is the minimum.
    cfg = load_config(None, [*BUSY, f"train.epochs={e}"])
    lr = lambda step: lr_at(step, total=n, warmup=5, peak=cfg.optim.lr, cfg=cfg.schedule)  # noqa: E731
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == n and last["lr"] == pytest.approx(lr(n - 1)) and lr(n) == cfg.schedule.min_lr

    # Bitwise the run configured with those numbers (the measuring steps left no trace; mixing, smoothing and the
    # EMA ramp given as fractions of the run follow the planned epochs).
    same = train(_cfg(tmp_path, *SPARSE, f"train.epochs={e}", f"train.max_steps={n}", name="steps"))
    _assert_same_weights(run, same)


def test_budgeted_run_resumes_its_stored_plan_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "clock", FakeClock())
    full = train(_cfg(tmp_path, BUDGET, name="full"))
    planned = json.loads((full / "summary.json").read_text())["budget"]["planned_steps"]

    class StopAt:
        def on_step(self, trainer):
            if trainer.state.step == 7:
                trainer.request_stop()

    monkeypatch.setattr(B, "clock", FakeClock())
    cut = Trainer(_cfg(tmp_path, BUDGET, name="cut"), hooks=StopAt())
    cut.fit()
    assert cut.interrupted
    stored = load_checkpoint(cut.run.path, prefer="last")["budget"]
    assert stored["plan"]["steps"] == planned and stored["elapsed_s"] > stored["plan"]["measured_at_s"]
    # A clock 10x slower would plan far fewer steps: a resumed run does not measure again, it continues its plan.
    monkeypatch.setattr(B, "clock", FakeClock(tick=0.5))
    train(resume=cut.run.path)
    _assert_same_weights(full, cut.run.path)
    s = json.loads((cut.run.path / "summary.json").read_text())["budget"]
    assert s["planned_steps"] == planned and s["actual_s"] > stored["elapsed_s"]  # earlier sessions count

    with pytest.raises(ConfigError, match=r"^train\.budget: this run was planned for 4.3s"):
        Trainer(resume=cut.run.path, overrides=["train.budget=1h"])
    plain = train(_cfg(tmp_path, "train.max_steps=2", name="plain"))
    with pytest.raises(ConfigError, match=r"^train\.budget: a resumed run keeps the length"):
        Trainer(resume=plain, overrides=["train.budget=1h"])


def test_a_budget_too_small_is_a_config_error(tmp_path, fake_clock):
    with pytest.raises(ConfigError, match=r"^train\.budget: 0.5s leaves no time to train"):
        train(_cfg(tmp_path, "train.budget=0.5s"))
    # Time for a few steps, but not past the warmup: the lr would never decay.
    with pytest.raises(ConfigError, match=r"^train\.budget: 1\.6s leaves time for \d+ optimizer step.*warmup"):
        train(_cfg(tmp_path, "train.budget=1.6s", *SPARSE, "schedule.warmup_epochs=3", "train.epochs=5", name="w"))


# ---- DDP -------------------------------------------------------------------------------------------------------------
def test_ddp_ranks_train_one_plan(tmp_path):
    """Each rank measures its own speed; rank 0's plan is broadcast, so both ranks stop at the same step (a rank that
    planned alone would hang the other at its next collective)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vitforge", "train", *BUSY,
           f"run.dir={tmp_path}", "run.name=ddp", "train.budget=40s", "train.max_steps=12"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["ddp_weight_checksums"][0] == s["ddp_weight_checksums"][1]
    # 3 steps per epoch per rank; train.max_steps caps the plan (a fast machine would plan more).
    assert 6 < s["budget"]["planned_steps"] == s["steps"] <= 12
    assert s["budget"]["img_per_s"] > 0 and "budget 40s: " in r.stderr


# ---- vitforge cv -----------------------------------------------------------------------------------------------------
def test_cv_shares_one_budget_between_its_folds(tmp_path, fake_clock):
    cfg = load_config(None, [*BUSY, "data.limit=240", "train.budget=9s", f"run.dir={tmp_path}", "run.name=cv"])
    cv = CrossValidation(cfg, 2)
    summary = cv.run()
    shares = [yaml.safe_load((tmp_path / "cv" / f"fold_{k}" / "config.yaml").read_text())["train"]["budget"]
              for k in range(2)]
    folds = [json.loads((tmp_path / "cv" / f"fold_{k}" / "summary.json").read_text())["budget"] for k in range(2)]
    done = cv.progress()["done"]
    assert [f["budget_s"] for f in folds] == [float(x) for x in shares]
    # Fold 0: half of what was left when it started; fold 1: all that was left, less fold 0's out-of-fold time.
    assert folds[0]["budget_s"] < 9 / 2 and folds[1]["budget_s"] < 9 - done["0"]["seconds"]
    assert done["0"]["seconds"] >= folds[0]["actual_s"]  # the fold's training and its out-of-fold predictions
    assert summary["budget"]["budget_s"] == 9 and summary["budget"]["actual_s"] >= sum(
        done[k]["seconds"] for k in ("0", "1"))


def test_cv_fold_budget_arithmetic(tmp_path, fake_clock):
    cv = CrossValidation(load_config(None, ["train.budget=100", f"run.dir={tmp_path}"]), 4, started=fake_clock.t)
    cv.earlier_s, cv.oof_s = 10.0, 2.0
    fake_clock.tick = 0.0  # frozen: 10 s spent in earlier sessions, none in this one
    assert cv.fold_budget(3) == pytest.approx((100 - 10) / 3 - 2)
    cv.earlier_s = 99.0
    with pytest.raises(ConfigError, match=r"^train\.budget: 100 for the whole 4-fold CV is spent"):
        cv.fold_budget(1)
