"""Accuracy against wall-clock time for a recipe, trained by the library trainer, across as many processes as needed.

    python benchmarks/time_to_accuracy.py RECIPE [key=value ...] [--stop-after S] [--after RESULT.json]
    python benchmarks/time_to_accuracy.py --show RUN_DIR_OR_RESULT.json [--plot curve.png]

After every epoch (its validation included) the point (epoch, cumulative seconds, val top-1) is written to
`<run dir>/time_to_accuracy.json` and to `benchmarks/results/<--name>.json`. Seconds run from just before the
`Trainer` is built (data opening, model building and `torch.compile`'s first step included).

Interruption: `--stop-after S` asks the trainer to stop at the next optimizer step once S seconds have passed in this
process (it saves last.pt mid-epoch; resuming is exact). Run the same command again and it resumes the run (the run
directory is `run.dir/run.name`; `tta-<recipe>` when neither the recipe nor the overrides name it), adding this
process's time to the previous processes'. Only train.* / run.progress / data.num_workers overrides reach a resumed
run (the rest is in its checkpoint), so repeating the first command is the way to continue. A process killed without
a clean stop counts up to its last recorded epoch: the trainer resumes from the checkpoint of that epoch, and the
points after it are dropped and measured again. Every process pays setup and compilation again; `sessions` lists
them, and `extra_session_overhead_s` sums those of the processes after the first (what one uninterrupted process
would not have spent).

`--after RESULT.json` starts the clock at another run's total (a distillation student after its teacher: the issue's
teacher + student budget). `--budgets` lists the best val top-1 reached within each budget.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _device import device_tag  # noqa: E402
from _results import save_result  # noqa: E402

STATE = "time_to_accuracy.json"


# ---- the state of a (possibly multi-process) measurement -------------------------------------------------------------
def new_state(recipe: str, overrides: list[str], name: str, note: str, offset: float) -> dict:
    return {"recipe": recipe, "overrides": overrides, "name": name, "note": note, "offset_s": offset,
            "points": [], "sessions": []}


def prior_seconds(state: dict) -> float:
    """Useful seconds of earlier processes (each up to its last surviving point, or its clean stop)."""
    return sum(s["elapsed_s"] for s in state["sessions"])


def drop_points_from(state: dict, epoch: int) -> None:
    """Forget points of epochs >= `epoch` (0-based; the trainer will run them again) and the time they took."""
    state["points"] = [p for p in state["points"] if p["epoch"] - 1 < epoch]
    for s in state["sessions"]:
        if s.get("end") == "killed":
            kept = [p for p in state["points"] if p["session"] == s["index"]]
            s["elapsed_s"] = kept[-1]["session_s"] if kept else 0.0


def summary(state: dict, budgets: list[float]) -> dict:
    pts = [p for p in state["points"] if p.get("val_top1") is not None]
    best = max(pts, key=lambda p: p["val_top1"], default=None)
    later = state["sessions"][1:]
    return {
        "best": best and {k: best[k] for k in ("epoch", "seconds", "val_top1")},
        "total_seconds": round(state["offset_s"] + prior_seconds(state), 2),
        "extra_session_overhead_s": round(sum(s.get("setup_s", 0) + s.get("first_step_s", 0) for s in later), 2),
        "best_within": {str(int(b)): max((p["val_top1"] for p in pts if p["seconds"] <= b), default=None)
                        for b in budgets},
    }


# ---- recording hooks -------------------------------------------------------------------------------------------------
class Recorder:
    """Trainer hooks: time the first step, record every epoch, stop cleanly after `stop_after` seconds."""

    def __init__(self, state: dict, session: dict, t0: float, stop_after: float | None, save) -> None:
        self.state, self.session, self.t0 = state, session, t0
        self.stop_after, self.save = stop_after, save
        self.base = state["offset_s"] + prior_seconds(state) - session["elapsed_s"]
        self.wrapped = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def on_step(self, trainer) -> None:
        if not self.wrapped:  # the run directory exists from the first step on
            self.session["first_step_s"] = round(self.elapsed() - self.session["setup_s"], 3)
            original = trainer.run.append_metrics

            def append(record: dict) -> None:
                original(record)
                self.on_epoch(record)

            trainer.run.append_metrics = append
            self.wrapped = True
        if self.stop_after is not None and self.elapsed() >= self.stop_after:
            trainer.request_stop()

    def on_epoch(self, record: dict) -> None:
        s = self.elapsed()
        self.session["elapsed_s"] = round(s, 3)
        self.state["points"].append({
            "epoch": record["epoch"] + 1, "seconds": round(self.base + s, 3), "val_top1": record.get("val_top1"),
            "train_loss": record.get("train_loss"), "epoch_train_s": round(record.get("epoch_seconds", 0.0), 3),
            "session": self.session["index"], "session_s": round(s, 3)})
        self.save()


# ---- running ---------------------------------------------------------------------------------------------------------
def run_dir_of(recipe: str, overrides: list[str]) -> Path:
    from vitforge.config import load_config

    cfg = load_config(recipe, overrides)
    return Path(cfg.run.dir) / cfg.run.name


def open_state(run_dir: Path, args, overrides: list[str]) -> tuple[dict, bool]:
    """(state, resuming). A run directory with last.pt is resumed; its previous sessions are closed."""
    path = run_dir / STATE
    resuming = (run_dir / "checkpoints" / "last.pt").is_file()
    if resuming and path.is_file():
        state = json.loads(path.read_text())
        if state["sessions"] and state["sessions"][-1]["end"] == "finished":
            show(state, None)
            raise SystemExit(0)
        for s in state["sessions"]:
            if s["end"] == "running":  # that process died without a clean stop
                s["end"] = "killed"
        return state, True
    if resuming:
        raise SystemExit(f"{run_dir} holds a run that was not started by this script (no {STATE}); pick a run.name")
    offset = read_total(args.after) if args.after else 0.0
    return new_state(args.recipe, overrides, args.name, args.note, offset), False


def read_total(path: str) -> float:
    data = json.loads(Path(path).read_text())
    return float(data.get("results", data)["summary"]["total_seconds"])


def train_session(args, overrides: list[str]) -> dict:
    from vitforge.checkpoint import load_checkpoint
    from vitforge.config import load_config
    from vitforge.train.trainer import Trainer

    run_dir = run_dir_of(args.recipe, overrides)
    state, resuming = open_state(run_dir, args, overrides)
    session = {"index": len(state["sessions"]), "started": _dt.datetime.now().isoformat(timespec="seconds"),
               "setup_s": 0.0, "first_step_s": 0.0, "elapsed_s": 0.0, "end": "running"}
    t0 = time.perf_counter()
    if resuming:
        progress = load_checkpoint(run_dir, prefer="last")["progress"]
        drop_points_from(state, progress["epoch"])
        resumable = [o for o in overrides if o.startswith(("train.", "run.progress", "data.num_workers"))]
        trainer = Trainer(resume=run_dir, overrides=resumable)
    else:
        trainer = Trainer(load_config(args.recipe, overrides))
    state["sessions"].append(session)
    session["setup_s"] = round(time.perf_counter() - t0, 3)
    state["device"] = device_tag(trainer.device)
    state["name"] = state["name"] or f"tta_{Path(args.recipe).stem}_{state['device']}"
    save = _saver(state, run_dir, args)
    trainer.hooks = Recorder(state, session, t0, args.stop_after, save)
    trainer.fit()
    session["elapsed_s"] = round(time.perf_counter() - t0, 3)
    session["end"] = "stopped" if trainer.interrupted else "finished"
    save()
    return state


def _saver(state: dict, run_dir: Path, args):
    def save() -> None:
        state["summary"] = summary(state, args.budgets)
        state["run_dir"] = str(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STATE).write_text(json.dumps(state, indent=2) + "\n")
        save_result(state["name"], state, command=" ".join([Path(sys.executable).name, *sys.argv]))

    return save


# ---- showing ---------------------------------------------------------------------------------------------------------
def load_any(path: str) -> dict:
    p = Path(path)
    data = json.loads((p / STATE if p.is_dir() else p).read_text())
    return data.get("results", data)


def show(state: dict, plot: str | None) -> None:
    print(f"{state['recipe']} {' '.join(state['overrides'])}  ({state.get('device')}, {state.get('note') or ''})")
    print(f"{'epoch':>6} {'seconds':>9} {'val top-1':>9}")
    for p in state["points"]:
        top1 = "" if p["val_top1"] is None else f"{p['val_top1']:9.2f}"
        print(f"{p['epoch']:6d} {p['seconds']:9.1f} {top1}")
    print(json.dumps(state.get("summary", {}), indent=2))
    if plot:
        plot_curve(state, plot)
        print("->", plot)


def plot_curve(state: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in state["points"] if p["val_top1"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["seconds"] / 60 for p in pts], [p["val_top1"] for p in pts], marker=".")
    ax.set_xlabel("wall-clock minutes (compile included)")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(Path(state["recipe"]).stem + (f" - {state['device']}" if state.get("device") else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipe", nargs="?", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--stop-after", type=float, default=None, help="stop cleanly after this many seconds")
    p.add_argument("--after", help="results JSON of a run whose total time starts this clock (teacher)")
    p.add_argument("--budgets", type=float, nargs="*", default=[600.0, 1200.0], help="seconds")
    p.add_argument("--name", help="results file stem (default tta_<recipe>_<device>)")
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--show", metavar="RUN_OR_JSON", help="print (and --plot) a recorded curve, train nothing")
    p.add_argument("--plot", help="with --show: write the curve to this PNG")
    args, extra = p.parse_known_args(argv)
    overrides = [*args.overrides, *extra]
    if any("=" not in o for o in overrides):
        p.error(f"unrecognized arguments: {' '.join(o for o in overrides if '=' not in o)}")
    if args.show is None and args.recipe is None:
        p.error("give a RECIPE to run, or --show RUN_OR_JSON")
    return args, overrides


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    if args.show:
        show(load_any(args.show), args.plot)
        return
    from vitforge.config import load_config

    if load_config(args.recipe, overrides).run.name is None:  # resuming needs a known run directory
        overrides.append(f"run.name=tta-{Path(args.recipe).stem}")
    state = train_session(args, overrides)
    show(state, None)


if __name__ == "__main__":
    main()
