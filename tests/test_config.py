"""Config: defaults < recipe < overrides; unknown keys, wrong types and impossible values rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitforge.config import Config, from_dict, load_config, to_dict, to_yaml
from vitforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 0.002\n  weight_decay: 0.1\nmodel:\n  name: minivit_cifar\n")
    cfg = load_config(recipe, ["optim.lr=0.003", "model.args.depth=3", "data.aug.repeats=3"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.003 and cfg.optim.weight_decay == 0.1  # override > recipe > default
    assert cfg.optim.name == "adamw" and cfg.model.args == {"depth": 3} and cfg.data.aug.repeats == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "optim.lrr: unknown key; valid keys of optim: name, lr,"),
        ("data.aug.flipp=true", "data.aug.flipp: unknown key; valid keys of data.aug: crop_padding"),
        ("nosuch.key=1", "nosuch: unknown key; valid keys: model, data, optim"),
        ("optim.lr=fast", "optim.lr: Value 'fast' of type 'str' could not be converted to Float"),
        ("train.epochs=2.5", "train.epochs:"),
        ("optim.name=adam", "optim.name: 'adam' is not one of adamw, sgd, lamb"),
        ("train.amp=fp8", "train.amp: 'fp8' is not one of auto, bf16, fp16, off"),
        ("optim.lr=-1", "optim.lr: must be > 0"),
        ("data.val_split=1.5", "data.val_split: must be a fraction"),
        ("data.mean=[0.5,0.5]", "data.mean: must have 3 values"),
        ("data.aug.rand_augment=strong", "data.aug.rand_augment: 'strong' is not of the form"),
        ("train.head_epochs=20", "train.head_epochs: must be in [0, train.epochs)"),
        ("run.name=a/b", "run.name: 'a/b' must be a plain directory name"),
        ("justakey", "override 'justakey' is not of the form key=value"),
        ("optim=1", "optim: is a section, not a value; set its keys (e.g. optim.name=...): name, lr,"),
        ("optim.betas=0.9", "optim.betas: expected a list, e.g. optim.betas=[0.9,0.999]"),
        ("schedule.warmup_epochs=5000", "schedule.warmup_epochs: must be smaller than the"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(scalar)


def test_roundtrip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["model.name=deit_kd_cifar", "ema.enabled=true", "ema.decay_end=0.9995",
                             "data.mix.cutmix_alpha=1.0", "model.args.drop_rate=0.05"])
    assert from_dict(to_dict(cfg)) == cfg
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.model.name


def test_yaml_on_off_words_are_not_booleans(tmp_path):
    """YAML 1.1 reads on/off as booleans; the string options that use those words still get them."""
    cfg = load_config(None, ["train.compile=off", "data.device_cache=on", "train.amp=off", "run.wandb=off"])
    assert (cfg.train.compile, cfg.data.device_cache, cfg.train.amp, cfg.run.wandb) == ("off", "on", "off", "off")
    r = tmp_path / "r.yaml"
    r.write_text("train:\n  compile: true\n  amp: off\ndata:\n  device_cache: off\n")
    cfg = load_config(r)
    assert (cfg.train.compile, cfg.train.amp, cfg.data.device_cache) == ("default", "off", "off")
