"""Building models from user input: bad arguments are one-line errors, a model that cannot take the data is refused
before a run directory exists, gradient checkpointing of the hand-written models (equal gradients, really
recomputed), and probability outputs (SClusterFormer's `double_softmax`) are not softmaxed twice."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.errors import ConfigError
from vitforge.eval.tta import forward_probs, outputs_probabilities
from vitforge.models.layers.checkpointing import GradCheckpointing
from vitforge.models.registry import create_model
from vitforge.train.trainer import Trainer, train

BASE = ["train.device=cpu", "run.progress=none", "train.threads=1", "data.batch_size=16"]


# ---- bad model arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["scan_impl=fast"], "scan_impl='fast': scan_impl must be one of"),
    (["stem_strides=[1]"], "stem_strides=[1]"),
    (["img_size=abc"], "img_size='abc'"),
])
def test_bad_model_arguments_are_one_line_errors(args, says, capsys):
    assert main(["info", "mambavision_cifar", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitforge: error: model 'mambavision_cifar' cannot be built with") and says in err
    assert len(err.strip().splitlines()) == 1


def test_scalar_defaults_are_checked_before_the_factory_runs():
    """A factory with an explicit signature (no **kwargs) has its scalar defaults checked before it is called."""
    from vitforge.models.registry import _check_kwargs

    def factory(num_classes: int = 10, scan_impl: str = "auto", depth: int = 4, bias: bool = True):
        raise AssertionError("not reached")

    _check_kwargs("x", factory, {"depth": 6, "num_classes": 3, "bias": False, "scan_impl": "loop"})  # all fine
    with pytest.raises(ConfigError, match=r"model 'x' argument scan_impl: expected text \(default 'auto'\), got 3"):
        _check_kwargs("x", factory, {"scan_impl": 3})
    with pytest.raises(ConfigError, match=r"model 'x' argument depth: expected int \(default 4\), got 'six'"):
        _check_kwargs("x", factory, {"depth": "six"})


@pytest.mark.parametrize("name, suggestion", [("swin_v2_b", "tv:swin_v2_b"),
                                              ("eva02_large_patch14_448", "timm:eva02_large_patch14_448")])
def test_a_library_model_name_without_prefix_gets_the_prefix_suggested(name, suggestion, capsys):
    assert main(["info", name]) == 2
    assert f"unknown model {name!r}; did you mean {suggestion!r}?" in capsys.readouterr().err


def test_train_refuses_a_model_that_cannot_take_the_data_before_creating_the_run(tmp_path):
    cfg = load_config(None, [*BASE, "data.train=digits", "model.name=sclusterformer_hsi", f"run.dir={tmp_path}",
                             "run.name=hsi_on_rgb"])
    with pytest.raises(ConfigError, match=r"model.name: 'sclusterformer_hsi' cannot take this data's input "
                                          r"\(3, 13, 13\): SClusterFormerHSI expects"):
        Trainer(cfg)
    assert not (tmp_path / "hsi_on_rgb").exists()


def test_the_input_probe_changes_nothing(tmp_path, monkeypatch):
    """The probe runs before the first step: batch-norm statistics, train mode and the RNG stream are untouched."""
    def build(name: str, probe: bool) -> tuple[Trainer, torch.Tensor]:
        if not probe:
            monkeypatch.setattr("vitforge.train.setup._probe_input", lambda *args: None)
        torch.manual_seed(3)
        t = Trainer(load_config(None, [*BASE, "data.train=digits", "data.limit=100", "model.name=resnet18_cifar",
                                       "model.args.widths=[8,8,8,8]", "model.args.layers=[1,1,1,1]",
                                       f"run.dir={tmp_path}", f"run.name={name}"]))
        monkeypatch.undo()
        return t, torch.get_rng_state()

    probed, rng_probed = build("a", probe=True)
    plain, rng_plain = build("b", probe=False)
    assert torch.equal(rng_probed, rng_plain)
    assert probed.model.training
    for (k, a), b in zip(probed.model.state_dict().items(), plain.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    bn = next(m for m in probed.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 0


# ---- gradient checkpointing ------------------------------------------------------------------------------------------
CHECKPOINTED = {  # small variants of each hand-written family, drop path on so the replayed RNG matters
    "vit_demo": dict(drop_path_rate=0.2, drop_rate=0.1),
    "deit_kd_cifar": dict(depth=3, class_attn_depth=1, embed_dim=32, num_heads=2, drop_path_rate=0.2),
    "cait_xxs24_224": dict(depth=2, depth_token_only=1, img_size=32, drop_path_rate=0.2),
    "cct_7_3x1_cifar": dict(depth=2, drop_path_rate=0.2),
    "mambavision_cifar": dict(dim=16, in_dim=8, num_heads=(1, 1, 2, 4), drop_path_rate=0.2),
    "sclusterformer_rgb": dict(img_size=32, drop_path_rate=0.2),
}


def _grads(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[dict, int]:
    """Parameter gradients of one training step and the number of block forwards it ran."""
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in _blocks(model)]
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = torch.stack(out).mean(0) if isinstance(out, (tuple, list)) else out
    out.logsumexp(dim=1).sum().backward()
    for h in hooks:
        h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_grad_checkpointing_recomputes_and_gives_the_same_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **CHECKPOINTED[name]).train()
    size = 8 if name == "vit_demo" else 32
    x = torch.randn(3, 3, size, size)
    plain, calls_plain = _grads(model, x, seed=1)
    model.set_grad_checkpointing(True)
    assert all(m.grad_checkpointing for m in model.modules() if isinstance(m, GradCheckpointing))
    ckpt, calls_ckpt = _grads(model, x, seed=1)
    assert calls_plain > 0 and calls_ckpt > calls_plain  # blocks ran again in the backward pass (pre-hooks:
    # recomputation stops early, once the saved tensors it needs exist)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
    with torch.no_grad():  # no gradients recorded: nothing to recompute, plain forward
        _, calls_eval = _grads_free(model, x)
    assert calls_eval == calls_plain


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


def _grads_free(model, x):
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in _blocks(model)]
    torch.manual_seed(1)
    model(x)
    for h in hooks:
        h.remove()
    return None, len(calls)


def test_trainer_rejects_grad_checkpointing_for_a_model_without_it(tmp_path):
    cfg = load_config(None, [*BASE, "data.train=digits", "model.name=resnet18_cifar", "train.grad_checkpointing=true",
                             f"run.dir={tmp_path}", "run.name=r"])
    with pytest.raises(ConfigError, match="train.grad_checkpointing: model 'resnet18_cifar' does not support it"):
        Trainer(cfg)


def test_trainer_trains_with_grad_checkpointing(tmp_path):
    cfg = load_config(None, [*BASE, "data.train=digits", "data.limit=64", "model.name=vit_demo", "train.epochs=1",
                             "train.grad_checkpointing=true", f"run.dir={tmp_path}", "run.name=gc"])
    t = Trainer(cfg)
    assert t.raw_model.grad_checkpointing
    assert (t.fit() / "checkpoints" / "last.pt").is_file()


# ---- probability outputs ---------------------------------------------------------------------------------------------
def test_double_softmax_outputs_are_taken_as_probabilities():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = create_model("sclusterformer_rgb", img_size=32, num_classes=9, double_softmax=True).eval()
    with torch.no_grad():
        model.head.weight.mul_(200)  # confident heads: peaked per-branch softmaxes
    assert outputs_probabilities(model) and outputs_probabilities(torch.compile(model))
    with torch.no_grad():
        raw = model(x)
        probs = forward_probs(model, x)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(probs, raw / raw.sum(1, keepdim=True))  # c = 0.7: weights in [0, 1], no clamping
    assert probs.max() > 0.5  # a softmax of probabilities would squash every entry below e/(e + 8) = 0.254
    with torch.no_grad():
        model.branch_weight.fill_(1.6)  # c outside [0, 1]: negative branch weights; still a distribution
        probs = forward_probs(model, x)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    plain = create_model("sclusterformer_rgb", img_size=32, num_classes=9).eval()
    assert not outputs_probabilities(plain)
    with torch.no_grad():
        torch.testing.assert_close(forward_probs(plain, x), plain(x).softmax(1))


# ---- SClusterFormer-RGB through the trainer --------------------------------------------------------------------------
def test_sclusterformer_rgb_trains_on_a_parquet_dataset(tmp_path, cifar_parquet):
    cfg = load_config(None, [*BASE, f"data.train={cifar_parquet}", "data.limit=96", "data.val_split=32",
                             "data.img_size=64", "model.name=sclusterformer_rgb", "train.max_steps=3",
                             "train.epochs=1", f"run.dir={tmp_path}", "run.name=scf"])
    run = train(cfg)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "sclusterformer_rgb" and summary["steps"] == 3 and summary["val_images"] == 32
    assert len(summary["classes"]) == 10
    assert summary["params"] == sum(p.numel() for p in create_model("sclusterformer_rgb", num_classes=10).parameters())
    assert 0 <= summary["best_val_top1"] <= 100
