"""`collect_logits` / `evaluate`: logits of a whole stream (heads averaged, mode restored, order kept), and the
top-k metrics of hand-made logits."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn

from vitforge.eval.evaluate import collect_logits, evaluate


class TwoHeads(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x), self.b(x)


class Given(nn.Module):
    """Returns its input as the logits (a model has parameters: the device is read from them)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


def stream(n_batches: int = 3, bs: int = 2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(bs, 4, generator=g), torch.arange(bs) + 10 * i, torch.arange(bs) + bs * i)
            for i in range(n_batches)]


def test_heads_are_averaged_and_order_and_mode_are_kept():
    model = TwoHeads().train()
    batches = stream()
    calls = []

    def factory():
        calls.append(1)
        return contextlib.nullcontext()

    logits, labels, idx = collect_logits(model, batches, autocast=factory)
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        want = (model.a(x) + model.b(x)) / 2
    torch.testing.assert_close(logits, want)
    assert labels.tolist() == [0, 1, 10, 11, 20, 21] and idx.tolist() == [0, 1, 2, 3, 4, 5]
    assert model.training and len(calls) == 3  # back in training mode; one autocast context per batch
    assert logits.dtype == torch.float32 and not logits.requires_grad


def test_logits_come_back_in_float32_under_autocast():
    model = nn.Linear(4, 3)
    logits, _, _ = collect_logits(model, stream(1), autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert logits.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(logits, model(stream(1)[0][0]), rtol=2e-2, atol=2e-2)


def test_an_empty_shard_still_has_the_class_columns():
    logits, labels, idx = collect_logits(TwoHeads(), [])
    assert logits.shape == (0, 3) and labels.shape == (0,) and idx.shape == (0,) and labels.dtype == torch.long

    class Wrapped(nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self):
            super().__init__()
            self.module = TwoHeads()

    assert collect_logits(Wrapped(), [])[0].shape == (0, 3)


def test_metrics_of_hand_made_logits():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, -1],   # label 0: top-1 hit
                           [0.0, 1, 5, 4, 3, 2, -1],   # label 1: ranked 5th -> top-5 hit only
                           [0.0, 0, 0, 9, 0, 0, 1],    # label 6: ranked 2nd
                           [1.0, 2, 3, 4, 5, 6, 7]])   # label 2: ranked 5th
    labels = torch.tensor([0, 1, 6, 2])
    m = evaluate(Given(), [(logits, labels, torch.arange(4))], num_classes=7)
    assert m["n"] == 4 and m["top1"] == 25.0 and m["top5"] == 100.0
    want_loss = sum(-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(4)) / 4
    assert m["loss"] == pytest.approx(want_loss, rel=1e-6)
    assert m["per_class_top1"] == [100.0, 0.0, 0.0, None, None, None, 0.0]  # classes without images: None


def test_unlabeled_items_are_not_scored():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    m = evaluate(Given(), [(logits, torch.tensor([0, -1, 1]), torch.arange(3))], num_classes=2)
    assert m["n"] == 2 and m["top1"] == 50.0 and m["loss"] == pytest.approx((math.log1p(math.exp(-2)) +
                                                                              math.log1p(math.exp(2))) / 2)
    assert evaluate(Given(), [(logits, torch.full((3,), -1), torch.arange(3))], num_classes=2) == {"n": 0}
