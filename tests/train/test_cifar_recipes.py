"""The CIFAR-10 recipes of issue 4 (recipes/cifar10/): they load through `vitforge train --dry-run` (data resolved
relative to the repository root), keep the original projects' choices they claim to keep, and train a few steps on
CPU (models shrunk through `model.args`, two optimizer steps, a 64-image validation split)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vitforge.commands import cli
from vitforge.config import load_config
from vitforge.data import gpu_policies as G
from vitforge.models.build import build_model, model_kwargs
from vitforge.train.distill import DistillationLoss
from vitforge.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "cifar10"
NAMES = ["minivit", "deit_kd", "teacher_resnet", "teacher_fast", "cct_7_3x1", "sclusterformer_rgb64"]
FAST = ["data.limit=48", "data.val_split=64", "data.batch_size=16", "data.eval_batch_size=64", "train.max_steps=2",
        "train.device=cpu", 'train.compile="off"', "data.aug.backend=device", "run.tensorboard=false",
        "run.progress=none"]
TINY = {
    "minivit": [],
    "deit_kd": ["model.args.embed_dim=64", "model.args.depth=4", "model.args.num_heads=4",
                "model.args.class_attn_depth=2"],
    "teacher_resnet": ["model.args.widths=[8,16,16,32]"],
    "teacher_fast": ["model.args.widths=[8,16,16]"],
    "cct_7_3x1": ["model.args.embed_dim=64", "model.args.depth=2", "model.args.num_heads=2"],
    "sclusterformer_rgb64": [],
}
POLICY = {"minivit": G.AutoAugment, "deit_kd": G.TrivialAugmentWide, "teacher_resnet": G.TrivialAugmentWide,
          "teacher_fast": type(None), "cct_7_3x1": G.RandAugment,
          "sclusterformer_rgb64": G.TrivialAugmentWide}


def recipe(name: str) -> Path:
    return RECIPES / f"{name}.yaml"


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_resolves_the_data(name, cifar_parquet, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name ../shared/data/... relative to the repository root
    extra = []
    if name == "deit_kd":  # its teacher is a run of teacher_resnet.yaml, which must exist first
        assert cli.main(["train", str(recipe(name)), "--dry-run"]) == 2
        assert "distill.teacher: 'runs/teacher-resnet18' is not a registered model" in capsys.readouterr().err
        extra = ["distill.teacher=resnet18_cifar"]
    assert cli.main(["train", str(recipe(name)), "--dry-run", *extra]) == 0
    out = capsys.readouterr().out
    assert "# data: 45000 train / 5000 val images, 10 classes" in out
    cfg = load_config(recipe(name))
    params = sum(p.numel() for p in build_model(cfg.model.name, model_kwargs(cfg, num_classes=10)).parameters())
    assert f"parameters; input {64 if name == 'sclusterformer_rgb64' else 32}px" in out and f"{params:,} param" in out


def test_all_recipes_share_data_split_and_normalisation():
    cfgs = [load_config(recipe(n)) for n in NAMES]
    for c in cfgs:
        assert c.data.train == "../shared/data/cifar10/train.parquet"
        assert (c.data.val_split, c.data.split_seed, c.data.val) == (5000, 0, None)
        assert (c.data.mean, c.data.std) == (cfgs[0].data.mean, cfgs[0].data.std)  # teacher = student inputs


def test_minivit_keeps_the_vit_se_project_recipe():
    c = load_config(recipe("minivit"))
    assert c.model.name == "minivit_cifar"
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.no_decay_norm_bias) == ("adamw", 2e-3, 0.05, False)
    assert c.schedule.name == "cosine" and c.schedule.warmup_epochs > 0 and c.train.label_smoothing == 0.1
    a = c.data.aug
    assert (a.crop_padding, a.auto_augment, a.random_erasing, a.repeats) == (4, "cifar10", 0.25, 3)
    assert (c.data.mix.cutmix_alpha, c.data.mix.mixup_alpha, c.data.mix.prob) == (1.0, 0.0, 0.5)
    assert c.train.compile == "default" and not c.ema.enabled


def test_deit_kd_keeps_the_airl_vit_recipe():
    c = load_config(recipe("deit_kd"))
    assert c.model.name == "deit_kd_cifar" and c.data.aug.trivial_augment and c.data.aug.random_erasing == 0.25
    m = c.data.mix
    assert (m.mixup_alpha, m.cutmix_alpha, m.prob, m.switch_prob) == (0.4, 1.0, 1.0, 0.5)
    assert m.off_epoch == c.train.smoothing_off_epoch == c.train.epochs - 15  # clean last 15 epochs
    assert c.train.label_smoothing == 0.05 and c.train.clip_grad == 1.0
    assert (c.ema.enabled, c.ema.decay, c.ema.decay_end, c.ema.eval) == (True, 0.995, 0.9995, True)
    d = c.distill
    assert (d.kind, d.tau, d.alpha, d.reduction) == ("soft", 2.0, 0.5, "batchmean")
    assert c.schedule.warmup_epochs == 0.05 * c.train.epochs and c.schedule.warmup_start == 0.1
    teachers = {str(Path(t.run.dir) / t.run.name) for t in (load_config(recipe("teacher_resnet")),
                                                              load_config(recipe("teacher_fast")))}
    assert d.teacher in teachers


def _train(name: str, cifar: Path, tmp_path: Path, *extra: str) -> Trainer:
    cfg = load_config(recipe(name), [*FAST, *TINY[name], f"data.train={cifar}", f"run.dir={tmp_path}", *extra])
    trainer = Trainer(cfg)
    run = trainer.fit()
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and s["final"]["val_n"] == 64 and s["train_images"] == 48
    assert math.isfinite(s["final"]["train_loss"]) and math.isfinite(s["final"]["val_loss"])
    assert isinstance(trainer.train_stream.policy, POLICY[name])  # per-sample policy batched on the device
    return trainer


@pytest.mark.parametrize("name", ["minivit", "teacher_fast", "cct_7_3x1", "sclusterformer_rgb64"])
def test_recipe_trains_a_few_steps_on_cpu(name, cifar_parquet, tmp_path):
    _train(name, cifar_parquet, tmp_path)


def test_teacher_run_then_distilled_student(cifar_parquet, tmp_path):
    """teacher_resnet.yaml -> its run directory -> deit_kd.yaml with distill.teacher=<that run>."""
    teacher = _train("teacher_resnet", cifar_parquet, tmp_path)
    run = Path(teacher.run.path)
    assert run.name == "teacher-resnet18" and (run / "checkpoints" / "best.pt").is_file()
    student = _train("deit_kd", cifar_parquet, tmp_path, f"distill.teacher={run}")
    crit = student.criterion
    assert isinstance(crit, DistillationLoss) and (crit.tau, crit.alpha) == (2.0, 0.5)
    assert crit.teacher.stem[0].out_channels == 8 and not crit.teacher.training  # the tiny trained teacher
    assert student.ema is not None and student.criterion_base().label_smoothing == 0.05
