"""Progress of long commands (eval, predict, cv, pseudo-label, report, export, stack).

One helper for all of them: a tqdm bar when stderr is a terminal, a plain line every `every` seconds when it is not
(a log file, a pipe, a notebook's captured output), nothing with mode "none". Progress goes to stderr, so `--json`
output on stdout stays machine-readable.

    configure(mode="plain", every=30)               # what the CLI's --progress / --progress-every set
    with Progress("vit_b16 (12 views)", total=n, unit="img") as p:
        for batch in batches:
            ...
            p.update(len(batch))

A plain line reads `vit_b16 (12 views): 640/2,000 img (32%), 12.5 img/s, 51 s elapsed, ETA 1 min 49 s`. A task
that finishes before its first periodic line prints nothing, so quick commands stay quiet in scripts.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TextIO

MODES = ("auto", "bar", "plain", "none")
DEFAULT_EVERY = 10.0  # seconds between plain lines


@dataclass(frozen=True)
class Settings:
    """Process-wide defaults of `Progress` (the CLI sets them from --progress / --progress-every)."""

    mode: str = "auto"
    every: float = DEFAULT_EVERY


_settings = Settings()


def configure(mode: str | None = None, every: float | None = None) -> Settings:
    """Set the defaults of every later `Progress`; None keeps a setting. Returns the new settings.

    Raises:
        ValueError: unknown mode or a negative interval (the CLI validates both before calling).
    """
    global _settings
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
    if every is not None and not every >= 0:
        raise ValueError(f"progress interval must be >= 0 seconds, got {every}")
    _settings = replace(_settings, **{k: v for k, v in (("mode", mode), ("every", every)) if v is not None})
    return _settings


def settings() -> Settings:
    return _settings


def resolve_mode(mode: str, stream: TextIO | None = None) -> str:
    """"auto" -> "bar" when `stream` (default stderr) is a terminal, else "plain"; other modes unchanged."""
    if mode != "auto":
        return mode
    stream = stream if stream is not None else sys.stderr
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return "plain"


def duration(seconds: float) -> str:
    """`42 s`, `3 min 05 s`, `1 h 02 min`."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Progress of one task with a known (or unknown) amount of work.

    Args:
        desc: what is being done, e.g. the model name.
        total: units of work in all (None: unknown; no percentage or ETA).
        unit: name of one unit ("img", "fold", "step").
        mode: auto, bar, plain or none (default: `configure`'s).
        every: seconds between plain lines (default: `configure`'s); 0 prints on every update.
        stream: where to write (default stderr).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", *, mode: str | None = None,
                 every: float | None = None, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(mode or _settings.mode, self.stream)
        self.every = _settings.every if every is None else every
        self.clock = clock
        self.n = 0
        self.start = self.last = clock()
        self.printed = 0  # plain lines written so far
        self.shown = 0  # units done at the last plain line
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        """`n` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "plain":
            now = self.clock()
            if now - self.last >= self.every:
                self._line(now)

    def stage(self, text: str) -> None:
        """A new step of a task without countable units (e.g. "parity check"). A bar shows it at once; in plain
        mode it is printed when `every` seconds have passed since the last line (else the next periodic line
        carries it), so a command that fails or ends quickly prints nothing but its result or its one-line error."""
        self.desc = text
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.mode == "plain":
            now = self.clock()
            if now - self.last >= self.every:
                self._line(now, status=False)

    def line(self, now: float | None = None) -> str:
        """The plain status line."""
        now = self.clock() if now is None else now
        spent = max(now - self.start, 1e-9)
        rate = self.n / spent
        done = f"{self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total else \
            f"{self.n:,} {self.unit}"
        text = f"{self.desc}: {done}, {rate:.3g} {self.unit}/s, {duration(spent)} elapsed"
        if self.total and 0 < self.n < self.total and rate > 0:
            text += f", ETA {duration((self.total - self.n) / rate)}"
        return text

    def _line(self, now: float, status: bool = True) -> None:
        self.last, self.shown = now, self.n
        self.printed += 1
        print(self.line(now) if status else f"{self.desc} ({duration(now - self.start)} elapsed)", file=self.stream,
              flush=True)

    def close(self) -> None:
        """End the bar; in plain mode a last line when periodic lines were printed or the task outlasted `every`."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "plain" and self.n != self.shown:
            now = self.clock()
            if self.printed or now - self.start >= self.every:
                self._line(now)
        self.mode = "none"  # a second close (e.g. __exit__ after an explicit close) prints nothing

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
