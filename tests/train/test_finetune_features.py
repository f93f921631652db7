"""Fine-tuning features on library backbones: SAM with bf16 autocast + accumulation + clipping (checked against a
hand-written step), gradient checkpointing, layer-wise lr decay, the head-only phase, class weights and the
balanced sampler on an imbalanced folder."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from vitforge.config import load_config
from vitforge.train.trainer import Trainer

RUN = ["train.device=cpu", "run.progress=none", "run.tensorboard=false", "train.threads=1",
       "data.aug.crop_padding=0", "data.aug.hflip=false"]


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "train", per_class=16, size=16)


def _cfg(tmp_path, data, *extra):
    return load_config(None, [f"data.train={data}", "data.val_split=0.25", "model.name=timm:test_vit",
                              "data.img_size=32", "data.batch_size=4", *RUN, f"run.dir={tmp_path}", *extra])


def _reference_step(t: Trainer, window, *, rho: float, clip: float, lr: float) -> dict:
    """One SAM step written out by hand on a copy of the trainer's model: grads of the accumulated loss under bf16
    autocast, w + rho g/|g|, grads again, back to w, clip the second grads, plain SGD."""
    model = copy.deepcopy(t.raw_model).train()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads():
        for p in params:
            p.grad = None
        for x, y in window:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = t.criterion(model(x), y, x)
            (loss / len(window)).backward()

    grads()
    if rho > 0:
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            eps = [rho * p.grad / (norm + 1e-12) for p in params]
            for p, e in zip(params, eps, strict=True):
                p.add_(e)
        grads()
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p.sub_(e)
    torch.nn.utils.clip_grad_norm_(params, clip)
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
    return model.state_dict()


@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_sam_with_bf16_autocast_accumulation_and_clipping_matches_a_hand_written_step(tmp_path, folder, rho):
    lr, clip = 0.5, 0.05  # a clip this small always binds
    t = Trainer(_cfg(tmp_path, folder, "train.amp=bf16", "train.grad_accum=2", f"train.clip_grad={clip}",
                     f"optim.sam_rho={rho}", "optim.name=sgd", "optim.momentum=0", "optim.weight_decay=0",
                     f"optim.lr={lr}", "schedule.name=constant", "train.max_steps=1", f"run.name=sam{rho}"))
    assert t.amp_dtype == torch.bfloat16
    t.train_stream.set_epoch(0)
    window = [(x, y) for (x, y, _), _ in zip(t.train_stream, range(2), strict=False)]
    expected = _reference_step(t, window, rho=rho, clip=clip, lr=lr)
    without_sam = _reference_step(t, window, rho=0.0, clip=clip, lr=lr)
    t.fit()
    got = t.raw_model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)
    if rho > 0:  # the check can tell SAM from a plain step
        assert any(not torch.allclose(expected[k], without_sam[k], rtol=1e-4, atol=1e-5) for k in expected)


def test_grad_checkpointing_on_a_timm_model_recomputes_and_changes_nothing(tmp_path, folder):
    states, calls = [], []
    for ckpt in ("false", "true"):
        t = Trainer(_cfg(tmp_path, folder, f"train.grad_checkpointing={ckpt}", "train.max_steps=2",
                         f"run.name=gc{ckpt}"))
        assert t.raw_model.grad_checkpointing is (ckpt == "true")
        n = []
        t.raw_model.blocks[0].register_forward_pre_hook(lambda *a, n=n: n.append(1))
        t.fit()
        states.append(t.raw_model.state_dict())
        calls.append(len(n))
    assert calls[1] > calls[0]  # blocks run again in the backward pass
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], msg=k)


def test_layer_decay_reaches_the_optimizer(tmp_path, folder):
    t = Trainer(_cfg(tmp_path, folder, "optim.layer_decay=0.5", "optim.lr=0.01", "schedule.name=constant"))
    t.cfg.train.epochs = 1
    from vitforge.train.optim import set_lr

    set_lr(t.optimizer, t.lr_for(0))
    lr_of = {n: g["lr"] for g, named in zip(t.optimizer.param_groups, t.groups, strict=True) for n in named["names"]}
    assert lr_of["head.weight"] == pytest.approx(0.01)
    assert lr_of["blocks.5.attn.qkv.weight"] == pytest.approx(0.005)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(0.01 * 0.5**7)


def test_head_phase_trains_only_a_timm_classifier_outside_head_names(tmp_path, folder):
    """legacy_seresnet18's classifier is `last_linear` (not in the trainer's HEAD_NAMES): the backbone asks."""
    t = Trainer(_cfg(tmp_path, folder, "model.name=timm:legacy_seresnet18", "train.epochs=2", "train.head_epochs=1",
                     "train.head_lr=0.05", "optim.lr=1e-4", "run.name=head"))
    assert t.lr_for(0) == 0.05
    before = {n: p.detach().clone() for n, p in t.raw_model.named_parameters()}
    t.cfg.train.epochs = 1  # the head phase only
    t.fit()
    changed = {n for n, p in t.raw_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"last_linear.weight", "last_linear.bias"}


def test_second_phase_unfreezes_the_backbone_and_restarts_warmup_and_cosine(tmp_path, folder):
    t = Trainer(_cfg(tmp_path, folder, "model.name=timm:test_vit", "train.epochs=4", "train.head_epochs=1",
                     "train.head_lr=0.05", "optim.lr=1e-3", "schedule.warmup_epochs=1", "schedule.min_lr=0",
                     "run.name=two"))
    n = t.steps_per_epoch
    assert [t.lr_for(s) for s in range(n)] == [0.05] * n  # head phase: constant head_lr
    start = t.cfg.schedule.warmup_start * 1e-3
    assert t.lr_for(n) == pytest.approx(start)  # phase 2 starts its own warmup from warmup_start * lr
    assert t.lr_for(2 * n) == pytest.approx(1e-3)  # warmup over: the peak
    assert t.lr_for(3 * n) == pytest.approx(0.5e-3)  # half-way down the cosine of the remaining 2 epochs
    assert t.lr_for(4 * n) == pytest.approx(0.0, abs=1e-12)
    before = {k: p.detach().clone() for k, p in t.raw_model.named_parameters()}
    t.fit()
    changed = {k for k, p in t.raw_model.named_parameters() if not torch.equal(p, before[k])}
    assert all(p.requires_grad for p in t.raw_model.parameters())  # phase 2: everything trains
    assert {"head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= changed
    lrs = [json.loads(x)["lr"] for x in (t.run.path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.05, 1e-3 * (1 - 1 / n), t.lr_for(3 * n - 1), t.lr_for(4 * n - 1)])  # last steps


def _imbalanced(root, counts=(24, 6, 3)):
    data = make_image_folder(root, per_class=max(counts), size=16)
    for d, keep in zip(sorted(p for p in data.iterdir()), counts, strict=True):
        for f in sorted(d.iterdir())[keep:]:
            f.unlink()
    return data


def _epoch_labels(t: Trainer) -> np.ndarray:
    t.train_stream.set_epoch(0)
    return torch.cat([y for _, y, _ in t.train_stream]).numpy()


def test_class_weights_and_balanced_sampler_on_an_imbalanced_folder(tmp_path):
    data = _imbalanced(tmp_path / "imb")
    base = [f"data.train={data}", "model.name=timm:test_convnext", "data.img_size=32", "data.batch_size=3",
            "data.val_split=0", *RUN, f"run.dir={tmp_path}"]
    weighted = Trainer(load_config(None, [*base, "train.class_balance=weights"]))
    counts = np.array([24, 6, 3])
    np.testing.assert_allclose(weighted.criterion.weight.numpy(), counts.sum() / (3 * counts), rtol=1e-6)
    plain = np.bincount(_epoch_labels(Trainer(load_config(None, base))), minlength=3)
    np.testing.assert_array_equal(plain, [24, 6, 3])  # a permutation: the folder's proportions
    sampled = Trainer(load_config(None, [*base, "train.class_balance=sampler", "train.seed=3"]))
    draws = np.concatenate([_epoch_labels(sampled)] + [
        (sampled.train_stream.set_epoch(e), torch.cat([y for _, y, _ in sampled.train_stream]).numpy())[1]
        for e in range(1, 8)])
    share = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.08)  # 8 epochs x 33 draws: each class about a third


def test_mixing_starts_with_phase_two(tmp_path, folder):
    """data.mix.on_epoch as a fraction of the run (0.5 of 4 epochs = epoch 2 = after train.head_epochs)."""
    t = Trainer(_cfg(tmp_path, folder, "train.epochs=4", "train.head_epochs=2", "data.mix.mixup_alpha=0.4",
                     "data.mix.on_epoch=0.5", "run.name=mix"))
    mixed = []
    for epoch in range(4):
        t.train_stream.set_epoch(epoch)
        mixed.append(next(iter(t.train_stream))[1].ndim == 2)  # soft targets: the batch was mixed
    assert mixed == [False, False, True, True]
