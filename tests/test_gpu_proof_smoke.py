"""`benchmarks/gpu_proof.sh --smoke` runs the whole GPU proof on the CPU with tiny budgets, so the script a GPU lease
depends on cannot rot: every expected result JSON must appear, well-formed, with the provenance and the measurements
each benchmark promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_cifar_like_parquet

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ("vs_timm_cpu_smoke", "train_throughput_cpu_smoke", "aug_pipeline_cpu_smoke", "scan_cpu_smoke")


@pytest.mark.slow
def test_gpu_proof_smoke_writes_every_result(tmp_path):
    data = write_cifar_like_parquet(tmp_path / "tiny.parquet")
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_proof.sh"), "--smoke", "--out-dir", str(out),
                           "--data", str(data)], capture_output=True, text=True, env=env, timeout=600)
    log = (out / "gpu_proof.log").read_text() if (out / "gpu_proof.log").exists() else proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    records = {}
    for name in EXPECTED:
        rec = json.loads((out / f"{name}.json").read_text())
        assert rec["name"] == name
        assert {"command", "date", "git_commit", "hardware", "results"} <= rec.keys()
        assert rec["hardware"]["torch"] and rec["hardware"]["cpu_count"] >= 1
        records[name] = rec["results"]

    vs = records["vs_timm_cpu_smoke"]
    assert set(vs["runs"]) == {"vitforge/8", "timm/8"}
    for key, run in vs["runs"].items():
        assert run["points"], key  # at least the final evaluation
        assert all(0.0 <= p["val_top1"] <= 100.0 for p in run["points"])
        assert [p["seconds"] for p in run["points"]] == sorted(p["seconds"] for p in run["points"])
        assert run["wall_s"] > 0 and run["budget_used"] == pytest.approx(run["wall_s"] / 8, abs=1e-3)
    assert vs["runs"]["timm/8"]["params"] > 600_000  # timm's ViT of the Mini-ViT's dims
    assert set(vs["analysis"]) == {"time_to_accuracy", "equal_budget"}  # its arithmetic: tests/test_vs_timm.py
    assert (out / "vs_timm_cpu_smoke.png").stat().st_size > 0

    pairs = records["train_throughput_cpu_smoke"]["runs"]
    assert set(pairs) == {"minivit/off", "deit_kd/off", "vit256/off"}
    assert all(pairs[k]["ours"]["img_per_s"] > 0 and pairs[k]["timm"]["img_per_s"] > 0 for k in pairs)
    assert records["aug_pipeline_cpu_smoke"]["runs"][0]["img_per_s"] > 0
    assert records["scan_cpu_smoke"]["rows"]
