"""`vitforge export RUN --format folder`: what a person shares, laid out as a Hugging Face model repository.

    DIR/model.safetensors   the evaluation weights (EMA when the run evaluated with EMA)
    DIR/config.json         model name and arguments, classes (plus id2label/label2id), preprocessing, the training
                            config and validation metrics (`vitforge.eval.loading.read_export_config` reads it)
    DIR/README.md           model card: YAML metadata the Hub reads (library, task, tags, model-index), data, recipe,
                            validation metrics, per-class table, key figures, how to load and serve it
    DIR/figures/*.png       training curves, normalised confusion matrix, per-class accuracy (when evaluated)

Upload with the Hub's own tool, e.g. `hf upload <user>/<repo> DIR .` (older: `huggingface-cli upload`); vitforge has
no upload code. `vitforge predict/eval/serve DIR` load the folder from safetensors and JSON alone.

The parity check rebuilds the model from the folder (as `serve` and `predict` will) and compares logits with the
original's. The card's numbers come from evaluating the written folder on the run's held-out split (or `data`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch.nn as nn
import yaml
from safetensors.torch import save_model

from vitforge.errors import VitforgeError, first_line
from vitforge.eval.ensemble import ensemble_metrics, run_ensemble
from vitforge.eval.loading import CONFIG_FILE, WEIGHTS_FILE, load_for_inference
from vitforge.eval.report import image_loader, make_figures, read_metrics, validation_data
from vitforge.export.verify import LogitsModule, reference, start_export
from vitforge.outputs import usual_mode

log = logging.getLogger(__name__)
CARD_FILE = "README.md"
KEY_FIGURES = {"training_curves": "Training curves", "confusion_normalized": "Confusion matrix (rows: true class)",
               "per_class_accuracy": "Accuracy per class"}


def export_folder(model: nn.Module, meta: dict, out: Path, *, overwrite: bool = False, tol: float = 1e-4,
                  batch_size: int = 2, data: str | None = None, evaluate: bool = True) -> dict:
    """Write the model folder `out` (see the module docstring), check it and return the export report.

    Args:
        model, meta: from `vitforge.checkpoint.load_model`.
        out: the folder (created; an existing non-empty one only with `overwrite`, which replaces our files in it).
        tol, batch_size: parity check settings (as for every format).
        data: labelled data for the card's metrics (default: the run's own held-out split).
        evaluate: False writes the card from the checkpoint's stored metrics only.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise VitforgeError(f"--out {out}: is a file; --format folder writes a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise VitforgeError(f"--out {out}: exists and is not empty; pass --overwrite to replace the export files "
                            "in it")
    weights, cfg_file, card = out / WEIGHTS_FILE, out / CONFIG_FILE, out / CARD_FILE
    p = start_export(model, meta, [weights, cfg_file, card], overwrite=overwrite, batch_size=batch_size, tol=tol,
                     as_float=False)
    config = p.config
    classes = config["classes"]
    config.update(library_name="vitforge", num_labels=len(classes), id2label={str(i): c for i, c in enumerate(classes)},
                  label2id={c: i for i, c in enumerate(classes)})
    save_model(model, str(weights), metadata={"format": "pt", "vitforge": json.dumps(
        {k: config[k] for k in ("model_name", "classes")})})
    usual_mode(weights)
    cfg_file.write_text(json.dumps(config, indent=2) + "\n")
    rebuilt, _ = load_for_inference(out)
    ours = reference(LogitsModule(rebuilt), p.inputs)
    evaluation = _evaluate(out, meta, data) if evaluate else {"skipped": "not evaluated (--no-eval)"}
    figures = _write_figures(out, evaluation.pop("figures", []))
    card.write_text(model_card(config, meta, evaluation, figures, run_summary(meta)), encoding="utf-8")
    files = [weights, cfg_file, card, *figures]
    r = p.result("folder", files, ours, f"model rebuilt from {out.name}/ vs original, batches {p.batches}", "n/a")
    r["card_metrics"] = {k: evaluation[k] for k in ("top1", "top5", "n")
                         if evaluation.get(k) is not None} or None  # top5: more than 5 classes only
    r["card_note"] = evaluation.get("skipped")
    return r


def run_dir_of(meta: dict) -> Path | None:
    """The run directory a checkpoint belongs to (RUN/checkpoints/x.pt), if it is one."""
    p = Path(meta.get("path") or "")
    run = p.parent.parent
    return run if p.parent.name == "checkpoints" and (run / "config.yaml").is_file() else None


def run_summary(meta: dict) -> dict:
    run = run_dir_of(meta)
    if run is None or not (run / "summary.json").is_file():
        return {}
    return {**json.loads((run / "summary.json").read_text()), "run": run.name}


def _evaluate(folder: Path, meta: dict, data: str | None) -> dict:
    """Metrics of the written folder on the validation data, and the key figures; {"skipped": reason} on failure."""
    if data is None and not meta.get("config"):
        return {"skipped": "not evaluated: the checkpoint holds no training config to rebuild its validation split "
                           "(pass --data)"}
    try:
        val = validation_data(meta, data)
        ens = run_ensemble([str(folder)], val, labeled=True, tta="none", device="cpu")
    except VitforgeError as e:
        log.warning("model card without an evaluation: %s", e)
        return {"skipped": f"not evaluated: {first_line(e)}"}
    m = ensemble_metrics(ens)
    m["data"] = data or f"held-out split of {meta['config']['data']['train']}"
    run = run_dir_of(meta)
    figs = make_figures(m, ens, read_metrics(run) if run else [], image_loader(val, ens.ids))
    m["figures"] = [f for f in figs if f.name in KEY_FIGURES]
    return m


def _write_figures(out: Path, figs: list) -> list[Path]:
    if not figs:
        return []
    folder = out / "figures"
    shutil.rmtree(folder, ignore_errors=True)  # only ever a folder this export writes
    folder.mkdir()
    paths = []
    for f in figs:
        p = folder / f"{f.name}.png"
        p.write_bytes(f.png)
        paths.append(p)
    return paths


# ---- the model card --------------------------------------------------------------------------------------------------
def _front_matter(config: dict, m: dict, name: str, dataset: str) -> str:
    meta = {"library_name": "vitforge", "pipeline_tag": "image-classification",
            "tags": ["vitforge", "image-classification", "vision-transformer", config["model_name"]],
            "metrics": ["accuracy"]}
    if "top1" in m:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image classification"},
            "dataset": {"name": dataset, "type": dataset, "split": m["data"]},
            "metrics": [{"type": "accuracy", "value": round(m["top1"], 2), "name": "top-1 accuracy (%)"}] +
                       ([{"type": "accuracy", "value": round(m["top5"], 2), "name": "top-5 accuracy (%)"}]
                        if m.get("top5") is not None else [])}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(config: dict, meta: dict, m: dict, figures: list[Path], summary: dict) -> str:
    """README.md of the folder: Hub metadata, then what the model is, how it was trained and how good it is."""
    cfg = config.get("config") or {}
    data_cfg, pre = cfg.get("data") or {}, config["preprocess"]
    name = summary.get("run") or config["model_name"]
    dataset = str(data_cfg.get("train") or summary.get("dataset") or "unknown")
    classes = config["classes"]
    parts = [_front_matter(config, m, name, Path(dataset).name or dataset), f"# {name}\n",
             f"A `{config['model_name']}` image classifier ({config['params']:,} parameters, {len(classes)} classes, "
             f"{pre['img_size']} px input) trained with [vitforge](https://pypi.org/project/vitforge/).\n",
             "## Use it\n", "```bash\npip install vitforge",
             "vitforge predict . --images path/to/images --out predictions.csv   # in this folder",
             "vitforge serve . --port 8000      # HTTP API + web page on http://127.0.0.1:8000", "```\n",
             "```python\nfrom vitforge.eval.loading import load_for_inference\n\n"
             "model, meta = load_for_inference(\"path/to/this/folder\")  # safetensors + JSON; nothing is executed\n"
             "```\n",
             "`model.safetensors` holds the weights, `config.json` the model name and arguments, the classes and the "
             "preprocessing (`preprocess`: resize to `img_size`, RGB scaled to [0, 1], then (x - mean) / std).\n",
             "## Data\n",
             _table(["", ""], [["training data", f"`{dataset}`"],
                               ["training images", f"{summary['train_images']:,}" if "train_images" in summary
                                else "n/a"],
                               ["validation images", f"{summary['val_images']:,}" if "val_images" in summary
                                else "n/a"],
                               ["classes", ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")]]) + "\n",
             "## Training recipe\n", _recipe(cfg, summary), "\n## Validation metrics\n", _metrics(m, meta)]
    if "per_class" in m:
        parts += ["\n### Per class\n", _table(["class", "precision", "recall (accuracy)", "F1", "support"], [
            [c, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
            for c, r in m["per_class"].items()]) + "\n"]
    if figures:
        parts.append("\n## Figures\n")
        parts += [f"![{KEY_FIGURES[p.stem]}](figures/{p.name})\n" for p in figures]
    prov = config.get("exported") or {}
    src = meta.get("provenance") or {}
    parts += ["\n## Provenance\n", _table(["", ""], [
        ["trained with", f"vitforge {src.get('vitforge', '?')}, torch {src.get('torch', '?')}, git "
                         f"{src.get('git') or 'n/a'}, {src.get('saved', '?')}"],
        ["device", summary.get("device", "n/a")],
        ["exported with", f"vitforge {prov.get('vitforge')}, torch {prov.get('torch')}, {prov.get('saved')}"]]),
        "\n## Share it\n", "This folder is laid out as a Hugging Face model repository. Add a `license:` line to the "
        "metadata above, then:\n", "```bash\nhf auth login\nhf upload <user>/<repo> . .   # or: huggingface-cli "
        "upload <user>/<repo> . .\n```\n"]
    return "\n".join(parts)


def _recipe(cfg: dict, summary: dict) -> str:
    if not cfg:
        return "No training config was stored with the checkpoint.\n"
    rows = []
    for section, keys in (("model", ("name", "args", "drop_path_rate", "pretrained")),
                          ("optim", ("name", "lr", "weight_decay")), ("schedule", ("name", "warmup_epochs")),
                          ("train", ("epochs", "batch_size", "label_smoothing", "precision")),
                          ("data", ("batch_size", "img_size", "val_split")), ("ema", ("enabled", "decay"))):
        for k in keys:
            v = (cfg.get(section) or {}).get(k)
            if v not in (None, {}, []):
                rows.append([f"`{section}.{k}`", f"`{json.dumps(v)}`"])
    aug = (cfg.get("data") or {}).get("aug") or {}
    on = [k for k, v in aug.items() if v not in (None, False, 0, 0.0, [], "")]
    if on:
        rows.append(["augmentation", ", ".join(f"{k}={json.dumps(aug[k])}" for k in on)])
    if "epochs_run" in summary:
        rows.append(["trained", f"{summary['epochs_run']} epochs, {summary.get('wall_seconds', 0):.0f} s"])
    return _table(["setting", "value"], rows) + "\n\nThe full configuration is under `config` in `config.json`.\n"


def _metrics(m: dict, meta: dict) -> str:
    if "top1" not in m:
        stored = meta.get("metrics") or {}
        note = m.get("skipped", "not evaluated")
        if stored.get("top1") is not None:
            top5 = f", top-5 {stored['top5']:.2f}%" if stored.get("top5") is not None else ""
            return (f"Top-1 {stored['top1']:.2f}%{top5} on {stored.get('n', '?')} validation images (recorded by the "
                    f"training run; the card's own evaluation: {note}).\n")
        return f"No validation metrics ({note}).\n"
    rows = [["top-1", f"{m['top1']:.2f}%"], *([["top-5", f"{m['top5']:.2f}%"]] if m.get("top5") is not None else []),
            ["loss", f"{m['loss']:.4f}"], ["macro F1", f"{m['macro_avg']['f1']:.4f}"], ["ECE", f"{m['ece']:.4f}"],
            ["images", f"{m['n']:,}"]]
    return f"Evaluated from this folder's files on the {m['data']}:\n\n" + _table(["metric", "value"], rows) + "\n"
