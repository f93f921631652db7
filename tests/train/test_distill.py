"""Knowledge distillation (issue 3): KD terms, DeiT/batchmean reductions, hard KD on the mixed batch, teachers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.config import DistillConfig
from vitforge.errors import ConfigError
from vitforge.models.registry import create_model
from vitforge.train import distill
from vitforge.train.distill import DistillationLoss, build_criterion, build_teacher, hard_kd, soft_kd
from vitforge.train.losses import ClassificationLoss

K = 10


class LinearTeacher(nn.Module):
    """A deterministic teacher that remembers the batch it was fed."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, K)
        self.num_classes = K
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.fc(x.flatten(1)) * 5


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_kd_is_zero_when_student_matches_teacher(tau):
    z = torch.randn(8, K)
    assert soft_kd(z, z.clone(), tau=tau).abs().item() < 1e-6
    assert soft_kd(z, z + 3.0, tau=tau).abs().item() < 1e-5  # softmax is shift-invariant
    assert soft_kd(z, torch.randn(8, K), tau=tau).item() > 1e-3


def test_deit_reduction_is_num_classes_times_smaller():
    zs, zt = torch.randn(8, K), torch.randn(8, K)
    bm, deit = soft_kd(zs, zt, tau=2.0), soft_kd(zs, zt, tau=2.0, reduction="deit")
    assert bm.item() / deit.item() == pytest.approx(K, rel=1e-6)
    ref = F.kl_div(F.log_softmax(zs / 2, -1), F.softmax(zt / 2, -1), reduction="batchmean") * 4  # Hinton, τ² = 4
    assert bm.item() == pytest.approx(ref.item(), rel=1e-5)


def test_soft_kd_loss_at_tau1_is_base_only_when_heads_match_teacher():
    torch.manual_seed(0)
    teacher, images, y = LinearTeacher(), torch.randn(4, 3, 4, 4), torch.randint(0, K, (4,))
    loss_fn = DistillationLoss(ClassificationLoss(), teacher, kind="soft", alpha=0.5, tau=1.0)
    with torch.no_grad():
        t = teacher(images)
    cls = torch.randn(4, K)
    loss = loss_fn((cls, t.clone()), y, images)
    assert loss_fn.last_terms["kd"].abs().item() < 1e-6
    assert loss.item() == pytest.approx(0.5 * F.cross_entropy(cls, y).item(), rel=1e-6)


def test_ce_on_cls_head_and_kd_on_dist_head():
    torch.manual_seed(0)
    teacher, images, y = LinearTeacher(), torch.randn(4, 3, 4, 4), torch.randint(0, K, (4,))
    with torch.no_grad():
        t = teacher(images)
    loss_fn = DistillationLoss(ClassificationLoss(), teacher, kind="soft", alpha=0.3, tau=2.0)
    cls = torch.randn(4, K, requires_grad=True)
    dist = torch.randn(4, K, requires_grad=True)
    loss = loss_fn((cls, dist), y, images)
    base, kd = F.cross_entropy(cls, y), soft_kd(dist, t, tau=2.0)
    assert loss.item() == pytest.approx((0.7 * base + 0.3 * kd).item(), rel=1e-6)
    loss.backward()
    g_cls_only = torch.autograd.grad(0.7 * F.cross_entropy(cls, y), cls)[0]
    assert torch.allclose(cls.grad, g_cls_only, atol=1e-7)  # the CLS head sees only the true labels
    assert dist.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_single_head_student_gets_both_terms():
    torch.manual_seed(0)
    teacher, images, y = LinearTeacher(), torch.randn(4, 3, 4, 4), torch.randint(0, K, (4,))
    z = torch.randn(4, K)
    loss = DistillationLoss(ClassificationLoss(), teacher, alpha=0.5, tau=2.0)(z, y, images)
    with torch.no_grad():
        expected = 0.5 * F.cross_entropy(z, y) + 0.5 * soft_kd(z, teacher(images), tau=2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_hard_kd_uses_teacher_argmax_on_the_mixed_batch():
    torch.manual_seed(0)
    teacher = LinearTeacher()
    x = torch.randn(8, 3, 4, 4)
    mixed = 0.6 * x + 0.4 * x.flip(0)  # what Mixup hands to the student
    y_soft = 0.6 * F.one_hot(torch.arange(8) % K, K).float() + 0.4 * F.one_hot(torch.arange(8).flip(0) % K, K).float()
    with torch.no_grad():
        labels_mixed, labels_clean = teacher(mixed).argmax(-1), teacher(x).argmax(-1)
    assert not torch.equal(labels_mixed, labels_clean)  # precondition: the two batches disagree somewhere
    dist = torch.randn(8, K)
    loss_fn = DistillationLoss(ClassificationLoss(), teacher, kind="hard", alpha=0.5)
    loss_fn((torch.randn(8, K), dist), y_soft, mixed)
    assert teacher.seen is mixed
    kd = loss_fn.last_terms["kd"].item()
    assert kd == pytest.approx(F.cross_entropy(dist, labels_mixed).item(), rel=1e-6)
    assert kd != pytest.approx(F.cross_entropy(dist, labels_clean).item(), rel=1e-3)
    assert hard_kd(dist, teacher(mixed)).item() == pytest.approx(kd, rel=1e-6)


def test_teacher_stays_frozen_and_in_eval_mode():
    teacher = build_teacher("minivit_cifar", num_classes=K, device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    loss_fn = DistillationLoss(ClassificationLoss(), teacher).train()
    assert loss_fn.training and not teacher.training


def test_build_teacher_from_timm_name():
    teacher = build_teacher("timm:resnet18", num_classes=K, device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, K)


def test_build_teacher_from_checkpoint_uses_load_model(monkeypatch, tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    calls = []

    def load_model(p, *, device="cpu", **_):
        calls.append((str(p), device))
        return create_model("vit_demo", num_classes=K).train(), {"model_name": "vit_demo"}

    monkeypatch.setattr(distill, "load_model", load_model)
    teacher = build_teacher(str(path), num_classes=K, device="cpu")
    assert calls == [(str(path), "cpu")]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="10 classes, the student 5"):
        build_teacher(str(path), num_classes=5, device="cpu")


def test_build_teacher_rejects_unknown_spec():
    with pytest.raises(ConfigError, match="distill.teacher"):
        build_teacher("no_such_model_or_path", num_classes=K, device="cpu")
    with pytest.raises(ConfigError, match="^distill.teacher: timm has no model 'nosuch_model'"):
        build_teacher("timm:nosuch_model", num_classes=K, device="cpu")


def test_build_criterion():
    base = ClassificationLoss()
    assert build_criterion(None, base, num_classes=K, device="cpu") is base
    assert build_criterion(DistillConfig(), base, num_classes=K, device="cpu") is base
    cfg = DistillConfig(teacher="minivit_cifar", kind="hard", alpha=0.25, tau=3.0, reduction="deit")
    crit = build_criterion(cfg, base, num_classes=K, device="cpu")
    assert isinstance(crit, DistillationLoss) and crit.base is base
    assert (crit.kind, crit.alpha, crit.tau, crit.reduction) == ("hard", 0.25, 3.0, "deit")


def test_distilled_student_trains_one_step_with_teacher():
    torch.manual_seed(0)
    student = create_model("deit_kd_cifar", embed_dim=64, depth=2, class_attn_depth=1, num_heads=4).train()
    cfg = DistillConfig(teacher="minivit_cifar", kind="soft", alpha=0.5, tau=2.0)
    crit = build_criterion(cfg, ClassificationLoss(label_smoothing=0.05), num_classes=K, device="cpu")
    images, y = torch.randn(4, 3, 32, 32), torch.randint(0, K, (4,))
    loss = crit(student(images), y, images)
    loss.backward()
    assert torch.isfinite(loss) and crit.last_terms["kd"].item() > 0
    assert student.head_dist.weight.grad.abs().sum() > 0 and student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in crit.teacher.parameters())


def test_checkpoint_teacher_gets_its_own_preprocessing_and_classes(tmp_path):
    """A teacher checkpoint trained with other normalisation/size sees inputs converted; other classes are refused."""
    from vitforge.config import load_config
    from vitforge.train.distill import InputAdapter, build_teacher
    from vitforge.train.trainer import train

    run = train(load_config(None, ["data.train=digits", "train.max_steps=1", "train.device=cpu", "run.progress=none",
                                   f"run.dir={tmp_path}", "run.name=t", "train.threads=1", "data.mean=[0.2,0.2,0.2]",
                                   "data.std=[0.3,0.3,0.3]"]))
    classes = [str(i) for i in range(10)]
    same = {"img_size": 8, "mean": [0.2] * 3, "std": [0.3] * 3}
    assert not isinstance(build_teacher(str(run), num_classes=10, device="cpu", classes=classes, preprocess=same),
                          InputAdapter)
    other = {"img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
    t = build_teacher(str(run), num_classes=10, device="cpu", classes=classes, preprocess=other)
    assert isinstance(t, InputAdapter)
    raw = torch.rand(2, 3, 16, 16)
    x_student = (raw - 0.5) / 0.25
    expect = t.teacher(torch.nn.functional.interpolate((raw - 0.2) / 0.3, size=(8, 8), mode="bilinear",
                                                       antialias=True, align_corners=False))
    torch.testing.assert_close(t(x_student), expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="was trained on classes"):
        build_teacher(str(run), num_classes=10, device="cpu", classes=classes[::-1], preprocess=same)
