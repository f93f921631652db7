"""The run directory (the contract between commands) and what is written into it.

    runs/<name>/config.yaml  metrics.jsonl  events/ (TensorBoard)  checkpoints/{last,best}.pt  summary.json  train.log
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from vitforge.config import Config, to_yaml
from vitforge.errors import CheckpointError, ConfigError
from vitforge.progress import resolve_mode

log = logging.getLogger("vitforge")


@dataclass
class RunState:
    """Where the run is; saved in every checkpoint (as its `progress` field)."""

    epoch: int = 0  # epoch being run (or next to run)
    batch: int = 0  # next batch of that epoch
    step: int = 0  # optimizer steps done
    best_top1: float = -1.0
    best_epoch: int = -1
    evals_since_best: int = 0
    wall: float = 0.0  # training seconds so far (all sessions)
    loss_sum: float = 0.0  # running sums of the current epoch (exact epoch metrics across resumes)
    seen: int = 0

    @classmethod
    def from_checkpoint(cls, d: dict, path: str) -> RunState:
        """The state a checkpoint holds, each field of the type it has here (a number as a string would only fail
        somewhere deep in the loop); anything else is a one-line `CheckpointError`."""
        defaults = asdict(cls())
        unknown = [k for k in d if k not in defaults]
        bad = [k for k, v in d.items() if k not in unknown and not (
            isinstance(v, (int, float)) and not isinstance(v, bool)
            and (isinstance(defaults[k], float) or isinstance(v, int)))]
        if unknown or bad:
            k = (unknown or bad)[0]
            raise CheckpointError(f"{path}: field 'progress' has " + (
                f"an unknown key {str(k)[:40]!r}" if unknown else f"{k} = {str(d[k])[:40]!r}, not a number"))
        return cls(**d)


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.ckpt_dir = path / "checkpoints"
        self.last = self.ckpt_dir / "last.pt"
        self.best = self.ckpt_dir / "best.pt"
        self.metrics = path / "metrics.jsonl"
        self.summary = path / "summary.json"
        self.config = path / "config.yaml"

    @classmethod
    def create(cls, cfg: Config, *, dataset_name: str) -> RunDir:
        """A new run directory. Nothing is overwritten: a directory holding a run (a checkpoint) or anything that is
        not a vitforge run is refused for an explicit `run.name`; a default (time-stamped) name that is taken, e.g.
        by a run started in the same second, gets a -2, -3, ... suffix and is claimed by an exclusive mkdir. A
        directory from a start that never reached a checkpoint (config.yaml, train.log) may be reused."""
        explicit = bool(cfg.run.name)
        name = cfg.run.name or default_name(cfg.model.name, dataset_name)
        base = Path(cfg.run.dir) / name
        path = base
        for k in range(2, 1000):
            run = cls(path)
            if run.last.exists() or run.best.exists():
                if explicit:
                    raise ConfigError(f"run.name: {path} already holds a run; continue it with `vitforge train "
                                      f"--resume {path}` or choose another run.name")
            elif path.exists() and not path.is_dir():
                if explicit:
                    raise ConfigError(f"run.name: {path} is a file; choose another run.name")
            elif path.exists() and any(path.iterdir()) and not run.config.exists():
                if explicit:
                    raise ConfigError(f"run.name: {path} already exists and is not a vitforge run (it holds other "
                                      f"files); a run needs a new or empty directory: choose another run.name or "
                                      f"run.dir")
            else:
                try:
                    path.mkdir(parents=True, exist_ok=explicit)
                    return run
                except FileExistsError:  # another run claimed this default name a moment ago
                    pass
            path = base.with_name(f"{name}-{k}")
        raise ConfigError(f"run.dir: could not find a free run name like {base}")

    # ---- one process at a time -------------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def acquire(self) -> None:
        """Mark the run as in use by this process (`.lock`: pid and host). A lock left by a process that is gone
        (killed, crashed) is taken over; one held by a live process is a ConfigError naming it."""
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise ConfigError(f"{self.path} is in use by process {holder['pid']} on {holder['host']} (since "
                                      f"{holder.get('since', '?')}); wait for it to finish or stop it first (if it "
                                      f"is gone, remove {self.lock_path})") from None
                self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise ConfigError(f"{self.path}: could not take its lock {self.lock_path}")

    def release(self) -> None:
        try:
            holder = json.loads(self.lock_path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.lock_path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        """The live process holding the lock, or None if the lock is stale (or unreadable, i.e. half-written by a
        process killed in between)."""
        try:
            holder = json.loads(self.lock_path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if host != socket.gethostname():
            return holder  # another machine (shared file system): cannot check, assume it is alive
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return holder
        return None if _is_zombie(pid) else holder

    def write_config(self, cfg: Config) -> None:
        self.config.write_text(to_yaml(cfg))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, keep_before_epoch: int) -> None:
        """On resume: drop lines of epochs that are about to be run again."""
        if not self.metrics.exists():
            return
        lines = [ln for ln in self.metrics.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("epoch", -1) < keep_before_epoch]
        self.metrics.write_text("".join(ln + "\n" for ln in kept))

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        return [json.loads(ln) for ln in self.metrics.read_text().splitlines() if ln.strip()]

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=2) + "\n")


def _is_zombie(pid: int) -> bool:
    """A child that exited but was not reaped yet still answers kill(pid, 0)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def default_name(model: str, dataset: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = Path(dataset.split(":")[0].rstrip("/")).stem or "data"
    return f"{model.replace(':', '-').replace('/', '-')}-{stem}-{stamp}"


def setup_file_logging(run: RunDir) -> logging.Handler:
    handler = logging.FileHandler(run.path / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("vitforge").addHandler(handler)
    return handler


class EpochReporter:
    """What a training run shows while it runs: a tqdm bar over an epoch's batches on a terminal, one line per epoch
    (plain lines when piped, nothing with `run.progress=none`). Not to be confused with `vitforge.progress.Progress`
    (stage progress of the other verbs) or `RunState` (where the run is)."""

    def __init__(self, mode: str, enabled: bool):
        self.mode = resolve_mode(mode) if enabled else "none"
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                            dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def end_epoch(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.mode != "none":
            print(line, file=sys.stderr, flush=True)

    def message(self, line: str, always: bool = False) -> None:
        """Print a line (between bar updates); `always` prints even with progress off (e.g. how to resume)."""
        if self.mode != "none" or always:
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)
