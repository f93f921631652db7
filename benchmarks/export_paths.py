"""Which export path every registered model takes: ONNX through the dynamo exporter (or the legacy fallback, and why),
and torch.export (`--format pt2`), each with its parity check.

    python benchmarks/export_paths.py [--max-params 60e6] [--models NAME ...]

Each model is built at its registered configuration with random weights (moved off their initial values so every
path matters), in eval mode on the CPU, and exported with `export_model` exactly as `vitforge export` does: ONNX
with `exporter="auto"` (dynamo first, legacy when dynamo raises or fails the check) and pt2. Models above
--max-params are listed as skipped (the MambaVision B/L sizes share the code of T/S). Results:
benchmarks/results/export_paths_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

from vitforge.errors import VitforgeError  # noqa: E402
from vitforge.export import export_model  # noqa: E402
from vitforge.export.verify import input_shape  # noqa: E402
from vitforge.models.build import build_model, count_params  # noqa: E402
from vitforge.models.registry import list_models  # noqa: E402


def meta_for(model: torch.nn.Module, name: str) -> dict:
    size = int(model.pretrained_cfg["input_size"][-1])
    k = int(getattr(model, "num_classes", 10) or 10)
    return {"model_name": name, "model_kwargs": {}, "classes": [f"c{i}" for i in range(k)],
            "preprocess": {"img_size": size, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                           "crop_pct": 1.0}}


def one(name: str, fmt: str, model, meta: dict, folder: Path) -> dict:
    t0 = time.perf_counter()
    try:
        r = export_model(model, meta, fmt, folder / f"{name}.{fmt}")
    except VitforgeError as e:
        return {"ok": False, "error": str(e), "seconds": round(time.perf_counter() - t0, 1)}
    out = {"ok": r["ok"], "max_abs_diff": r["max_abs_diff"], "seconds": round(time.perf_counter() - t0, 1)}
    if fmt == "onnx":
        out.update(exporter=r["exporter"], fallback=r["fallback"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", help="registered names (default: all)")
    p.add_argument("--max-params", type=float, default=60e6, help="skip bigger models")
    p.add_argument("--name", default="export_paths_cpu")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list_models():
            torch.manual_seed(0)
            model = build_model(name, {}).eval()
            params = count_params(model)[0]
            if params > args.max_params:
                rows[name] = {"params": params, "skipped": f"over --max-params {args.max_params:.0f}"}
                print(f"{name}: skipped ({params:,} params)", flush=True)
                continue
            with torch.no_grad():
                for prm in model.parameters():
                    prm.add_(torch.randn_like(prm) * 0.02)
            meta = meta_for(model, name)
            row = {"params": params, "input_shape": list(input_shape(model, meta))}
            for fmt in ("onnx", "pt2"):
                row[fmt] = one(name, fmt, model, meta, Path(tmp))
                for f in Path(tmp).iterdir():  # keep /tmp small: big models write big files
                    f.unlink()
            rows[name] = row
            o = row["onnx"]
            print(f"{name}: onnx {o.get('exporter', 'FAILED')} {o.get('max_abs_diff', o.get('error'))} "
                  f"({o['seconds']} s); pt2 {'ok' if row['pt2']['ok'] else row['pt2'].get('error', 'FAILED')} "
                  f"({row['pt2']['seconds']} s)", flush=True)
    summary = {"models": rows, "tol": 1e-4,
               "dynamo": sorted(n for n, r in rows.items() if r.get("onnx", {}).get("exporter") == "dynamo"),
               "legacy_fallback": sorted(n for n, r in rows.items() if r.get("onnx", {}).get("exporter") == "legacy"),
               "no_onnx": sorted(n for n, r in rows.items() if "onnx" in r and not r["onnx"]["ok"]),
               "pt2_ok": sorted(n for n, r in rows.items() if r.get("pt2", {}).get("ok")),
               "skipped": sorted(n for n, r in rows.items() if "skipped" in r)}
    path = save_result(args.name, summary, command=" ".join(["python benchmarks/export_paths.py", *sys.argv[1:]]))
    print({k: v for k, v in summary.items() if k != "models"}, "\n->", path)


if __name__ == "__main__":
    main()
