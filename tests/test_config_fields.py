"""Every config field does what its docstring says. Each field below was, at one audit, used by no recipe, test or
README line: a test here pins its behaviour, so a field that stops doing anything fails loudly. Fields read by the
trainer are observed from outside it (the optimizer it builds, files it writes, global torch state)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

import vitforge.checkpoint as checkpoint_module
from vitforge.config import AugConfig, Config, OptimConfig, load_config
from vitforge.data.augmentations import Frame, worker_ops
from vitforge.data.dataset import open_hsi
from vitforge.train import sam
from vitforge.train.ema import ModelEma
from vitforge.train.optim import build_optimizer
from vitforge.train.trainer import train

TINY = ["model.name=vit_demo", "model.args.depth=1", "data.train=digits",
        "data.val_split=0.2", "data.limit=200", "data.batch_size=50", "schedule.warmup_epochs=0",
        "run.progress=none", "run.tensorboard=false", "train.device=cpu", "train.threads=1",
        "train.verify_attention=false"]


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            yield from _fields(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


AUDITED = ("data.aug.rrc_ratio", "data.hsi.cube_key", "data.hsi.gt_key", "optim.fused", "optim.sam_adaptive",
           "ema.warmup_gamma", "train.deterministic", "train.ckpt_every_epochs")


def test_audited_fields_exist():
    assert set(AUDITED) <= set(_fields(Config))


def test_rrc_ratio_reaches_random_resized_crop():
    aug = AugConfig(crop="rrc", rrc_ratio=[0.5, 2.0], rrc_scale=[0.3, 0.9], hflip=False)
    ops = [t for t in worker_ops(aug, Frame(small=False, size=96)) if isinstance(t, v2.RandomResizedCrop)]
    assert len(ops) == 1 and ops[0].ratio == (0.5, 2.0) and ops[0].scale == (0.3, 0.9)


def _hsi_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(12, 12, 8)).astype(np.float32)
    decoy = rng.normal(size=(20, 20, 8)).astype(np.float32)  # larger: chosen when no key is given
    gt = np.zeros((12, 12), np.uint8)
    gt[:6, :] = 1
    gt[6:, :] = 2
    gt_decoy = np.ones((20, 20), np.uint8)
    scipy_io.savemat(tmp_path / "scene.mat", {"cube": cube, "decoy": decoy})
    scipy_io.savemat(tmp_path / "gt.mat", {"labels": gt, "decoy_gt": gt_decoy})
    np.save(tmp_path / "emap.npy", rng.normal(size=(12, 12)).astype(np.float32))
    return tmp_path / "scene.mat"


def test_hsi_cube_and_gt_keys_pick_the_named_variables(tmp_path):
    cube = _hsi_files(tmp_path)
    cfg = load_config(None, [f"data.train={cube}", f"data.hsi.gt={tmp_path / 'gt.mat'}",
                             f"data.hsi.extra_band={tmp_path / 'emap.npy'}", "data.hsi.cube_key=cube",
                             "data.hsi.gt_key=labels", "data.hsi.pca_components=4", "data.hsi.patch_size=3",
                             "data.hsi.train_fraction=0.5"]).data
    src, train_idx, test_idx = open_hsi(str(cube), cfg)
    assert len(src.labels) == 144 and sorted(set(src.labels.tolist())) == [0, 1]  # the 12 x 12 map, 2 classes
    assert len(train_idx) + len(test_idx) == 144
    cfg.hsi.cube_key = "nope"
    with pytest.raises(Exception, match="no variable 'nope' \\(found: cube, decoy\\)"):
        open_hsi(str(cube), cfg)


def test_fused_optimizer_option():
    w = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [w], "names": ["w"], "weight_decay": 0.0}]
    cpu = torch.device("cpu")
    assert not build_optimizer(groups, OptimConfig(), cpu).defaults["fused"]  # None: fused on CUDA only
    assert build_optimizer(groups, OptimConfig(fused=True), cpu).defaults["fused"]
    assert build_optimizer(groups, OptimConfig(name="sgd", fused=True), cpu).defaults["fused"]


def test_adaptive_sam_scales_the_perturbation_by_the_weights():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    w.grad = torch.randn(5)
    before = w.detach().clone()
    rho = 0.05
    eps = sam.perturb([w], rho, adaptive=True)[0]
    expect = rho * before.pow(2) * w.grad / torch.linalg.vector_norm(before.abs() * w.grad)  # ASAM, Kwon et al. 2021
    torch.testing.assert_close(eps, expect)
    torch.testing.assert_close(w.detach(), before + expect)
    sam.restore([w], [eps])
    plain = sam.perturb([w], rho, adaptive=False)[0]
    torch.testing.assert_close(plain, rho * w.grad / torch.linalg.vector_norm(w.grad))


@pytest.mark.parametrize("gamma", [1.0, 10.0])
def test_ema_power_warmup_gamma(gamma):
    ema = ModelEma(torch.nn.Linear(2, 2), warmup="power", power=0.75, gamma=gamma)
    for n in (0, 1, 9, 100):
        ema.num_updates.fill_(n)
        assert ema.effective_decay(0.999) == pytest.approx(min(0.999, 1 - (1 + n / gamma) ** -0.75))


def test_config_names_the_audited_fields_in_errors():
    with pytest.raises(Exception, match="train.ckpt_every_epochs"):
        load_config(None, ["train.ckpt_every_epochs=0"])
    with pytest.raises(Exception, match="ema.warmup_gamma"):
        load_config(None, ["ema.warmup_gamma=0"])


def test_ckpt_every_epochs_and_deterministic_in_a_run(tmp_path, monkeypatch):
    saved = []
    real = checkpoint_module.torch.save

    def recording_save(obj, f, *a, **k):
        if "last.pt" in str(f):
            saved.append(obj["progress"]["epoch"])
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", recording_save)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        train(load_config(None, [*TINY, "train.epochs=5", "train.ckpt_every_epochs=2", "train.deterministic=true",
                                 f"run.dir={tmp_path}", "run.name=r"]))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
    assert saved == [2, 4, 5]  # every second epoch, and always the last
