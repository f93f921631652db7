"""`export_onnx`: a valid ONNX file with a dynamic batch axis, named input/output, the export config as metadata,
and the same logits as PyTorch (checked here with onnxruntime at a batch size the exporter never saw), from either
exporter; a model neither can export is a one-line error that leaves no file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops import deform_conv2d

from vitforge.errors import VitforgeError
from vitforge.export.onnx import OPSET, OPSET_DYNAMO, export_onnx
from vitforge.models.build import build_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

META = {"model_name": "vit_demo", "model_kwargs": {"num_classes": 3}, "classes": ["cat", "dog", "fox"],
        "preprocess": {"img_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                       "crop_pct": 1.0}}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = build_model("vit_demo", {"num_classes": 3}).eval()
    with torch.no_grad():  # off the initialisation (zero biases), so every weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.mark.parametrize("exporter", ["auto", "dynamo", "legacy"])
def test_file_graph_metadata_and_parity(model, tmp_path, exporter):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    out = tmp_path / "sub" / "model.onnx"
    r = export_onnx(model, META, out, exporter=exporter)
    used = r["exporter"]
    assert used == exporter or (exporter == "auto" and used in ("dynamo", "legacy"))
    assert (r["fallback"] is None) == (used == "dynamo" or exporter == "legacy")
    opset = OPSET_DYNAMO if used == "dynamo" else OPSET
    assert r["format"] == "onnx" and r["files"] == [str(out)] and r["ok"] and r["max_abs_diff"] <= 1e-4
    assert r["input_shape"] == [3, 8, 8] and f"opset {opset}, {used} exporter" in r["check"]

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert inp.name == "images" and outp.name == "logits"
    batch_in, *rest = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    batch_out, k = [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim]
    assert rest == [3, 8, 8] and k == 3
    assert isinstance(batch_in, str) and batch_in == batch_out  # one symbolic batch axis, not a fixed size
    config = json.loads({p.key: p.value for p in proto.metadata_props}["vitforge"])
    assert config["classes"] == ["cat", "dog", "fox"] and config["preprocess"] == META["preprocess"]
    assert config["model_name"] == "vit_demo" and config["input_shape"] == [3, 8, 8]

    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # batch 5: not one the export checked
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_an_existing_file_is_kept_without_overwrite(model, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"mine")
    with pytest.raises(VitforgeError, match=r"already exists; pass --overwrite to replace it$"):
        export_onnx(model, META, out)
    assert out.read_bytes() == b"mine"
    assert export_onnx(model, META, out, overwrite=True)["ok"] and out.stat().st_size > 1000


class Unexportable(nn.Module):
    """torchvision's deformable convolution has no ONNX form (the SClusterFormer case)."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Conv2d(3, 18, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(2, 3, 3, 3))

    def forward(self, x):
        return deform_conv2d(x, self.offset(x), self.weight, padding=1).mean(dim=(2, 3))


@pytest.mark.parametrize("exporter", ["auto", "legacy"])
def test_an_operator_without_an_onnx_form_is_a_one_line_error_and_leaves_no_file(tmp_path, exporter):
    """With `auto` the dynamo exporter may write a DeformConv node that onnxruntime cannot load at opset 18: that
    counts as a failed check, the legacy exporter is tried, and its failure is the one line the user sees."""
    out = tmp_path / "model.onnx"
    meta = {**META, "model_name": "tiny", "preprocess": {"img_size": 4}}
    with pytest.raises(VitforgeError) as e:
        export_onnx(Unexportable(), meta, out, exporter=exporter)
    msg = str(e.value)
    assert msg.startswith("--format onnx: tiny cannot be exported to ONNX (legacy exporter failed: ")
    assert "\n" not in msg
    assert "deform_conv2d" in msg and msg.endswith("); safetensors, pt2 and folder still work")
    assert not out.exists()
