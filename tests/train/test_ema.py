"""EMA decay warm-up: the rules, their config, exact resume, and calibration of a short run's EMA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from vitforge.checkpoint import load_checkpoint
from vitforge.config import load_config
from vitforge.errors import ConfigError
from vitforge.eval.metrics import expected_calibration_error, reliability
from vitforge.train.ema import ModelEma, warmup_decay
from vitforge.train.trainer import Trainer, train


def test_warmup_rules():
    # tf: min(decay, (1 + n) / (10 + n))
    assert [warmup_decay(0.999, n, "tf") for n in (0, 1, 48)] == pytest.approx([0.1, 2 / 11, 49 / 58])
    assert warmup_decay(0.9, 10_000, "tf") == 0.9
    # power (timm ModelEmaV3): min(decay, 1 - (1 + n / gamma) ** -power); d_0 = 0
    assert warmup_decay(0.999, 0, "power") == 0.0
    assert warmup_decay(0.999, 48, "power") == pytest.approx(1 - 49 ** -0.75)
    assert warmup_decay(0.999, 8, "power", power=2 / 3, gamma=2.0) == pytest.approx(1 - 5 ** (-2 / 3))
    assert warmup_decay(0.99, 10**6, "power") == 0.99
    assert warmup_decay(0.999, 0, "off") == 0.999
    with pytest.raises(ValueError, match="unknown EMA warm-up rule 'linear'"):
        ModelEma(torch.nn.Linear(2, 2), "linear")


def test_power_warmup_first_update_copies_the_model_and_initial_weights_fade():
    m = torch.nn.Linear(3, 3)
    ema = ModelEma(m, "power")
    init = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, 0.999)
    torch.testing.assert_close(ema.module.weight, m.weight)  # d_0 = 0: nothing of the initial weights is left
    tf = ModelEma(torch.nn.Linear(3, 3), "tf")
    share = math.prod(warmup_decay(0.999, n, "tf") for n in range(48))  # weight of the initial weights after 48
    assert share == pytest.approx(math.factorial(9) * math.factorial(48) / math.factorial(57))
    assert share < 1e-9 and 0.999**48 > 0.95  # ... versus 95% without a warm-up
    assert int(tf.num_updates) == 0 and "num_updates" in tf.state_dict()  # saved with the weights
    assert not torch.equal(init, m.weight)


@pytest.mark.parametrize("given, expected", [("true", "tf"), ("false", "off"), ("on", "tf"), ("power", "power")])
def test_warmup_config_accepts_rule_names_and_booleans_of_earlier_versions(given, expected):
    assert load_config(None, [f"ema.warmup={given}"]).ema.warmup == expected


def test_warmup_config_errors():
    with pytest.raises(ConfigError, match=r"^ema.warmup: 'linear' is not one of tf, power, off$"):
        load_config(None, ["ema.warmup=linear"])
    with pytest.raises(ConfigError, match=r"^ema.warmup_power: must be > 0$"):
        load_config(None, ["ema.warmup_power=0"])


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer):
        if trainer.state.step == self.step:
            trainer.request_stop()


def test_power_warmup_resumes_exactly(tmp_path):
    base = ["model.name=vit_demo", "data.train=digits", "data.limit=256", "data.batch_size=32", "train.epochs=2",
            "train.max_steps=10", "ema.enabled=true", "ema.decay=0.999", "ema.warmup=power", "train.device=cpu",
            "run.progress=none", "run.tensorboard=false", "train.threads=1", f"run.dir={tmp_path}"]
    full = train(load_config(None, [*base, "run.name=full"]))
    t = Trainer(load_config(None, [*base, "run.name=cut"]), hooks=StopAt(4))
    cut = t.fit()
    assert t.interrupted and int(load_checkpoint(cut, prefer="last")["ema"]["num_updates"]) == 4
    train(resume=cut)
    a, b = load_checkpoint(full, prefer="last")["ema"], load_checkpoint(cut, prefer="last")["ema"]
    assert int(a["num_updates"]) == int(b["num_updates"]) == 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- a short fine-tuning-like run: 48 optimizer steps at decay 0.999 -------------------------------------------------
@pytest.fixture(scope="module")
def zeros_and_ones(tmp_path_factory):
    """The 360 zeros and ones of scikit-learn's digits as a two-class ImageFolder (a tiny real task)."""
    root = tmp_path_factory.mktemp("digits01")
    d = load_digits()
    for i, (img, t) in enumerate(zip(d.images, d.target, strict=True)):
        if t in (0, 1):
            (root / str(t)).mkdir(exist_ok=True)
            grey = np.rint(img * (255 / 16)).astype(np.uint8)
            Image.fromarray(grey).convert("RGB").save(root / str(t) / f"{i:04d}.png")
    return root


def _probs(model: torch.nn.Module, stream) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for x, y, _ in stream:
            probs.append(model(x).float().softmax(1))
            labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def _calibration(model: torch.nn.Module, stream) -> dict:
    """ECE (15 bins), accuracy, mean top-1 confidence and log-loss on a stream."""
    p, y = _probs(model, stream)
    correct = p.argmax(1) == y
    return {"ece": expected_calibration_error(reliability(p.max(1), correct)), "acc": float(correct.mean()),
            "conf": float(p.max(1).mean()), "nll": float(-np.log(p[np.arange(len(y)), y]).mean())}


def _short_run(root, tmp_path, warmup: str) -> Trainer:
    # 288 training images / batch 16 = 18 steps per epoch; 48 steps end a third of the way into epoch 3.
    cfg = load_config(None, [
        "model.name=resnet18_cifar", "model.args.layers=[1,1,1,1]", "model.args.widths=[16,32,64,128]",
        f"data.train={root}", "data.val_split=0.2", "data.batch_size=16", "data.aug.crop_padding=0",
        "data.aug.hflip=false", "optim.lr=2e-3", "train.epochs=3", "train.max_steps=48", "ema.enabled=true",
        "ema.decay=0.999", f"ema.warmup={warmup}", "train.device=cpu", "train.threads=1", "run.progress=none",
        "run.tensorboard=false", f"run.dir={tmp_path}", f"run.name={warmup}"])
    t = Trainer(cfg)
    t.fit()
    assert t.state.step == 48
    return t


@pytest.mark.parametrize("warmup", ["tf", "power"])
def test_ema_of_a_48_step_run_is_calibrated(zeros_and_ones, tmp_path, warmup):
    t = _short_run(zeros_and_ones, tmp_path, warmup)
    raw, ema = _calibration(t.raw_model, t.val_stream), _calibration(t.ema.module, t.val_stream)
    assert raw["acc"] >= 0.95 and ema["acc"] >= 0.95, (raw, ema)
    assert ema["ece"] < 0.05 and abs(ema["ece"] - raw["ece"]) <= 0.02, (raw, ema)
    assert ema["nll"] < 0.1, (raw, ema)
    best = load_checkpoint(t.run.path, prefer="best")  # the chosen best.pt holds the EMA weights (ema.eval)
    assert best["metrics"]["loss"] < 0.1 and best["metrics"]["top1"] >= 95


def test_without_warmup_a_48_step_ema_is_still_the_initial_model(zeros_and_ones, tmp_path):
    """The failure the warm-up prevents: 0.999^48 = 95% initial weights, so the EMA predicts ~0.5 for everything
    (log-loss ln 2) although the trained model is right on every held-out image."""
    t = _short_run(zeros_and_ones, tmp_path, "off")
    raw, ema = _calibration(t.raw_model, t.val_stream), _calibration(t.ema.module, t.val_stream)
    assert raw["acc"] >= 0.95 and raw["nll"] < 0.1
    assert ema["conf"] < 0.6 and ema["nll"] == pytest.approx(math.log(2), abs=0.05), ema
