"""Where a run's epoch metrics go: one small interface, one class per destination.

    Tracker.start(info)        once, when the run directory exists (new or resumed)
    Tracker.log(step, record)  once per epoch: the epoch record (train_loss, lr, val_top1, ...), at optimizer `step`
    Tracker.close()            once, at the end (also after a stop or an error)

`build_trackers` picks them from `run.*` options. Optional packages (wandb, mlflow) are imported when the trackers
are built, before any run directory exists, so a missing one is a one-line `ConfigError` and leaves nothing behind.
Adding a destination (CSV, ...) is one class here and one line in `build_trackers`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Protocol

from vitforge.config import Config, RunConfig, to_dict
from vitforge.errors import ConfigError
from vitforge.train.rundir import RunDir


@dataclass(frozen=True)
class RunInfo:
    """What a tracker learns at `start`."""

    run: RunDir
    config: dict  # the run's configuration as plain data
    resumed_epoch: int | None = None  # the epoch a resumed session starts at; None for a new run


class Tracker(Protocol):
    def start(self, info: RunInfo) -> None: ...

    def log(self, step: int, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The plottable numbers of an epoch record, grouped as train/... and val/... (bools, strings and NaN left out)."""
    out = {f"train/{k}": record[k] for k in ("train_loss", "lr", "img_per_s") if k in record}
    out.update({f"val/{k[4:]}": v for k, v in record.items() if k.startswith("val_")})
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


class JsonlTracker:
    """`metrics.jsonl`: the epoch record as one JSON line (what `report`, `cv` and summary.json read). On resume the
    lines of the epochs about to be run again are dropped first."""

    def __init__(self) -> None:
        self.run: RunDir | None = None

    def start(self, info: RunInfo) -> None:
        self.run = info.run
        if info.resumed_epoch is not None:
            self.run.truncate_metrics(info.resumed_epoch)

    def log(self, step: int, record: dict) -> None:
        self.run.append_metrics(record)

    def close(self) -> None:
        self.run = None


class TensorBoardTracker:
    """TensorBoard event files in `<run>/events` (`tensorboard --logdir runs`)."""

    def __init__(self) -> None:
        self.writer = None

    def start(self, info: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run asks for it

        self.writer = SummaryWriter(str(info.run.path / "events"))

    def log(self, step: int, record: dict) -> None:
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """Weights & Biases (`pip install vitforge[wandb]`). `run.wandb=offline` writes under the run directory and
    needs no account. The W&B run id is kept in `<run>/wandb_run_id`, so a resumed run continues the same W&B run."""

    def __init__(self, opts: RunConfig) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("run.wandb: the wandb package is not installed (pip install vitforge[wandb]); "
                              "or set run.wandb=off") from None
        self.wandb, self.opts, self.run = wandb, opts, None

    def start(self, info: RunInfo) -> None:
        o = self.opts
        run_id = _run_id(info.run, "wandb_run_id", lambda: secrets.token_hex(4))
        self.run = self.wandb.init(project=o.wandb_project, entity=o.wandb_entity, tags=list(o.wandb_tags) or None,
                                   mode=o.wandb, name=info.run.path.name, id=run_id, dir=str(info.run.path),
                                   config=info.config, resume="allow")

    def log(self, step: int, record: dict) -> None:
        self.run.log(scalars(record), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class MlflowTracker:
    """MLflow (`pip install vitforge[mlflow]`): the configuration as parameters (once, when the run is new), the epoch
    metrics at their optimizer step. Without `run.mlflow_uri` it writes a file store in `<run>/mlruns`, so it works
    with no server. The MLflow run id is kept in `<run>/mlflow_run_id`, so a resumed run continues the same one."""

    MAX_PARAMS_PER_CALL = 100  # MLflow's limit on parameters per batch (mlflow/utils/validation.py)
    MAX_PARAM_CHARS = 500  # the value limit of older MLflow servers (newer ones allow 6000)

    def __init__(self, opts: RunConfig) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError("run.mlflow: the mlflow package is not installed (pip install vitforge[mlflow]); "
                              "or set run.mlflow=false") from None
        self.mlflow, self.opts, self.active = mlflow, opts, False

    def start(self, info: RunInfo) -> None:
        m, path = self.mlflow, info.run.path
        m.set_tracking_uri(self.opts.mlflow_uri or (path / "mlruns").resolve().as_uri())
        m.set_experiment(self.opts.mlflow_experiment)
        id_file = path / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        run = m.start_run(run_id=run_id, run_name=None if run_id else path.name)
        self.active = True
        if run_id is None:
            id_file.write_text(run.info.run_id + "\n")
            params = {k: str(v)[: self.MAX_PARAM_CHARS] for k, v in _flatten(info.config).items()}
            items = sorted(params.items())
            for i in range(0, len(items), self.MAX_PARAMS_PER_CALL):
                m.log_params(dict(items[i:i + self.MAX_PARAMS_PER_CALL]))

    def log(self, step: int, record: dict) -> None:
        self.mlflow.log_metrics(scalars(record), step=step)

    def close(self) -> None:
        if self.active:
            self.mlflow.end_run()
            self.active = False


def build_trackers(cfg: Config, *, main: bool = True) -> list[Tracker]:
    """The trackers `cfg.run` asks for (metrics.jsonl always). Every rank builds them, so a missing package is refused
    everywhere before a run directory exists; only the main rank keeps them."""
    trackers: list[Tracker] = [JsonlTracker()]
    if cfg.run.tensorboard:
        trackers.append(TensorBoardTracker())
    if cfg.run.wandb != "off":
        trackers.append(WandbTracker(cfg.run))
    if cfg.run.mlflow:
        trackers.append(MlflowTracker(cfg.run))
    return trackers if main else []


def run_info(run: RunDir, cfg: Config, resumed_epoch: int | None) -> RunInfo:
    return RunInfo(run=run, config=json.loads(json.dumps(to_dict(cfg), default=str)), resumed_epoch=resumed_epoch)


def _run_id(run: RunDir, name: str, new) -> str:
    """An id kept in the run directory: read back on resume, made and written for a new run."""
    f = run.path / name
    if f.exists():
        return f.read_text().strip()
    run_id = new()
    f.write_text(run_id + "\n")
    return run_id


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
