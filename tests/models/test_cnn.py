"""CIFAR CNN teachers (`vitforge.models.cnn`): sizes, the classifier contract, airbench's layer choices."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vitforge.config import OptimConfig
from vitforge.models.cnn import AirbenchGroup, _conv
from vitforge.models.registry import create_model
from vitforge.train.distill import build_teacher
from vitforge.train.optim import param_groups

TINY = {"resnet18_cifar": dict(widths=(8, 16, 16, 32)), "airbench_cifar": dict(widths=(8, 16, 16)),
        "airbench94_cifar": dict(widths=(8, 16, 16))}


@pytest.mark.parametrize("name,params", [("resnet18_cifar", 11_173_962), ("airbench94_cifar", 1_972_792),
                                         ("airbench_cifar", 12_721_208)])
def test_parameter_counts(name, params):
    with torch.device("meta"):
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name", TINY)
def test_classifier_contract(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY[name])
    x = torch.randn(3, 3, 32, 32)
    feat = model.forward_features(x)
    assert feat.ndim == 4 and feat.shape[:2] == (3, model.num_features)
    assert model.forward_head(feat, pre_logits=True).shape == (3, model.num_features)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.num_classes == 4
    assert model.no_weight_decay() == set() and model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_resnet_cifar_stem_keeps_full_resolution():
    model = create_model("resnet18_cifar", **TINY["resnet18_cifar"])
    x = torch.randn(2, 3, 32, 32)
    assert model.stem(x).shape == (2, 8, 32, 32)  # no stride, no max-pool (an ImageNet stem gives 8x8 here)
    assert model.forward_features(x).shape == (2, 32, 4, 4)


def test_airbench_layer_choices():
    model = create_model("airbench94_cifar", **TINY["airbench94_cifar"])
    assert model.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 3, 3)  # 32 -> 31 -> 15 -> 7 -> 3
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.momentum == 0.4 for m in bns)
    names = {n for g in param_groups(model, OptimConfig()) for n in g["names"]}
    assert not any(n.endswith("norm.weight") for n in names) and "head.weight" in names and model.head.bias is None
    x = torch.randn(2, 16, 3, 3)
    assert torch.equal(model.pool(x), nn.MaxPool2d(3)(x).flatten(1))  # global max = airbench's 3x3 max-pool
    conv = _conv(4, 6)
    y = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(y)[:, :4], y)  # dirac init: the first filters pass their channel through
    assert AirbenchGroup(4, 8, extra=2).residual and not AirbenchGroup(4, 8, extra=1).residual


def test_logits_are_scaled_by_one_ninth():
    model = create_model("airbench94_cifar", **TINY["airbench94_cifar"]).eval()
    x = torch.randn(2, 3, 32, 32)
    feat = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.allclose(model(x), model.head(feat) / 9, atol=1e-6)


@pytest.mark.parametrize("name,lr", [("resnet18_cifar", 0.05), ("airbench94_cifar", 0.5)])  # airbench: logits / 9
def test_a_few_sgd_steps_fit_a_batch(name, lr):
    torch.manual_seed(0)
    model = create_model(name, **TINY[name])
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_registered_cnn_is_a_teacher():
    teacher = build_teacher("resnet18_cifar", num_classes=10, device="cpu")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
