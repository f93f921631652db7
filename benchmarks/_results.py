"""Write benchmark results as JSON with provenance (hardware, torch version, command, date, git commit)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# VITFORGE_RESULTS_DIR redirects every benchmark's JSON (one folder for a device run, a temporary one for tests)
RESULTS_DIR = Path(os.environ.get("VITFORGE_RESULTS_DIR") or REPO / "benchmarks" / "results")


def hardware() -> dict:
    """CPU model/cores, GPU name/memory if any, torch/CUDA versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:
        pass
    return info


def git_commit() -> str:
    """HEAD (+ `-dirty`), or VITFORGE_GIT_COMMIT where the tree is a copy without git (a device machine)."""
    fallback = os.environ.get("VITFORGE_GIT_COMMIT") or "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
        if out.returncode != 0 or not out.stdout.strip():
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=REPO).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except OSError:
        return fallback


def save_result(name: str, results: dict, command: str | None = None) -> Path:
    """Write `<RESULTS_DIR>/<name>.json` (`benchmarks/results/` unless VITFORGE_RESULTS_DIR says otherwise) and return
    its path.

    Args:
        name: file stem; include the device kind (e.g. `scan_cpu`, `scan_h100`) so runs do not overwrite each other.
        results: the measured numbers (and the settings that produced them).
        command: the exact command that reproduces the run (default: this process's argv).
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": command or " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "results": results,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
