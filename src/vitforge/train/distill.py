"""Knowledge distillation: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531);
DeiT, Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML 2021, arXiv
2012.12877; facebookresearch/deit `losses.py`, `DistillationLoss`).

The teacher is frozen and in eval mode, and sees the same (Mixup/CutMix-mixed) batch as the student. A student with a
distillation token returns (cls_logits, dist_logits) in training: the base loss goes on the CLS head and the KD term
on the DIST head; a single-head student gets both terms on its one output.

    L = (1 − α)·base(Z_s, y) + α·KD,   KD_soft = τ²·KL(ψ(Z_t/τ) ‖ ψ(Z_d/τ)),   KD_hard = CE(Z_d, argmax Z_t)

KL reduction "batchmean" is Hinton's (sum / B); "deit" is DeiT's `losses.py` (the KL summed, then divided by the
number of logits B·K), K times smaller. DeiT's defaults: α 0.5, τ 1.0; its paper's choice is hard distillation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitforge.checkpoint import load_model
from vitforge.errors import ConfigError
from vitforge.models.registry import create_model, is_model

KINDS = ("soft", "hard")
REDUCTIONS = ("batchmean", "deit")


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, *, tau: float, reduction: str = "batchmean") -> torch.Tensor:
    """τ²·KL(softmax(teacher/τ) ‖ softmax(student/τ)) for logits (B, K), reduced per `reduction`."""
    log_p_s = F.log_softmax(student.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / tau, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
    denom = student.shape[0] if reduction == "batchmean" else student.numel()
    return kl * tau**2 / denom


def hard_kd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student logits (B, K) against the teacher's argmax labels (not smoothed)."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=-1))


class DistillationLoss(nn.Module):
    """Criterion `forward(outputs, target, images)` adding a KD term from a frozen teacher.

    Args:
        base: criterion for the CLS head and the true (possibly mixed/smoothed) targets, e.g. `ClassificationLoss`.
        teacher: frozen model; kept in eval mode even when this module is put in training mode.
        kind: "soft" (KL at temperature τ) or "hard" (teacher argmax as label).
        alpha: weight λ of the KD term.
        tau: soft-KD temperature.
        reduction: soft-KD reduction, "batchmean" or "deit".
    """

    def __init__(
        self,
        base: nn.Module,
        teacher: nn.Module,
        *,
        kind: str = "soft",
        alpha: float = 0.5,
        tau: float = 1.0,
        reduction: str = "batchmean",
    ) -> None:
        super().__init__()
        if kind not in KINDS or reduction not in REDUCTIONS:
            raise ConfigError(f"distill.kind must be in {KINDS} and distill.reduction in {REDUCTIONS}")
        self.base, self.teacher = base, teacher
        self.kind, self.alpha, self.tau, self.reduction = kind, alpha, tau, reduction
        self.last_terms: dict[str, torch.Tensor] = {}  # detached base/kd terms of the last call, for logging
        self.teacher.eval()

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, K) on the student's batch; a two-head teacher's heads are averaged."""
        out = self.teacher(images)
        return torch.stack(out).mean(0) if isinstance(out, (tuple, list)) else out

    def forward(self, outputs, target: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """outputs: logits (B, K) or (cls_logits, dist_logits); target: (B,) or (B, K); images: the mixed batch."""
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        base = self.base(cls_out, target)
        t = self.teacher_logits(images)
        kd = hard_kd(dist_out, t) if self.kind == "hard" else soft_kd(dist_out, t, tau=self.tau,
                                                                       reduction=self.reduction)
        self.last_terms = {"base": base.detach(), "kd": kd.detach()}
        return (1 - self.alpha) * base + self.alpha * kd


class InputAdapter(nn.Module):
    """Feeds a teacher the student's batch the way the teacher was trained: undo the student's normalisation, apply
    the teacher's, and resize to the teacher's input size (a teacher checkpoint stores its own preprocessing)."""

    def __init__(self, teacher: nn.Module, student_pre: dict, teacher_pre: dict) -> None:
        super().__init__()
        self.teacher, self.size = teacher, int(teacher_pre["img_size"])
        for name, pre in (("s", student_pre), ("t", teacher_pre)):
            self.register_buffer(f"mean_{name}", torch.tensor(pre["mean"]).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"std_{name}", torch.tensor(pre["std"]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor):
        x = ((x * self.std_s + self.mean_s) - self.mean_t) / self.std_t  # (B, 3, S, S) in the teacher's scale
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return self.teacher(x)


def _needs_adapter(student_pre: dict | None, teacher_pre: dict | None) -> bool:
    if not student_pre or not teacher_pre or teacher_pre.get("kind", "image") != "image":
        return False
    keys = ("img_size", "mean", "std")
    return any(not torch.allclose(torch.tensor(student_pre[k], dtype=torch.float64),
                                  torch.tensor(teacher_pre[k], dtype=torch.float64)) for k in keys)


def build_teacher(spec: str, *, num_classes: int, device: str | torch.device, classes: list[str] | None = None,
                  preprocess: dict | None = None) -> nn.Module:
    """Build a frozen eval-mode teacher from a registered model name, `timm:<name>` or a vitforge checkpoint.

    Registered and timm models start from random weights (timm with `pretrained=False`); a checkpoint file or run
    directory is loaded through `vitforge.checkpoint.load_model`. A checkpoint teacher must know the student's
    classes in the same order (`classes`), and is wrapped in an `InputAdapter` when its preprocessing differs from
    the student's (`preprocess`).

    Raises:
        ConfigError: `spec` is none of the three, or the teacher's classes differ from the student's.
    """
    if spec.startswith("timm:") or is_model(spec):
        try:
            teacher = create_model(spec, num_classes=num_classes)
        except ConfigError as e:  # unknown timm name (with suggestions), bad arguments
            raise ConfigError(f"distill.teacher: {str(e).removeprefix('model.name: ')}") from None
    elif Path(spec).exists():
        teacher, meta = load_model(spec, device=device)
        if classes is not None and meta.get("classes") != list(classes):
            raise ConfigError(f"distill.teacher: {spec} was trained on classes {meta['classes'][:10]}, the student on "
                              f"{list(classes)[:10]} (names and order must match)")
        if _needs_adapter(preprocess, meta.get("preprocess")):
            teacher = InputAdapter(teacher, preprocess, meta["preprocess"])
    else:
        raise ConfigError(f"distill.teacher: {spec!r} is not a registered model, a timm:<name> or an existing path")
    _check_classes(spec, teacher, num_classes)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _check_classes(spec: str, teacher: nn.Module, num_classes: int) -> None:
    n = getattr(getattr(teacher, "teacher", teacher), "num_classes", num_classes)
    if n != num_classes:
        raise ConfigError(f"distill.teacher: {spec!r} predicts {n} classes, the student {num_classes}")


def build_criterion(distill_cfg, base: nn.Module, *, num_classes: int, device: str | torch.device,
                    classes: list[str] | None = None, preprocess: dict | None = None) -> nn.Module:
    """`base` when `distill_cfg` is None or has no teacher, else a `DistillationLoss` around it.

    Args:
        distill_cfg: a `vitforge.config.DistillConfig` (teacher, kind, alpha, tau, reduction) or None.
        base: the classification criterion.
        num_classes: the student's classes (the teacher must match).
        device: where the teacher runs.
        classes: the student's class names (a checkpoint teacher must have the same, in the same order).
        preprocess: the student's preprocessing (`Preprocess.to_dict()`); a checkpoint teacher trained with another
            normalisation or input size gets its inputs converted.
    """
    if distill_cfg is None or not distill_cfg.teacher:
        return base
    teacher = build_teacher(distill_cfg.teacher, num_classes=num_classes, device=device, classes=classes,
                            preprocess=preprocess)
    return DistillationLoss(
        base, teacher, kind=distill_cfg.kind, alpha=distill_cfg.alpha, tau=distill_cfg.tau,
        reduction=distill_cfg.reduction,
    )
