"""Files the user asks vitforge to write: checked before any work, never replaced without `--overwrite`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vitforge.errors import VitforgeError


def check_output(path: str | Path, *, overwrite: bool = False, option: str = "--out") -> Path:
    """`path` if a file can be written there, else a VitforgeError naming it.

    Refused: an existing file without `overwrite`, a directory, and a place where nothing can be created (the nearest
    existing folder is probed by creating and removing a temporary file, which also catches read-only mounts and
    pseudo file systems where permission bits say yes). Missing parent folders are fine: writers create them.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise VitforgeError(f"{option} {p}: is a directory; give a file name")
    if p.exists() and not overwrite:
        raise VitforgeError(f"{option} {p} already exists; pass --overwrite to replace it")
    folder = p.parent
    while not folder.exists():
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vitforge-probe-"):
            pass
    except OSError as e:
        raise VitforgeError(f"{option} {p}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None
    return p


def usual_mode(path: str | Path) -> None:
    """Give a written file the permissions a plain `open(path, "w")` would (0666 minus the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
