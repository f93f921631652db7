"""Command line: a table of verbs, each a thin wrapper around a library function.

Bad input (`VitforgeError`) prints one line `vitforge: error: ...` and exits with status 2; `--debug` shows the
traceback instead. Ctrl-C during training saves the run and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitforge import runtime
from vitforge.commands.cv import CrossValidation
from vitforge.commands.inspect import model_info, model_table, parse_kwargs
from vitforge.commands.pseudo_label import format_result, pseudo_label
from vitforge.config import load_config, to_yaml
from vitforge.data.inputs import resolve_auto
from vitforge.errors import VitforgeError
from vitforge.eval.ensemble import evaluate_ensemble, format_eval, predict_ensemble
from vitforge.eval.members import HeldOut, Member, describe_weights
from vitforge.eval.report import build_report
from vitforge.eval.stack import FEATURES, METHODS, format_comparison, stack_predict
from vitforge.eval.submission import ID_FROM, LABEL_AS, class_distribution, format_from_args, write_submission
from vitforge.eval.verify import run_verify_attention
from vitforge.export import FORMATS, export_checkpoint
from vitforge.models.backbones import NAMED_WEIGHTS
from vitforge.outputs import check_output
from vitforge.progress import DEFAULT_EVERY, MODES
from vitforge.progress import configure as configure_progress
from vitforge.resources import RECIPES, find_recipe
from vitforge.serve import Limits, ServeOptions, serve
from vitforge.train.budget import process_start
from vitforge.train.trainer import Trainer
from vitforge.version import __version__


@dataclass(frozen=True)
class Verb:
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- train / demo ----------------------------------------------------------------------------------------------------
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML, or a packaged recipe such as cifar10/minivit (omit with "
                                             "--resume)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.lr=1e-3")
    p.add_argument("--resume", metavar="RUN", help="continue a run directory (or its last.pt)")
    p.add_argument("--dry-run", action="store_true", help="validate the config and data, print it, train nothing")


def _run_train(a: argparse.Namespace) -> int:
    recipe, overrides = a.recipe, list(a.overrides)
    if recipe and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]
    if a.resume:
        if recipe:
            raise VitforgeError(f"give either a recipe or --resume, not both (got {recipe})")
        return _fit(Trainer(resume=a.resume, overrides=overrides, started=process_start()))
    if recipe is None and not overrides:
        raise VitforgeError("train needs a recipe YAML (e.g. recipes/cifar10/minivit.yaml), key=value overrides, "
                            "or --resume RUN")
    cfg = load_config(find_recipe(recipe) if recipe else None, overrides)
    cfg.data.train = resolve_auto(cfg.data.train, "train")  # `auto`: the run records the path it found
    if a.dry_run:  # everything a run sets up (data, model, input check, teacher, optimizer), no run directory
        t = Trainer(cfg, download=False)
        print(to_yaml(t.cfg))
        print(f"# data: {len(t.data.train)} train / {len(t.data.val) if t.data.val else 0} val images, "
              f"{len(t.classes)} classes")
        print(f"# model: {cfg.model.name}, {t.params[0]:,} parameters; input {t.pre.img_size}px; device {t.device}; "
              f"{t.steps_per_epoch} steps/epoch")
        if cfg.distill.teacher:
            print(f"# teacher: {cfg.distill.teacher}")
        if cfg.model.pretrained in ("hub", *NAMED_WEIGHTS):
            print(f"# pretrained: {cfg.model.pretrained} (not downloaded in a dry run)")
        return 0
    return _fit(Trainer(cfg, started=process_start()))  # train.budget counts from the process start


def _fit(trainer) -> int:
    try:
        trainer.fit()
    finally:
        runtime.cleanup()  # the run is over: leave torchrun's process group (a no-op for one process)
    return _exit_status(trainer)


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="key=value overrides of the demo recipe")


def _run_demo(a: argparse.Namespace) -> int:
    import time

    cfg = load_config(RECIPES / "demo.yaml", a.overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, started=process_start())
    try:
        run = trainer.fit()
    finally:
        runtime.cleanup()
    secs = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    best = summary.get("best_val_top1")
    print(f"demo finished in {secs:.1f} s: best validation top-1 {best:.2f}% "
          f"({summary.get('val_images')} held-out digits), run directory {run}" if best is not None else
          f"demo stopped after {secs:.1f} s; run directory {run}")
    return _exit_status(trainer)


# ---- eval / predict / report / export -------------------------------------------------------------------------------
TTA_HELP = "test-time augmentation: none, flip (2 views), flip-shift (6), saccadic12 (12)"
WEIGHTS_HELP = (
    "ensemble weights: one number per MODEL (a CV directory's folds share its weight), or 'auto' = from each "
    "member's held-out log-loss L (a CV directory's out-of-fold predictions, a run's best.pt validation loss): "
    "w ~ exp(-L), the geometric-mean probability the member gives the true class. Log-loss, not accuracy: it is what "
    "averaging probabilities changes, while accuracy ignores confidence and moves in steps of 1/N, so accuracy "
    "weights come out almost equal; exp(-L), not 1/L: bounded, so a lucky near-perfect member cannot take "
    "everything. The weights are printed (stderr). Default: equal per MODEL")


IMAGES_HELP = ("folder of images (searched recursively), or auto: the test folder under /kaggle/input "
               "($VITFORGE_INPUT_ROOT), the only image folder or the only one named test")


def _model_set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="MODEL",
                   help="checkpoint files, run directories, CV directories (all their folds) or exported model "
                        "folders (--format folder; also .safetensors, .onnx); several form an ensemble "
                        "(probabilities averaged)")
    p.add_argument("--tta", default="none", help=f"{TTA_HELP} (default none)")
    p.add_argument("--weights", nargs="+", metavar="W", help=WEIGHTS_HELP)
    _inference_args(p)


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=batch_size_arg, default=None, metavar="N",
                   help="images per forward pass (default auto: 256 on a GPU; on a CPU about four 224-px images' "
                        "worth, e.g. 4 at 224 px, 256 at 32 px: large CPU batches are slower)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    _progress_args(p)


def _progress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=MODES, default="auto",
                   help="auto (a bar on a terminal, else plain lines), bar, plain or none; on stderr (default auto)")
    p.add_argument("--progress-every", type=non_negative_float, default=DEFAULT_EVERY, metavar="SECONDS",
                   help=f"seconds between plain progress lines (default {DEFAULT_EVERY:g}; 0 = every batch)")


def _weights(values: list[str] | None):
    """--weights: None, "auto", or a list of numbers (a bad entry is named)."""
    if values is None or values == ["auto"]:
        return values and "auto"
    out = []
    for v in values:
        try:
            out.append(float(v))
        except ValueError:
            raise VitforgeError(f"--weights: {v!r} is not a number; give one number per model, or auto") from None
    return out


def _print_weights(result: dict, weights) -> None:
    """With --weights auto: each member's weight and the held-out score it comes from (stderr)."""
    if weights != "auto":
        return
    members = [Member(m["source"], m["kind"], m["checkpoints"]) for m in result["members"]]
    print(describe_weights(members, [m["weight"] for m in result["members"]],
                           [HeldOut(**m["held_out"]) for m in result["members"]]), file=sys.stderr)


def _eval_args(p: argparse.ArgumentParser) -> None:
    _model_set_args(p)
    p.add_argument("--data", required=True, help="labelled dataset (same formats as data.train)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_eval(a: argparse.Namespace) -> int:
    weights = _weights(a.weights)
    m = evaluate_ensemble(a.checkpoints, a.data, tta=a.tta, weights=weights, batch_size=a.batch_size,
                          device=a.device)
    _print_weights(m, weights)
    print(json.dumps(m, indent=2) if a.json else format_eval(m))
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    _model_set_args(p)
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _csv_args(p)


def _csv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CSV layout (default: file,pred,prob_<class>...)")
    g.add_argument("--kaggle", action="store_true", help="start from the id,label layout (id = file name stem)")
    g.add_argument("--id-column", help="header of the id column")
    g.add_argument("--id-from", choices=ID_FROM, help="id = relative path, file name, or file name stem")
    g.add_argument("--label-column", help="header of the predicted-class column ('' = no label column)")
    g.add_argument("--label-as", choices=LABEL_AS, help="write the class name or its index")
    g.add_argument("--probs", action=argparse.BooleanOptionalAction, default=None,
                   help="one probability column per class")
    g.add_argument("--prob-prefix", help="probability column = prefix + class name ('' = class names)")


def _csv_format(a: argparse.Namespace):
    return format_from_args(kaggle=a.kaggle, id_column=a.id_column, id_from=a.id_from, label_column=a.label_column,
                            label_as=a.label_as, probs=a.probs, prob_prefix=a.prob_prefix)


def _run_predict(a: argparse.Namespace) -> int:
    fmt = _csv_format(a)
    weights = _weights(a.weights)
    check_output(a.out, overwrite=a.overwrite)  # before the models run
    pred = predict_ensemble(a.checkpoints, resolve_auto(a.images, "test"), tta=a.tta, weights=weights,
                            batch_size=a.batch_size, device=a.device)
    _print_weights(pred, weights)
    _write_predictions(pred, a, fmt, f"{' + '.join(pred['models'])}, tta {a.tta}")
    return 0


def _write_predictions(pred: dict, a: argparse.Namespace, fmt, what: str, file=None) -> None:
    """Write the CSV, say where, and print the predicted class distribution (a warning when it is one class)."""
    path = write_submission(pred, a.out, fmt, overwrite=a.overwrite)
    msg = f"wrote {len(pred['ids'])} predictions ({what}) to {path}"
    if pred["unreadable"]:
        msg += f" ({len(pred['unreadable'])} unreadable image(s) skipped, e.g. {pred['unreadable'][0]})"
    text, warning = class_distribution(pred)
    print(f"{msg}\n{text}", file=file or sys.stdout)
    if warning:
        print(f"vitforge: warning: {warning}", file=sys.stderr)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--data", help="labelled dataset to evaluate on (default: the run's own held-out split)")
    p.add_argument("--tta", default="flip-shift", help=f"{TTA_HELP}, compared with no TTA (default flip-shift)")
    _inference_args(p)


def _run_report(a: argparse.Namespace) -> int:
    page = build_report(a.run, data=a.data, tta=a.tta, batch_size=a.batch_size, device=a.device)
    m = json.loads((page.parent / "report.json").read_text())
    tta = f", with TTA {a.tta} {m['with_tta']['top1']:.2f}%" if m["with_tta"] else ""
    print(f"wrote {page} (top-1 {m['top1']:.2f}%{tta} on {m['n']} images; PNG figures beside it)")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT_OR_RUN", help="checkpoint file or run directory")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="folder: model.safetensors + config.json + README.md model card (a Hugging Face model "
                        "repository to share); pt2: torch.export (the recommended PyTorch format); onnx; "
                        "safetensors (+ .json); torchscript (legacy, deprecated upstream)")
    p.add_argument("--out", help="output file, or directory for folder (default: RUN/export/model.<ext> or "
                                 "RUN/export/model/, or next to the checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--tol", type=float, default=1e-4, help="largest |logit difference| accepted by the parity check")
    p.add_argument("--onnx-exporter", choices=("auto", "dynamo", "legacy"), default="auto",
                   help="onnx: the dynamo exporter with the legacy one as fallback (auto), or only one of them")
    p.add_argument("--data", help="folder: labelled data for the model card's metrics (default: the run's held-out "
                                  "split)")
    p.add_argument("--no-eval", action="store_true", help="folder: write the card without evaluating the model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _progress_args(p)


def _run_export(a: argparse.Namespace) -> int:
    options = {"onnx": {"exporter": a.onnx_exporter}, "folder": {"data": a.data, "evaluate": not a.no_eval}}
    r = export_checkpoint(a.checkpoint, a.format, a.out, overwrite=a.overwrite, tol=a.tol,
                          **options.get(a.format, {}))
    if a.json:
        print(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    how = f", {r['exporter']} exporter" if r.get("exporter") else ""
    print(f"wrote {', '.join(r['files'])}\nparity ({r['check']}): max |delta| {r['max_abs_diff']:.3e} "
          f"(tolerance {r['tol']:.0e}) -> {'ok' if r['ok'] else 'FAILED'}{how}")
    if r.get("fallback"):
        print(f"onnx: legacy exporter used because the {r['fallback']}")
    if r.get("card_note"):
        print(f"model card: {r['card_note']}")
    if a.format == "torchscript":
        print("note: TorchScript is deprecated upstream; --format pt2 (torch.export) is the recommended PyTorch "
              "format", file=sys.stderr)
    return 0 if r["ok"] else 1


# ---- serve -----------------------------------------------------------------------------------------------------------
def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="MODEL",
                   help="run directory, checkpoint, exported folder (--format folder), .safetensors or .onnx; "
                        "several form an ensemble (probabilities averaged)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--tta", default="none", help=f"{TTA_HELP} (default none)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one ensemble weight per model")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=positive_int, help="intra-op threads of the forward pass (default: PyTorch's)")
    g = p.add_argument_group("dynamic batching")
    g.add_argument("--max-batch", type=positive_int, default=32,
                   help="most images per forward pass; 1 = no batching (default 32)")
    g.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="longest a batch waits for requests already arriving (default 10; a lone request never "
                        "waits)")
    g = p.add_argument_group("limits per request (exceeded: a 4xx JSON error)")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="request body size (default 20 MiB)")
    g.add_argument("--max-images", type=positive_int, default=32, help="images in one request (default 32)")
    g.add_argument("--max-pixels", type=positive_int, default=50_000_000,
                   help="pixels an image may declare (decompression-bomb guard; default 50,000,000)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM / Ctrl-C (default 30)")


def _run_serve(a: argparse.Namespace) -> int:
    if not a.max_upload_mb > 0:
        raise VitforgeError(f"--max-upload-mb: must be > 0, got {a.max_upload_mb}")
    limits = Limits(max_upload_bytes=int(a.max_upload_mb * 1024 * 1024), max_images=a.max_images,
                    max_pixels=a.max_pixels)
    options = ServeOptions(host=a.host, port=a.port, max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, limits=limits,
                           graceful_timeout=a.graceful_timeout)
    return serve(a.checkpoints, tta=a.tta, weights=a.weights, device=a.device, threads=a.threads, options=options)


# ---- cross-validation / pseudo-labels --------------------------------------------------------------------------------
def _cv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="recipe YAML or packaged recipe name (or only key=value overrides)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.train=data/train")
    p.add_argument("--folds", type=int, required=True, help="number of stratified folds K (>= 2)")
    p.add_argument("--tta", default="none", help="test-time augmentation of the out-of-fold predictions")


def _run_cv(a: argparse.Namespace) -> int:
    recipe, overrides = a.recipe, list(a.overrides)
    if recipe and "=" in recipe and not Path(recipe).exists():
        recipe, overrides = None, [recipe, *overrides]
    if recipe is None and not overrides:
        raise VitforgeError("cv needs a recipe YAML or key=value overrides (e.g. data.train=data/train)")
    cfg = load_config(find_recipe(recipe) if recipe else None, overrides)
    configure_progress(mode=cfg.run.progress)  # the out-of-fold predictions follow run.progress, as training does
    cv = CrossValidation(cfg, a.folds, tta=a.tta, started=process_start())
    summary = cv.run()
    if summary is None:
        return 130
    print(json.dumps({k: summary[k] for k in ("overall", "fold_accuracy_mean", "fold_accuracy_std", "runs",
                                              "oof_csv")}, indent=2))
    return 0


def _pseudo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="CV_DIR_OR_CKPT",
                   help="CV directories (all their folds) and/or run directories or checkpoints: the ensemble")
    p.add_argument("--images", required=True, help=IMAGES_HELP)
    p.add_argument("--out", help="CSV to write (file,label,score,...; use as data.extra=); default: "
                                 "pseudo_labels.csv in the first CV/run directory (or beside the first checkpoint)")
    p.add_argument("--threshold", type=float, default=0.98, help="minimum averaged confidence (default 0.98)")
    p.add_argument("--tta", default="none", help="test-time augmentation: none, flip, flip-shift, saccadic12")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _inference_args(p)


def _run_pseudo(a: argparse.Namespace) -> int:
    first = Path(a.sources[0]).expanduser()
    out = a.out or (first if first.is_dir() else first.parent) / "pseudo_labels.csv"
    r = pseudo_label(a.sources, resolve_auto(a.images, "test"), out=out, threshold=a.threshold, tta=a.tta,
                     overwrite=a.overwrite, batch_size=a.batch_size, device=a.device)
    print(format_result(r))
    return 0


def _stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cv_dirs", nargs="+", metavar="CV_DIR", help="finished `vitforge cv` directories of the same data")
    p.add_argument("--images", help=f"{IMAGES_HELP}; omit to only compare the rules out-of-fold")
    p.add_argument("--out", help="CSV to write (with --images)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--method", choices=METHODS, default="stack",
                   help="what the CSV uses: stack (logistic regression on the members' out-of-fold predictions), "
                        "weighted (the --weights auto rule) or mean (default stack)")
    p.add_argument("--features", choices=FEATURES, default="logits",
                   help="meta-learner inputs: each member's logits (log p - mean log p; one weight per member then "
                        "reproduces it) or its raw probabilities (default logits)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression (default 1)")
    p.add_argument("--json", action="store_true", help="print the comparison as one JSON object")
    _inference_args(p)
    _csv_args(p)


def _run_stack(a: argparse.Namespace) -> int:
    if bool(a.images) != bool(a.out):
        raise VitforgeError("--images and --out go together: both to write predictions, neither to only compare")
    fmt = _csv_format(a) if a.out else None
    if a.out:
        check_output(a.out, overwrite=a.overwrite)  # before the models run
    images = a.images and resolve_auto(a.images, "test")
    r = stack_predict(a.cv_dirs, images, method=a.method, C=a.C, kind=a.features, batch_size=a.batch_size,
                      device=a.device)
    c = r["comparison"]
    if a.json:
        print(json.dumps({k: v for k, v in c.items() if k != "fit_rows"}, indent=2))
    else:
        print(format_comparison(c))
    if a.out:  # with --json, stdout holds only the JSON object
        _write_predictions(r, a, fmt, f"{a.method} of {' + '.join(r['models'])}", sys.stderr if a.json else None)
    return 0


# ---- models / info ---------------------------------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'vit*'")
    p.add_argument("--json", action="store_true")


def _run_models(a: argparse.Namespace) -> int:
    rows = model_table(a.pattern)
    if not rows:
        print(f"no registered model matches {a.pattern!r} (library models: timm:<name>, tv:<name>)", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:32s} {r['params']:>14,}")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name")
    p.add_argument("overrides", nargs="*", help="constructor arguments, e.g. num_classes=10 img_size=64")
    p.add_argument("--json", action="store_true")


def _run_info(a: argparse.Namespace) -> int:
    info = model_info(a.model, a.overrides)
    if a.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['name']}: {info['params']:,} parameters ({info['trainable_params']:,} trainable), "
          f"input {tuple(info['input_shape'])}")
    print(f"  {info['macs'] / 1e9:.3f} GMACs = {info['flops'] / 1e9:.3f} GFLOPs per image (matmuls and convolutions; "
          f"papers' 'FLOPs' usually mean MACs)")
    for s in info["stages"]:
        print(f"  {s['name']:24s} {str(tuple(s['output_shape'])):24s} {s['params']:>12,}")
    return 0


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="registered model name")
    p.add_argument("overrides", nargs="*", help="constructor arguments, e.g. depth=4")
    p.add_argument("--batch-size", type=positive_int, default=2)
    p.add_argument("--json", action="store_true")


def _run_verify(a: argparse.Namespace) -> int:
    report = run_verify_attention(a.model, batch_size=a.batch_size, model_args=parse_kwargs(a.overrides))
    if a.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for b in report["blocks"]:
            mark = "ok" if b["ok"] else "FAIL"
            print(f"{b['name']:28s} Q{tuple(b['Q'])} K{tuple(b['K'])} V{tuple(b['V'])} A{tuple(b['A'])} "
                  f"O{tuple(b['O'])}  max|sum-1|={b['softmax_max_err']:.1e}  {mark}")
        if not report["blocks"]:
            print(f"nothing to check: {report.get('note') or 'no attention modules'}")
        else:
            if report.get("note"):
                print(report["note"])
            print("attention check passed" if report["ok"] else "attention check FAILED")
    return 0 if report["ok"] else 1


VERBS: dict[str, Verb] = {
    "train": Verb("train a model from a recipe (or resume a run)", _train_args, _run_train),
    "demo": Verb("train a small ViT on the bundled digits (about a minute on a laptop CPU)", _demo_args, _run_demo),
    "eval": Verb("evaluate a checkpoint (or an ensemble) on a labelled dataset, optionally with TTA", _eval_args,
                 _run_eval),
    "predict": Verb("predict a folder of images into a CSV (one model or an ensemble; submission layouts)",
                    _predict_args, _run_predict),
    "report": Verb("write RUN/report/index.html: curves, confusion, calibration, predictions, TTA", _report_args,
                   _run_report),
    "export": Verb("export a checkpoint (model folder to share, torch.export, ONNX, safetensors, legacy TorchScript) "
                   "with a parity check", _export_args, _run_export),
    "serve": Verb("serve a model over HTTP: JSON API, web page, dynamic batching, metrics", _serve_args, _run_serve),
    "cv": Verb("stratified K-fold cross-validation of a recipe (resumable; out-of-fold predictions)", _cv_args,
               _run_cv),
    "pseudo-label": Verb("label unlabeled images where the fold/model ensemble is confident and unanimous",
                         _pseudo_args, _run_pseudo),
    "stack": Verb("stack K-fold CVs: logistic regression on out-of-fold probabilities vs mean and weighted averaging",
                  _stack_args, _run_stack),
    "models": Verb("list registered models with parameter counts", _models_args, _run_models),
    "info": Verb("parameters, per-stage output shapes and FLOPs/MACs per image of a model", _info_args, _run_info),
    "verify-attention": Verb("check attention shapes and softmax rows of a model", _verify_args, _run_verify),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitforge", description="Train, evaluate and export vision transformers.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for name, verb in VERBS.items():
        p = sub.add_parser(name, help=verb.help, description=verb.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        verb.add_args(p)
    return parser


def _version() -> str:
    return f"vitforge {__version__}"


def _exit_status(trainer) -> int:
    """0 when the run finished; 128 + the signal that stopped it (130 Ctrl-C, 143 SIGTERM) when it was saved early."""
    if not trainer.interrupted:
        return 0
    return 128 + int(trainer.stop_signal or signal.SIGINT)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def batch_size_arg(text: str) -> int | None:
    """argparse type: "auto" (None) or an integer >= 1."""
    return None if text == "auto" else positive_int(text)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options (`train r.yaml --dry-run optim.lr=1e-3`)
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    console = logging.StreamHandler()
    console.setLevel(logging.INFO if args.debug else logging.WARNING)  # run logs go to train.log at INFO
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[console])
    logging.getLogger("vitforge").setLevel(logging.INFO)
    if hasattr(args, "progress"):
        configure_progress(args.progress, args.progress_every)
    try:
        return VERBS[args.verb].run(args)
    except VitforgeError as e:
        if args.debug:
            raise
        print(f"vitforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vitforge ... --json | head`: the reader left; no traceback, no second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
