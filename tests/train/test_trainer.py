"""Training engine: learning, exact resume (in-process stop, SIGKILL, SIGINT), DDP, accumulation, schedules, EMA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vitforge.checkpoint import load_checkpoint, load_model
from vitforge.config import load_config
from vitforge.errors import CheckpointError, ConfigError
from vitforge.train.ema import ModelEma, ema_decay_at
from vitforge.train.optim import lr_at
from vitforge.train.trainer import Trainer, train

VF = [sys.executable, "-m", "vitforge"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# Everything that draws random numbers is on: dropout, drop path, crop, flip, erasing, Mixup/CutMix, EMA, accumulation.
BUSY = ["model.name=vit_demo", "model.args.drop_rate=0.1", "model.drop_path_rate=0.1", "data.train=digits",
        "data.limit=320", "data.val_split=0.2", "data.batch_size=32", "data.aug.crop_padding=1",
        "data.aug.random_erasing=0.25", "data.mix.mixup_alpha=0.4", "data.mix.cutmix_alpha=1.0", "data.mix.prob=0.8",
        "ema.enabled=true", "ema.decay=0.9", "train.grad_accum=2", "train.label_smoothing=0.1", "train.epochs=3",
        "schedule.warmup_epochs=1", "train.device=cpu", "run.progress=none", "train.threads=1"]


def _cfg(tmp_path: Path, *extra: str, name: str = "r"):
    return load_config(None, [*BUSY, f"run.dir={tmp_path}", f"run.name={name}", *extra])


def _final_state(run: Path) -> dict:
    ck = load_checkpoint(run, prefer="last")
    return {"model": ck["model"], "ema": ck["ema"], "step": ck["progress"]["step"]}


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert sa["step"] == sb["step"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    for k in sa["ema"]:
        assert torch.equal(sa["ema"][k], sb["ema"][k]), k
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    drop = ("img_per_s", "epoch_seconds", "peak_mem_mb", "train_loss")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == [
        {k: v for k, v in r.items() if k not in drop} for r in mb]
    # The epoch loss is a float sum whose grouping changes at the stop point: equal to rounding.
    assert [r["train_loss"] for r in ma] == pytest.approx([r["train_loss"] for r in mb], rel=1e-12)


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer):
        if trainer.state.step == self.step:
            trainer.request_stop()


def test_learns_and_writes_a_run_directory(tmp_path):
    run = train(load_config(None, ["data.train=digits", "train.epochs=4", "train.device=cpu", "run.progress=none",
                                   "data.batch_size=32", "optim.lr=0.003", "data.aug.crop_padding=0",
                                   "data.aug.hflip=false", f"run.dir={tmp_path}", "run.name=ok", "train.threads=1"]))
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "train.log", "checkpoints/last.pt",
              "checkpoints/best.pt"):
        assert (run / f).exists(), f
    assert list((run / "events").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert {"train_loss", "lr", "val_loss", "val_top1", "val_top5", "img_per_s", "epoch_seconds",
            "peak_mem_mb"} <= set(lines[0])
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_top1"] > 60 and summary["params"] == 136650 and summary["val_images"] == 180
    model, meta = load_model(run)  # the checkpoint alone rebuilds model and preprocessing
    assert meta["classes"] == [str(i) for i in range(10)] and meta["preprocess"]["img_size"] == 8
    assert meta["config"]["model"]["name"] == "vit_demo" and model(torch.zeros(1, 3, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("path", ["device", "workers"])
def test_exact_resume_after_stop(tmp_path, path):
    extra = ["data.device_cache=off", "data.num_workers=0"] if path == "workers" else []
    full = train(_cfg(tmp_path, *extra, name="full"))
    # 320 training images / batch 32 = 10 batches = 5 steps per epoch: step 7 is 2 steps into epoch 2.
    t = Trainer(_cfg(tmp_path, *extra, name="cut"), hooks=StopAt(7))
    cut = t.fit()
    progress = load_checkpoint(cut, prefer="last")["progress"]
    assert t.interrupted and (progress["epoch"], progress["batch"], progress["step"]) == (1, 4, 7)
    assert not (cut / "summary.json").exists()
    train(resume=cut)
    _assert_same_run(full, cut)


def test_resume_after_sigkill_sigint_and_sigterm(tmp_path):
    """A killed process loses at most the steps since its last checkpoint; resuming still ends identical."""
    base = [*BUSY, f"run.dir={tmp_path}", "train.epochs=2"]
    r = subprocess.run([*VF, "train", *base, "run.name=full"], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([*VF, "train", *base, "run.name=killed", "train.ckpt_every_steps=1"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(run, 3, proc)
    proc.kill()
    proc.wait()
    r = subprocess.run([*VF, "train", "--resume", str(run)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_same_run(tmp_path / "full", run)

    # Ctrl-C, and what a scheduler sends (SIGTERM): saved at a step boundary, exit status 128 + the signal.
    for sig, extra in ((signal.SIGINT, ["train.ckpt_every_steps=2"]), (signal.SIGTERM, [])):
        run = tmp_path / sig.name.lower()
        proc = subprocess.Popen([*VF, "train", *base, f"run.name={run.name}", *extra], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_step(run, 2 if extra else 1, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig and f"vitforge train --resume {run}" in err
        assert subprocess.run([*VF, "train", "--resume", str(run)], env=ENV, capture_output=True).returncode == 0
        _assert_same_run(tmp_path / "full", run)


def _wait_for_step(run: Path, step: int, proc, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if (run / "checkpoints/last.pt").exists() and load_checkpoint(run, "last")["progress"]["step"] >= step:
                return
        except CheckpointError:
            pass  # being written
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_ddp_two_processes_agree(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "vitforge", "train", *BUSY,
           f"run.dir={tmp_path}", "run.name=ddp", "train.epochs=2"]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2 and len(s["ddp_weight_checksums"]) == 2
    assert s["ddp_weight_checksums"][0] == s["ddp_weight_checksums"][1]
    # Each rank takes half of the 320 training images per epoch: 160 / 32 = 5 batches -> 3 steps (2 + 2 + 1).
    assert s["steps"] == 6 and s["final"]["val_top1"] > 0


def test_ddp_resume_after_sigkill_is_exact(tmp_path):
    """Each rank resumes its own RNG stream (dropout differs per rank), so a killed DDP run resumes exactly."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m",
                "vitforge", "train"]
    base = [*BUSY, f"run.dir={tmp_path}", "train.epochs=2"]
    r = subprocess.run([*torchrun, *base, "run.name=full"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "killed"
    proc = subprocess.Popen([*torchrun, *base, "run.name=killed", "train.ckpt_every_steps=1"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_step(run, 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(load_checkpoint(run, "last")["rng"]) == 2
    r = subprocess.run([*torchrun, "--resume", str(run)], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    _assert_same_run(tmp_path / "full", run)


def test_gradient_accumulation_matches_a_large_batch(tmp_path):
    plain = ["model.name=vit_demo", "data.train=digits", "data.limit=256", "data.aug.crop_padding=0",
             "data.aug.hflip=false", "train.device=cpu", "run.progress=none", "train.max_steps=3",
             f"run.dir={tmp_path}", "train.threads=1", "optim.name=sgd", "optim.lr=0.1"]  # SGD: linear in the grads
    big = train(load_config(None, [*plain, "data.batch_size=64", "run.name=big"]))
    acc = train(load_config(None, [*plain, "data.batch_size=32", "train.grad_accum=2", "run.name=acc"]))
    a, b = _final_state(big)["model"], _final_state(acc)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def test_sam_and_clipping_change_the_trajectory(tmp_path):
    base = ["model.name=vit_demo", "data.train=digits", "data.limit=200", "train.device=cpu", "run.progress=none",
            "train.max_steps=2", f"run.dir={tmp_path}", "train.threads=1", "train.clip_grad=1.0"]
    plain = _final_state(train(load_config(None, [*base, "run.name=p"])))["model"]
    sam = _final_state(train(load_config(None, [*base, "run.name=s", "optim.sam_rho=0.05"])))["model"]
    assert any(not torch.equal(plain[k], sam[k]) for k in plain)
    assert all(torch.isfinite(v).all() for v in sam.values())


def test_existing_run_is_never_overwritten_and_resume_rules(tmp_path):
    cfg = load_config(None, ["data.train=digits", "train.max_steps=1", "train.device=cpu", "run.progress=none",
                             f"run.dir={tmp_path}", "run.name=once", "train.threads=1"])
    run = train(cfg)
    before = (run / "checkpoints/last.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; continue it with `vitforge train --resume"):
        train(cfg)
    assert (run / "checkpoints/last.pt").read_bytes() == before
    with pytest.raises(ConfigError, match="model.name: cannot be changed when resuming"):
        Trainer(resume=run, overrides=["model.name=minivit_cifar"])
    with pytest.raises(ConfigError, match="holds no training state"):
        Trainer(resume=run / "checkpoints/best.pt")


def test_pretrained_from_another_model_is_a_clear_error(tmp_path):
    run = train(load_config(None, ["data.train=digits", "train.max_steps=1", "train.device=cpu",
                                   "run.progress=none", f"run.dir={tmp_path}", "run.name=a", "train.threads=1"]))
    other = load_config(None, ["data.train=digits", "model.name=vit_demo", "model.args.depth=2",
                               f"model.pretrained={run / 'checkpoints/best.pt'}", f"run.dir={tmp_path}"])
    with pytest.raises(CheckpointError, match=r"does not fit model vit_demo: .*unexpected"):
        Trainer(other)
    same = load_config(None, ["data.train=digits", f"model.pretrained={run / 'checkpoints/best.pt'}",
                              "train.max_steps=1", "train.device=cpu", "run.progress=none", f"run.dir={tmp_path}",
                              "run.name=b", "train.threads=1"])
    Trainer(same)  # same architecture loads


def test_lr_schedule_and_head_phase():
    from vitforge.config import ScheduleConfig

    s = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start=0.1, min_lr=1e-5)
    assert lr_at(0, total=100, warmup=10, peak=1e-3, cfg=s) == pytest.approx(1e-4)
    assert lr_at(10, total=100, warmup=10, peak=1e-3, cfg=s) == pytest.approx(1e-3)
    assert lr_at(55, total=100, warmup=10, peak=1e-3, cfg=s) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, total=100, warmup=10, peak=1e-3, cfg=s) == pytest.approx(1e-5)
    lin = ScheduleConfig(name="linear")
    assert lr_at(50, total=100, warmup=0, peak=1.0, cfg=lin) == pytest.approx(0.5)


def test_head_only_phase_freezes_the_backbone(tmp_path):
    cfg = load_config(None, ["data.train=digits", "data.limit=128", "train.epochs=2", "train.head_epochs=1",
                             "train.head_lr=0.01", "train.device=cpu", "run.progress=none", f"run.dir={tmp_path}",
                             "train.threads=1"])
    t = Trainer(cfg)
    start = {k: v.clone() for k, v in t.raw_model.state_dict().items()}
    t.cfg.train.epochs = 1  # run only the head phase
    t.fit()
    after = t.raw_model.state_dict()
    assert not torch.equal(start["head.weight"], after["head.weight"])
    assert torch.equal(start["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])


def test_ema_ramp_and_warmup():
    assert ema_decay_at(0, 300, 0.995, 0.9995) == pytest.approx(0.995)
    assert ema_decay_at(299, 300, 0.995, 0.9995) == pytest.approx(0.9995)
    assert ema_decay_at(7, 300, 0.99, None) == 0.99
    m = torch.nn.Linear(2, 2)
    ema = ModelEma(m, warmup=True)
    assert ema.effective_decay(0.999) == pytest.approx(0.1)
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, 0.5)  # warmup: min(0.5, 1/10) = 0.1 -> mostly the new weights
    torch.testing.assert_close(ema.module.weight, 0.1 * (m.weight - 1) + 0.9 * m.weight)


def test_sam_with_fp16_overflow_skips_the_step_and_backs_off(tmp_path):
    """An fp16 overflow in SAM's first pass must skip the step (finite weights) and lower the loss scale."""
    cfg = load_config(None, ["model.name=vit_demo", "data.train=digits", "data.limit=256", "train.device=cpu",
                             "run.progress=none", "train.max_steps=6", f"run.dir={tmp_path}", "train.threads=1",
                             "train.amp=fp16", "optim.sam_rho=0.05", "data.batch_size=32"])
    t = Trainer(cfg)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # high enough to overflow fp16 gradients at once
    t.fit()
    ck = load_checkpoint(t.run.path, prefer="last")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    assert ck["scaler"]["scale"] < 2.0**24
