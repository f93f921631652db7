"""Library backbones (`timm:<name>`, `tv:<name>`): construction, the weights' preprocessing config, classifier
names, layer-decay ids, gradient checkpointing, and rebuilding from a checkpoint without any download."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import make_image_folder

from vitforge.checkpoint import load_model
from vitforge.config import OptimConfig, load_config
from vitforge.errors import ConfigError
from vitforge.models.backbones import classifier_names, layer_decay_ids
from vitforge.models.build import build_model, model_kwargs
from vitforge.models.registry import create_model, is_model
from vitforge.train.optim import param_groups
from vitforge.train.trainer import train

TINY_TIMM = [("timm:test_vit", {"img_size": 32}), ("timm:test_convnext", {}), ("timm:test_efficientnet", {}),
             ("timm:resnet10t", {})]


@pytest.mark.parametrize("name,kw", TINY_TIMM)
def test_timm_backbones_forward_backward(name, kw):
    torch.manual_seed(0)
    model = build_model(name, {"num_classes": 5, **kw})
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.vitforge_name == name and is_model(name)
    assert {"input_size", "mean", "std", "interpolation", "crop_pct", "classifier"} <= set(model.pretrained_cfg)


def test_img_size_goes_only_to_models_that_take_it():
    vit = build_model("timm:test_vit", {"num_classes": 3, "img_size": 48})
    assert tuple(vit.patch_embed.img_size) == (48, 48)
    assert vit.pretrained_cfg["input_size"] == (3, 48, 48)
    cnn = build_model("timm:test_convnext", {"num_classes": 3, "img_size": 48})  # ConvNeXt takes no img_size
    assert cnn.pretrained_cfg["input_size"] == (3, 48, 48)  # ... but the preprocessing size follows it
    assert cnn.vitforge_kwargs["img_size"] == 48  # stored as given: a rebuild drops it again the same way
    assert cnn(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_bad_names_and_arguments_are_config_errors():
    with pytest.raises(ConfigError, match=r"timm has no model 'swinv2_bse' \(similar: swinv2_"):
        create_model("timm:swinv2_bse", num_classes=2)
    with pytest.raises(ConfigError, match="torchvision has no classification model 'swin_v9'"):
        create_model("tv:swin_v9", num_classes=2)
    with pytest.raises(ConfigError, match="model timm:resnet10t does not take argument 'depth_x'"):
        create_model("timm:resnet10t", num_classes=2, depth_x=3)
    with pytest.raises(ConfigError, match="tv:squeezenet1_1 has no stochastic depth"):
        create_model("tv:squeezenet1_1", num_classes=2, drop_path_rate=0.1)


@pytest.mark.parametrize("name,crop,resize,interp,head", [("swin_v2_b", 256, 272, "bicubic", "head"),
                                                           ("convnext_base", 224, 232, "bilinear", "classifier")])
def test_muffyn_torchvision_models(name, crop, resize, interp, head):
    """The two models of AlphsX/Muffyn: torchvision's parameter count and preprocessing, built on the meta device."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    with torch.device("meta"):
        m1000 = create_model(f"tv:{name}", num_classes=1000)
        m2 = create_model(f"tv:{name}", num_classes=2, drop_path_rate=0.2)
    assert sum(p.numel() for p in m1000.parameters()) == weights.meta["num_params"]
    cfg = m2.pretrained_cfg
    assert cfg["input_size"] == (3, crop, crop) and cfg["crop_pct"] == pytest.approx(crop / resize, abs=1e-4)
    assert cfg["interpolation"] == interp and cfg["weights"] == str(weights)
    assert classifier_names(m2) == (head,)
    depth = [m.p for m in m2.modules() if isinstance(m, torchvision.ops.StochasticDepth)]
    assert max(depth) == pytest.approx(0.2) and depth == sorted(depth)  # linear in depth, deepest block = rate


def test_classifier_names_follow_the_model():
    assert classifier_names(build_model("timm:legacy_seresnet18", {"num_classes": 3})) == ("last_linear",)
    assert classifier_names(build_model("timm:test_convnext", {"num_classes": 3})) == ("head",)  # head.fc
    assert classifier_names(build_model("vit_demo", {"num_classes": 3})) == ()  # our models: HEAD_NAMES


def test_layer_decay_ids_timm_torchvision_and_ours():
    vit = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32})
    layer, top = layer_decay_ids(vit)
    assert (layer("patch_embed.proj.weight"), layer("blocks.0.attn.qkv.weight"), layer("blocks.5.mlp.fc2.bias")) == (
        0, 1, 6)
    assert layer("head.weight") == top == 7
    groups = param_groups(vit, OptimConfig(layer_decay=0.5), layer, top)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["blocks.5.mlp.fc1.weight"] == 0.5
    assert scale["patch_embed.proj.weight"] == 0.5**7
    with torch.device("meta"):
        cnx = create_model("tv:convnext_base", num_classes=2)
    layer, top = layer_decay_ids(cnx)
    ids = [layer(n) for n, _ in cnx.named_parameters()]
    assert ids == sorted(ids) and ids[0] == 0 and layer("classifier.2.weight") == top == 3 + 3 + 27 + 3 + 3 + 1
    assert layer("features.1.0.block.0.weight") == 1 and layer("features.2.1.weight") == 4  # block, downsample
    ours = build_model("vit_demo", {"num_classes": 3})
    layer, top = layer_decay_ids(ours)
    assert layer("blocks.0.attn.qkv.weight") == 1 and layer("head.weight") == top == len(ours.blocks) + 1


def test_torchvision_gradient_checkpointing_recomputes_with_equal_gradients():
    torch.manual_seed(0)
    model = create_model("tv:mobilenet_v3_small", num_classes=3).eval()  # eval: BN uses running stats
    x = torch.randn(2, 3, 64, 64)
    calls = []
    model.features[3].register_forward_pre_hook(lambda *a: calls.append(1))

    def grads():
        model.zero_grad()
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    ckpt = grads()
    assert len(calls) == 3  # forward + recomputation in backward
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b)


def test_checkpoint_rebuilds_backbone_without_download(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "train", per_class=8, size=16)
    run = train(load_config(None, [f"data.train={data}", "data.val_split=0.25", "model.name=timm:test_vit",
                                   "data.img_size=32",
                                   "train.max_steps=2", "data.batch_size=8", "train.device=cpu", "run.progress=none",
                                   f"run.dir={tmp_path}", "run.name=r", "train.threads=1"]))

    def no_download(*a, **k):
        raise AssertionError("rebuilding a checkpoint must not load pretrained weights")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", no_download)
    model, meta = load_model(run)
    assert meta["model_name"] == "timm:test_vit" and meta["preprocess"]["img_size"] == 32
    ckpt = torch.load(run / "checkpoints/best.pt", weights_only=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


# timm's own head dropout (drop_rate), a torchvision head with a Dropout in front of its Linear (its p is set), and
# torchvision heads whose Linear becomes a DropoutLinear (top level and inside a Sequential).
HEAD_DROPOUT = [("timm:test_vit", {"img_size": 32}, "head_drop"), ("timm:test_convnext", {}, "head.drop"),
                ("tv:mobilenet_v3_small", {}, "classifier.2"), ("tv:shufflenet_v2_x0_5", {}, "fc.drop"),
                ("tv:convnext_tiny", {}, "classifier.2.drop")]


@pytest.mark.parametrize("name,kw,where", HEAD_DROPOUT, ids=[n for n, _, _ in HEAD_DROPOUT])
def test_head_dropout_sits_before_the_classifier_and_adds_no_parameters(name, kw, where):
    torch.manual_seed(0)
    plain = build_model(name, {"num_classes": 3, **kw})
    after_plain = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = build_model(name, {"num_classes": 3, "head_dropout": 0.4, **kw})
    assert torch.equal(torch.random.get_rng_state(), after_plain)  # same random initialisation draws
    drop = model.get_submodule(where)
    assert isinstance(drop, torch.nn.Dropout) and drop.p == 0.4
    assert model.state_dict().keys() == plain.state_dict().keys()  # pretrained weights and checkpoints still fit
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values(),
                                                 strict=True))
    seen = []  # (input, output) of the dropout; the input copied first (torchvision's MobileNet drops in place)
    drop.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    drop.register_forward_hook(lambda m, args, out: seen.append((seen.pop(), out.clone())))
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    plain.eval()
    assert torch.equal(model(x), plain(x))  # inactive in evaluation
    assert torch.equal(*seen[-1])
    model.train()
    model(x)
    features, dropped = seen[-1]
    live, kept = features != 0, dropped != 0  # (features after a ReLU are often 0 already)
    assert 0.3 < (live & ~kept).sum().item() / live.sum().item() < 0.5  # about 40% of the classifier's inputs zeroed
    torch.testing.assert_close(dropped[kept], features[kept] / 0.6)  # the rest scaled by 1 / (1 - p)


def test_head_dropout_is_refused_where_it_cannot_apply():
    with pytest.raises(ConfigError, match=r"model.head_dropout: only for timm:<name> and tv:<name> backbones; "
                                          r"vit_demo sets its dropout through model.args"):
        model_kwargs(load_config(None, ["model.head_dropout=0.2"]), num_classes=2)
    with pytest.raises(ConfigError, match="model.head_dropout: timm:test_vit was also given model.args.drop_rate"):
        build_model("timm:test_vit", {"num_classes": 2, "head_dropout": 0.2, "drop_rate": 0.1})
    with pytest.raises(ConfigError, match=r"model.head_dropout: must be in \[0, 1\)"):
        load_config(None, ["model.head_dropout=1.0"])
    cfg = load_config(None, ["model.name=tv:shufflenet_v2_x0_5", "model.head_dropout=0.2"])
    assert model_kwargs(cfg, num_classes=2)["head_dropout"] == 0.2  # stored with the checkpoint's model arguments
    assert "head_dropout" not in model_kwargs(load_config(None, ["model.name=tv:shufflenet_v2_x0_5"]), num_classes=2)
