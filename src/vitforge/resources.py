"""Files shipped inside the package: the training recipes.

The repository's `recipes/` folder is the one copy of every recipe; `src/vitforge/recipes` links to it and the wheel
carries it as package data. So `vitforge train recipes/cifar10/minivit.yaml` reads the local file inside a checkout
and the packaged copy anywhere else, and `cifar10/minivit` or a bare `minivit` name the same recipe.
"""

from __future__ import annotations

from pathlib import Path

from vitforge.errors import ConfigError

RECIPES = Path(__file__).resolve().parent / "recipes"


def packaged_recipes() -> list[str]:
    """Names of the packaged recipes, relative to the recipes folder and without `.yaml` (e.g. `cifar10/minivit`)."""
    if not RECIPES.is_dir():
        return []
    return sorted(p.relative_to(RECIPES).with_suffix("").as_posix() for p in RECIPES.rglob("*.yaml"))


def find_recipe(recipe: str | Path) -> Path:
    """The recipe file `recipe` names: an existing file as given, else the packaged recipe of that name.

    A packaged name may carry a leading `recipes/` and a `.yaml` suffix (`recipes/cifar10/minivit.yaml`,
    `cifar10/minivit`), or be a bare file stem (`minivit`) when only one packaged recipe has it.

    Raises:
        ConfigError: no such file and no packaged recipe of that name (the message lists the packaged ones), or a
            bare stem shared by several packaged recipes.
    """
    path = Path(recipe)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("./").removeprefix("recipes/")
    name = name.removesuffix(".yaml").removesuffix(".yml")
    names = packaged_recipes()
    if name in names:
        return RECIPES / f"{name}.yaml"
    stems = [n for n in names if n.rsplit("/", 1)[-1] == name] if "/" not in name else []
    if len(stems) == 1:
        return RECIPES / f"{stems[0]}.yaml"
    if len(stems) > 1:
        raise ConfigError(f"recipe {recipe}: several packaged recipes have that name ({', '.join(stems)}); "
                          f"give the folder too, e.g. {stems[0]}")
    raise ConfigError(f"recipe not found: {recipe} (no such file, nor a packaged recipe of that name; packaged: "
                      f"{', '.join(names) or 'none'})")
