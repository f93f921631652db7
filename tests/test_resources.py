"""Packaged recipes: one copy (the repository's recipes/), found by path or by name from any directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vitforge import resources
from vitforge.commands.cli import main
from vitforge.errors import ConfigError
from vitforge.resources import RECIPES, find_recipe, packaged_recipes

ROOT = Path(__file__).resolve().parents[1]
README_RECIPE = re.compile(r"(?<![\w/])((?:src/vitforge/)?recipes/[\w./-]+\.yaml)")


def readme_recipes() -> list[str]:
    return sorted(set(README_RECIPE.findall((ROOT / "README.md").read_text())))


def test_the_package_reads_the_repository_recipes_folder():
    assert RECIPES.resolve() == (ROOT / "recipes").resolve()  # a link, not a second copy
    on_disk = sorted(p.relative_to(ROOT / "recipes").with_suffix("").as_posix()
                     for p in (ROOT / "recipes").rglob("*.yaml"))
    assert packaged_recipes() == on_disk
    assert {"demo", "cifar10/minivit", "cifar10/deit_kd", "hsi/paviau", "muffyn/swinv2_b"} <= set(on_disk)


@pytest.mark.parametrize("name", ["recipes/cifar10/minivit.yaml", "./recipes/cifar10/minivit.yaml",
                                  "cifar10/minivit", "cifar10/minivit.yaml", "minivit"])
def test_names_resolve_to_the_packaged_file_outside_a_checkout(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_recipe(name) == RECIPES / "cifar10" / "minivit.yaml"


def test_a_local_file_wins_over_the_packaged_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "recipes" / "cifar10" / "minivit.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("train:\n  epochs: 1\n")
    assert find_recipe("recipes/cifar10/minivit.yaml") == Path("recipes/cifar10/minivit.yaml")
    assert find_recipe("minivit") == RECIPES / "cifar10" / "minivit.yaml"  # no file named `minivit` here


@pytest.mark.parametrize("name", ["nope.yaml", "recipes/cifar10", "../pyproject", "cifar10/../demo"])
def test_unknown_names_are_one_line_errors_listing_the_packaged_recipes(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        find_recipe(name)
    msg = str(e.value)
    assert msg.startswith(f"recipe not found: {name} (") and "\n" not in msg
    assert "packaged: cifar10/cct_7_3x1, " in msg and ", demo, " in msg


def test_a_stem_shared_by_two_recipes_must_name_its_folder(tmp_path, monkeypatch):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "x.yaml").write_text("{}\n")
    monkeypatch.setattr(resources, "RECIPES", tmp_path)
    monkeypatch.chdir(tmp_path / "a")
    assert packaged_recipes() == ["a/x", "b/x"]
    with pytest.raises(ConfigError, match=r"^recipe x: several packaged recipes have that name \(a/x, b/x\); give "
                                          r"the folder too, e.g. a/x$"):
        find_recipe("x")
    assert find_recipe("b/x") == tmp_path / "b" / "x.yaml"


def test_every_recipe_the_readme_names_resolves_from_anywhere(tmp_path, monkeypatch):
    named = readme_recipes()
    assert "recipes/cifar10/minivit.yaml" in named
    monkeypatch.chdir(tmp_path)
    for name in named:
        path = find_recipe(name.removeprefix("src/vitforge/"))
        assert path.is_file() and path.resolve().is_relative_to((ROOT / "recipes").resolve()), name


def test_cli_train_reads_a_packaged_recipe_outside_the_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "recipes/cifar10/minivit.yaml", "--dry-run", "data.train=digits", "data.val_split=0.2",
                 "train.device=cpu", f"run.dir={tmp_path / 'runs'}"]) == 0
    out = capsys.readouterr().out
    assert "name: minivit_cifar" in out and "# model: minivit_cifar, 674,890 parameters" in out
    assert "# data: 1438 train / 359 val images, 10 classes" in out
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
