"""`vitforge report` (issue 5): the page, its figures, and a real render in headless Chromium.

Chromium comes from the Debian packages `chromium` and `chromium-driver` (CI installs them); without a Chromium
binary the browser test is skipped and says so. The check loads the page with a script appended (a copy; the report
itself has no scripts) that records, at the window's load event, every <img>'s `complete` flag and natural size;
`--dump-dom` prints the resulting DOM. A second run saves a full-page screenshot next to the report.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.eval.report import build_report
from vitforge.train.trainer import train

FIGURES = ["training_curves", "confusion_counts", "confusion_normalized", "per_class_accuracy", "predictions_grid",
           "confused_pairs", "reliability"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-probe", `${img.complete ? 1 : 0}:${img.naturalWidth}x${img.naturalHeight}`);
  }
  document.body.setAttribute("data-probed", document.images.length);
  document.body.setAttribute("data-height", document.documentElement.scrollHeight);
});
</script>"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    return train(load_config(None, [
        "model.name=vit_demo", "data.train=digits", "data.val_split=0.2", "train.epochs=3", "schedule.warmup_epochs=0",
        "optim.lr=0.003", "data.aug.hflip=false", "data.aug.crop_padding=0", f"run.dir={root}", "run.name=r",
        "run.progress=none", "train.device=cpu", "train.threads=1"]))


@pytest.fixture(scope="module")
def page(run) -> Path:
    return build_report(run, tta="flip-shift")


class Images(HTMLParser):
    """Every <img>'s attributes."""

    def __init__(self):
        super().__init__()
        self.imgs: list[dict] = []
        self.body: dict = {}

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        elif tag == "body":
            self.body = dict(attrs)


def parse(text: str) -> Images:
    p = Images()
    p.feed(text)
    return p


def test_page_and_figure_files(run, page):
    assert page == run / "report" / "index.html"
    for name in FIGURES:
        png = run / "report" / f"{name}.png"
        with Image.open(png) as im:
            assert im.format == "PNG" and min(im.size) > 100, name
    text = page.read_text()
    imgs = parse(text).imgs
    assert len(imgs) == len(FIGURES)
    assert all(i["src"].startswith("data:image/png;base64,") for i in imgs)  # self-contained
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text) and "<script" not in text
    for words in ("Training curves", "Confusion", "Classification report", "36 validation predictions",
                  "Most-confused pairs", "Calibration", "Configuration", "Environment", "top-1 with TTA flip-shift",
                  "trained without horizontal flips or random crops", "leaves out its mirrored and shifted views"):
        assert words in text, words


def test_report_numbers_match_the_runs_validation_split(run, page):
    m = json.loads((page.parent / "report.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert m["n"] == summary["val_images"] == 359  # the same held-out split, rebuilt from the config
    assert m["top1"] == pytest.approx(summary["best_val_top1"], abs=1e-3)  # same images, same weights
    assert m["with_tta"]["n"] == 359 and m["tta"] == "flip-shift"
    # Trained without flips or crops: flip-shift keeps only the plain view, so TTA cannot cost accuracy here.
    assert m["with_tta"]["top1"] == m["top1"] and m["with_tta"]["loss"] == pytest.approx(m["loss"], rel=1e-6)
    assert sum(map(sum, m["confusion"])) == 359 and len(m["per_class"]) == 10


def test_report_on_other_data_via_cli(run, tmp_path, capsys):
    copy = shutil.copytree(run, tmp_path / "copy")  # leave the module's report alone
    out_dir = copy / "report"
    assert main(["report", str(copy), "--data", "digits", "--tta", "none"]) == 0
    assert str(out_dir / "index.html") in capsys.readouterr().out
    m = json.loads((out_dir / "report.json").read_text())
    assert m["n"] == 1797 and m["with_tta"] is None and m["data"] == "digits"
    assert main(["report", str(tmp_path / "copy" / "checkpoints")]) == 2
    assert "no checkpoints/best.pt" in capsys.readouterr().err


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def browse(binary: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_page_renders_in_headless_chromium(page, tmp_path):
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium binary (apt-get install -y chromium chromium-driver)")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    r = browse(binary, probe.as_uri(), tmp_path / "profile1", "--virtual-time-budget=10000", "--dump-dom")
    dom = parse(r.stdout)
    assert dom.body.get("data-probed") == str(len(FIGURES)), r.stderr[-2000:]
    for img in dom.imgs:
        done, size = img["data-probe"].split(":")
        w, h = map(int, size.split("x"))
        assert done == "1" and w > 100 and h > 100, (img["alt"], img["data-probe"])  # decoded, real size

    height = min(int(dom.body["data-height"]), 16000)
    shot = page.parent / "screenshot.png"
    r = browse(binary, page.as_uri(), tmp_path / "profile2", f"--window-size=1280,{height}", f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, height)
        pixels = np.asarray(im.convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # figures and text, not a blank page
