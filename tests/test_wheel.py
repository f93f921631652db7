"""The wheel is complete: built from this checkout and installed (not editable) into a fresh virtual environment, it
runs `vitforge demo` and finds every recipe the README names, from a directory outside the repository.

Offline: the wheel is built without build isolation, and the new environment borrows the heavy dependencies
(torch, timm, ...) of the running interpreter through a `.pth` line instead of downloading them. A `.pth` line adds
a directory without running that directory's own `.pth` files, so an editable vitforge installed there stays
invisible and `import vitforge` can only find the installed wheel (asserted below).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_RECIPE = re.compile(r"(?<![\w/])(?:src/vitforge/)?(recipes/[\w./-]+\.yaml)")
SKIP = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_built_wheel_installs_runs_the_demo_and_ships_every_recipe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    # 1. Build the wheel from a copy of the sources (a build writes build/ and *.egg-info next to them).
    src = tmp_path / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", symlinks=True, ignore=SKIP)
    shutil.copytree(ROOT / "recipes", src / "recipes", ignore=SKIP)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("vitforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*") if p.is_file()}
    assert {f"vitforge/{r}" for r in recipes} <= names, "recipes missing from the wheel"
    assert "vitforge/py.typed" in names and "vitforge/commands/cli.py" in names

    # 2. A fresh environment; dependencies borrowed from this interpreter; the wheel installed by pip.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    vpy = venv / "bin" / "python"
    site = Path(run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    env).stdout.strip())
    outer = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_outer_site.pth").write_text("".join(f"{p}\n" for p in outer))
    run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q", str(wheel)],
        tmp_path, env)
    assert (venv / "bin" / "vitforge").is_file()

    # 3. From a directory outside the checkout: the demo, one epoch.
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = run([str(venv / "bin" / "vitforge"), "demo", "train.epochs=1", "schedule.warmup_epochs=0", "train.device=cpu",
             "run.progress=none", f"run.dir={work / 'runs'}", "run.name=demo"], work, env)
    assert "demo finished in" in r.stdout and f"run directory {work / 'runs' / 'demo'}" in r.stdout, r.stdout
    summary = json.loads((work / "runs" / "demo" / "summary.json").read_text())
    assert summary["val_images"] == 359 and summary["epochs_run"] == 1 and summary["best_val_top1"] > 10, summary

    # 4. Every recipe the README names resolves to the installed copy, and `train` reads one by its README path
    #    (one process: `vitforge train recipes/cifar10/minivit.yaml --dry-run ...` through the CLI's `main`).
    named = sorted(set(README_RECIPE.findall((ROOT / "README.md").read_text())))
    assert "recipes/cifar10/minivit.yaml" in named
    script = (
        "import json, sys, vitforge\n"
        "from vitforge.commands.cli import main\n"
        "from vitforge.resources import find_recipe\n"
        "print(json.dumps({'package': vitforge.__file__,\n"
        "                  'recipes': {n: str(find_recipe(n).resolve()) for n in sys.argv[1:]}}), flush=True)\n"
        "sys.exit(main(['train', 'recipes/cifar10/minivit.yaml', '--dry-run', 'data.train=digits',\n"
        "               'data.val_split=0.2', 'train.device=cpu']))\n"
    )
    r = run([str(vpy), "-c", script, *named], work, env)
    found = json.loads(r.stdout.splitlines()[0])
    installed = (site / "vitforge").resolve()
    assert Path(found["package"]).resolve() == installed / "__init__.py"  # the wheel, not the checkout
    for name, path in found["recipes"].items():
        assert path == str(installed / name), (name, path)
    assert "# model: minivit_cifar, 674,890 parameters" in r.stdout, r.stdout[-2000:]
