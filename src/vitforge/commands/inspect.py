"""Model inspection for `vitforge models` and `vitforge info`: parameter counts, per-stage output shapes and FLOPs."""

from __future__ import annotations

import ast

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from vitforge.errors import ConfigError
from vitforge.models.build import count_params, model_input_cfg
from vitforge.models.registry import create_model, list_models

STAGE_CONTAINERS = (nn.ModuleList, nn.Sequential)


def parse_kwargs(items: list[str]) -> dict:
    """`key=value` strings -> dict; values are Python literals where they parse (numbers, lists, None, bools)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not of the form key=value (e.g. num_classes=10)")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = {"true": True, "false": False, "null": None, "none": None}.get(v.lower(), v)
    return out


def model_table(pattern: str = "*") -> list[dict]:
    """Name and parameter count of every registered model matching `pattern` (built on the meta device)."""
    rows = []
    for name in list_models(pattern):
        with torch.device("meta"):
            model = create_model(name)
        total, trainable = count_params(model)
        rows.append({"name": name, "params": total, "trainable_params": trainable})
    return rows


def _stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children; containers (blocks, levels, stages) are expanded one level."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, (nn.Dropout, nn.Identity)):
            continue
        if isinstance(child, STAGE_CONTAINERS) and len(child) > 0:
            out += [(f"{name}.{i}", m) for i, m in child.named_children()]
        else:
            out.append((name, child))
    return out


def _shape(out) -> list[int] | None:
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return list(out[0].shape)
    return None


def model_info(name: str, overrides: list[str] | None = None) -> dict:
    """Parameters and the output shape of each stage for one forward pass at the model's input size (batch 1)."""
    kwargs = parse_kwargs(overrides or [])
    model = create_model(name, **kwargs).eval()
    total, trainable = count_params(model)
    input_shape = [1, *model_input_cfg(model).get("input_size", (3, 224, 224))]
    stages, hooks = [], []
    for sname, mod in _stage_modules(model):
        def hook(m, i, o, sname=sname, mod=mod):
            shape = _shape(o)
            if shape is not None:
                stages.append({"name": sname, "output_shape": shape,
                               "params": sum(p.numel() for p in mod.parameters())})
        hooks.append(mod.register_forward_hook(hook))
    counter = flop_counter()
    with torch.no_grad(), counter:
        out = model(torch.zeros(input_shape))
    for h in hooks:
        h.remove()
    flops = int(counter.get_total_flops())
    by_op = {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"name": name, "params": total, "trainable_params": trainable, "input_shape": input_shape,
            "output_shape": _shape(out), "stages": stages, "kwargs": kwargs, "flops": flops, "macs": flops // 2,
            "flops_by_op": by_op}


def flop_counter() -> FlopCounterMode:
    """`torch.utils.flop_counter.FlopCounterMode` that also counts PyTorch's CPU fused attention.

    The counter's table covers matmuls, convolutions and the CUDA attention kernels (2 FLOPs per multiply-add), but
    not `_scaled_dot_product_flash_attention_for_cpu`, which `F.scaled_dot_product_attention` runs on a CPU; without
    it the Q·K^T and A·V products of every attention layer would be missing. Elementwise work (softmax, LayerNorm,
    BatchNorm, GELU, bias and residual additions) is not counted, by design of the counter.
    """
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    return FlopCounterMode(display=False, custom_mapping=extra)


def attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(Q·K^T)·V for Q (..., N, d), K (..., M, d), V (..., M, dv): two batched matmuls."""
    batch = 1
    for n in q_shape[:-2]:
        batch *= n
    n, d, m, dv = q_shape[-2], q_shape[-1], k_shape[-2], v_shape[-1]
    return 2 * batch * n * m * (d + dv)
