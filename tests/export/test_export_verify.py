"""What every export shares (`vitforge.export.verify`): the exported function, its inputs, the parity number,
the output guard and the deployment config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vitforge.errors import VitforgeError
from vitforge.export import verify


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)
        self.pretrained_cfg = {"input_size": (1, 2, 2)}

    def forward(self, x):
        x = x.flatten(1)
        return (self.a(x), self.b(x)) if not self.training else self.a(x)


def test_logits_module_is_in_eval_mode_and_averages_heads():
    m = TwoHeads().train()
    wrapped = verify.LogitsModule(m)
    assert not wrapped.training and not m.training
    x = torch.randn(5, 1, 2, 2)
    with torch.no_grad():
        want = (m.a(x.flatten(1)) + m.b(x.flatten(1))) / 2
        torch.testing.assert_close(wrapped(x), want)
        torch.testing.assert_close(verify.reference(wrapped, [x])[0], want)


def test_input_shape_from_the_model_config_and_the_checkpoint_preprocessing():
    assert verify.input_shape(TwoHeads(), {"preprocess": {"img_size": 13}}) == (1, 13, 13)
    assert verify.input_shape(nn.Linear(2, 2), {"preprocess": {"img_size": 32}}) == (3, 32, 32)  # 3 channels by default


def test_example_inputs_two_batch_sizes_reproducible():
    a = verify.example_inputs((3, 8, 8), 2)
    b = verify.example_inputs((3, 8, 8), 2)
    assert [tuple(t.shape) for t in a] == [(2, 3, 8, 8), (3, 3, 8, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], verify.example_inputs((3, 8, 8), 2, seed=1)[0])


def test_max_abs_diff():
    ref = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])]
    assert verify.max_abs_diff([np.array([[1.0, 2.5]]), np.array([[0.0, -0.25], [1.0, 1.0]])], ref) == 0.5
    assert verify.max_abs_diff([torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)], ref) == math.inf  # wrong shape
    with pytest.raises(ValueError):
        verify.max_abs_diff([np.zeros((1, 2))], ref)  # one output missing


def test_report_ok_only_within_tolerance():
    r = verify.report("onnx", ["m.onnx"], 2e-5, 1e-4, "check", (3, 8, 8), "sdpa")
    assert r == {"format": "onnx", "files": ["m.onnx"], "max_abs_diff": 2e-5, "tol": 1e-4, "ok": True,
                 "check": "check", "input_shape": [3, 8, 8], "attention": "sdpa"}
    assert not verify.report("onnx", [], 2e-4, 1e-4, "", (3, 8, 8), "")["ok"]
    assert not verify.report("onnx", [], math.inf, 1e-4, "", (3, 8, 8), "")["ok"]


def test_guard_refuses_existing_files_and_creates_folders(tmp_path):
    new = tmp_path / "a" / "b" / "m.onnx"
    verify.guard_outputs([new], overwrite=False)
    assert new.parent.is_dir() and not new.exists()
    new.write_text("x")
    with pytest.raises(VitforgeError, match=f"^--out {new} already exists; pass --overwrite to replace it$"):
        verify.guard_outputs([new], overwrite=False)
    verify.guard_outputs([new], overwrite=True)
    assert new.read_text() == "x"  # the guard itself never deletes


def test_export_config_carries_what_a_deployment_needs():
    meta = {"model_name": "vit_demo", "model_kwargs": {"num_classes": 2}, "classes": ("a", "b"),
            "preprocess": {"img_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}, "path": "/runs/x/best.pt"}
    c = verify.export_config(meta, (3, 8, 8))
    assert c["format"] == "vitforge-export" and c["version"] == 1
    assert (c["model_name"], c["model_kwargs"], c["classes"]) == ("vit_demo", {"num_classes": 2}, ["a", "b"])
    assert c["preprocess"] == meta["preprocess"] and c["input_shape"] == [3, 8, 8]
    assert c["source_checkpoint"] == "/runs/x/best.pt" and c["output"] == "logits (B, K) in `classes` order"
    assert "torch" in c["exported"] and "vitforge" in c["exported"]
