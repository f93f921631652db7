"""Progress of long commands: a bar on a terminal, periodic plain lines when piped, nothing with --progress none."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from vitforge.progress import Progress, configure, duration, resolve_mode, settings


class Clock:
    """A fake monotonic clock the test advances by hand."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", Terminal()) == "bar"
    assert resolve_mode("auto", io.StringIO()) == "plain"
    assert resolve_mode("none", Terminal()) == "none" and resolve_mode("plain", Terminal()) == "plain"


def test_terminal_gets_a_tqdm_bar():
    term = Terminal()
    with Progress("vit (12 views)", total=40, unit="img", mode="auto", stream=term) as p:
        assert p.bar is not None
        for _ in range(4):
            p.update(10)
    out = term.getvalue()
    # tqdm draws and redraws one line (\r), and clears it at the end; no plain lines
    assert out.startswith("\rvit (12 views):   0%|") and "0/40 [" in out and "\n" not in out


def test_piped_output_gets_a_line_every_interval():
    pipe, clock = io.StringIO(), Clock()
    p = Progress("eval", total=100, unit="img", mode="auto", every=10, stream=pipe, clock=clock)
    assert p.bar is None
    for _ in range(10):  # 10 batches of 10 images, 4 s apart: lines at 12 s, 24 s, 36 s
        clock.t += 4
        p.update(10)
    p.close()
    lines = pipe.getvalue().splitlines()
    assert lines == [
        "eval: 30/100 img (30%), 2.5 img/s, 12 s elapsed, ETA 28 s",
        "eval: 60/100 img (60%), 2.5 img/s, 24 s elapsed, ETA 16 s",
        "eval: 90/100 img (90%), 2.5 img/s, 36 s elapsed, ETA 4 s",
        "eval: 100/100 img (100%), 2.5 img/s, 40 s elapsed",  # the closing line
    ]


def test_a_task_shorter_than_the_interval_prints_nothing_and_none_never_prints():
    pipe, clock = io.StringIO(), Clock()
    with Progress("quick", total=3, mode="plain", every=10, stream=pipe, clock=clock) as p:
        clock.t += 1
        p.update(3)
    assert pipe.getvalue() == ""
    term, clock = Terminal(), Clock()
    with Progress("silent", total=3, mode="none", every=0, stream=term, clock=clock) as p:
        p.update(3)
        p.stage("next step")
    assert term.getvalue() == ""


def test_stages_wait_for_the_interval_and_unknown_totals_have_no_eta():
    pipe, clock = io.StringIO(), Clock()
    with Progress("export onnx", mode="plain", every=10, stream=pipe, clock=clock) as p:
        p.stage("export onnx: writing model.onnx and checking parity")  # at 0 s: quiet (a quick failure is one line)
        clock.t += 75
        p.update(1)
        clock.t += 11
        p.stage("export onnx: verifying")  # 11 s after the last line: shown at once
    assert pipe.getvalue().splitlines() == ["export onnx: writing model.onnx and checking parity: 1 it, 0.0133 it/s, "
                                            "1 min 15 s elapsed",
                                            "export onnx: verifying (1 min 26 s elapsed)"]


def test_configure_sets_the_defaults_and_validates():
    old = settings()
    try:
        configure("plain", 0)
        pipe = io.StringIO()
        p = Progress("x", total=2, stream=pipe)
        assert p.mode == "plain" and p.every == 0
        p.update(1)
        assert pipe.getvalue().startswith("x: 1/2 it (50%)")
        with pytest.raises(ValueError, match="progress mode must be one of auto, bar, plain, none"):
            configure("loud")
        with pytest.raises(ValueError, match="must be >= 0"):
            configure(every=-1)
    finally:
        configure(old.mode, old.every)


@pytest.mark.parametrize("seconds, text", [(0.4, "0 s"), (59, "59 s"), (65, "1 min 05 s"), (3725, "1 h 02 min")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_cli_rejects_a_bad_progress_option():
    r = subprocess.run([sys.executable, "-m", "vitforge", "eval", "x", "--data", "y", "--progress-every", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--progress-every: must be >= 0, got -1" in r.stderr
