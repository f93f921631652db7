"""Load test of `vitforge serve` on 127.0.0.1: latency percentiles and images/s at several concurrencies, with and
without dynamic batching, next to the bare forward pass of the same model.

    python benchmarks/serve_load.py --model demo=runs/demo --model cifar_vit=runs/minivit \\
        [--requests 600] [--time-limit 60] [--concurrency 1 8 32] [--threads 2] [--name serve_load_cpu]

For every model, the server runs twice as a subprocess (`python -m vitforge serve MODEL --port 0 --device cpu`):
"batched" (the defaults: --max-batch 32 --max-wait-ms 10) and "batch1" (--max-batch 1: one request per forward
pass). Each concurrency level then gets 20 warm-up requests and a measured run of at most --requests requests and
at most --time-limit seconds (whichever ends first): C client threads, each with one keep-alive connection
(stdlib http.client), each request a multipart/form-data upload of one encoded image (the same file every time), as
`curl -F file=@x.png` sends it. A request counts as failed unless it returns 200 with one prediction.

The bare forward pass is timed in this process with the same thread count: the model called on one preprocessed
image (batch 1, no HTTP, no decoding). Server overhead = p50 latency of a served request at concurrency 1 minus the
bare forward p50. Bars (issue 16, 2 CPU cores): no failed request; at concurrency 32, dynamic batching >= 3x the
images/s of batch-1 serving for the CIFAR-sized ViT; overhead <= 5 ms p50. Results: benchmarks/results/<name>.json.
Other processes on the machine distort every number: the 1-minute load average before and after each cell is stored.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from urllib3 import encode_multipart_formdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import save_result  # noqa: E402

from vitforge.serve import Predictor  # noqa: E402

MODES = {"batched": ["--max-batch", "32", "--max-wait-ms", "10"], "batch1": ["--max-batch", "1"]}
WARMUP = 20


def sample_image(predictor: Predictor) -> bytes:
    """A deterministic PNG at the model's input size (what a client of a CIFAR- or digits-sized model sends)."""
    size = predictor.models[0].inputs.pre.img_size
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bare_forward_ms(predictor: Predictor, image: bytes, reps: int) -> dict:
    """p50/p95 of the model alone on one preprocessed image (batch 1), in milliseconds."""
    model = predictor.models[0].model
    x = predictor.prepare(Image.open(io.BytesIO(image)).convert("RGB"))[0][None]
    times = []
    with torch.no_grad():
        for i in range(reps + 30):
            t0 = time.perf_counter()
            model(x)
            if i >= 30:
                times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3),
            "reps": reps}


class Server:
    """`vitforge serve` in a subprocess, stopped with SIGTERM."""

    def __init__(self, model: str, mode: str, threads: int, start_timeout: float, log: Path):
        cmd = [sys.executable, "-m", "vitforge", "serve", model, "--port", "0", "--device", "cpu", "--threads",
               str(threads), *MODES[mode]]
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = _readline(self.proc, start_timeout)
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", line or "")
        if not m:
            self.stop()
            raise SystemExit(f"server did not start within {start_timeout:.0f} s: {line!r} (log: {log})")
        self.port = int(m.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _readline(proc: subprocess.Popen, timeout: float) -> str | None:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def scrape(port: int) -> dict[str, float]:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(vitforge_batch_images_(?:sum|count)) (\S+)$",
                                                               text, re.M)}


def load(port: int, body: bytes, ctype: str, concurrency: int, requests: int, time_limit: float) -> dict:
    """Send up to `requests` requests from `concurrency` threads for at most `time_limit` seconds."""
    lock = threading.Lock()
    issued = [0]
    records: list[tuple[float, float, bool, float]] = []  # (start, end, ok, server ms)
    deadline = time.perf_counter() + time_limit
    headers = {"Content-Type": ctype}

    def client():
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while True:
            with lock:
                if issued[0] >= requests or time.perf_counter() >= deadline:
                    break
                issued[0] += 1
            t0 = time.perf_counter()
            ok, server_ms = False, float("nan")
            try:
                conn.request("POST", "/v1/predict", body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.status == 200:
                    out = json.loads(data)
                    ok, server_ms = len(out["predictions"]) == 1, out["milliseconds"]
            except (OSError, ValueError):
                conn.close()
                conn = HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append((t0, time.perf_counter(), ok, server_ms))
        conn.close()
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    good = [r for r in records if r[2]]
    lat = [(e - s) * 1000 for s, e, ok, _ in good]
    wall = max(r[1] for r in records) - min(r[0] for r in records)
    pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat else (lambda q: None)
    return {"requests": len(records), "failed": len(records) - len(good), "wall_s": round(wall, 3),
            "images_per_s": round(len(good) / wall, 1) if wall > 0 else None, "p50_ms": pct(50), "p95_ms": pct(95),
            "p99_ms": pct(99), "server_p50_ms": round(statistics.median([r[3] for r in good]), 3) if good else None}


def bench_model(name: str, path: str, args) -> dict:
    torch.set_num_threads(args.threads)
    predictor = Predictor([path], device="cpu")
    image = sample_image(predictor)
    body, ctype = encode_multipart_formdata([("file", ("image.png", image, "image/png"))])
    info = predictor.info()
    result = {"model": info["name"], "path": path, "params": info["params"], "input_size": info["input_size"],
              "image_bytes": len(image), "bare_forward": bare_forward_ms(predictor, image, args.forward_reps),
              "modes": {}}
    print(f"{name}: {info['name']} ({info['params']:,} params, {info['input_size']} px), bare forward "
          f"p50 {result['bare_forward']['p50_ms']:.2f} ms", flush=True)
    del predictor
    for mode in MODES:
        log = Path(args.log_dir) / f"{args.name}_{name}_{mode}.log"
        server = Server(path, mode, args.threads, args.start_timeout, log)
        cells = {}
        try:
            for c in args.concurrency:
                load(server.port, body, ctype, c, WARMUP, args.time_limit)
                before, load_before = scrape(server.port), os.getloadavg()[0]
                cell = load(server.port, body, ctype, c, args.requests, args.time_limit)
                after = scrape(server.port)
                passes = after["vitforge_batch_images_count"] - before["vitforge_batch_images_count"]
                images = after["vitforge_batch_images_sum"] - before["vitforge_batch_images_sum"]
                cell.update(mean_batch=round(images / passes, 2) if passes else None,
                            loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)])
                cells[str(c)] = cell
                print(f"  {mode:7s} c={c:<3d} {cell['images_per_s']:>8} img/s  p50 {cell['p50_ms']} p95 "
                      f"{cell['p95_ms']} p99 {cell['p99_ms']} ms  batch {cell['mean_batch']}  failed {cell['failed']}"
                      f"  load {cell['loadavg_1min']}", flush=True)
        finally:
            code = server.stop()
        result["modes"][mode] = {"server_args": MODES[mode], "exit_code_after_sigterm": code, "concurrency": cells}
    fwd = result["bare_forward"]["p50_ms"]
    result["overhead_p50_ms"] = {m: round(r["concurrency"]["1"]["p50_ms"] - fwd, 3)
                                 for m, r in result["modes"].items() if "1" in r["concurrency"]}
    top = str(max(args.concurrency))
    b, s = result["modes"]["batched"]["concurrency"], result["modes"]["batch1"]["concurrency"]
    result["batching_speedup_at_max_concurrency"] = round(b[top]["images_per_s"] / s[top]["images_per_s"], 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a model to serve (run directory, checkpoint, exported folder, .onnx); repeat for several")
    p.add_argument("--cifar-model", default="cifar_vit", help="NAME of the CIFAR-sized ViT (the 3x batching bar)")
    p.add_argument("--requests", type=int, default=600, help="requests per measured cell (at most)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per cell (at most)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=2, help="server intra-op threads (and the bare forward's)")
    p.add_argument("--forward-reps", type=int, default=300)
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", default="/tmp", help="where the servers' request logs go")
    p.add_argument("--name", default="serve_load_cpu", help="results file stem")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. how the models were trained)")
    args = p.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    results = {name: bench_model(name, path, args) for name, path in models.items()}
    failed = sum(c["failed"] for r in results.values() for m in r["modes"].values()
                 for c in m["concurrency"].values())
    bars = {"zero_failed_requests": failed == 0,
            "overhead_p50_le_5ms": {n: r["overhead_p50_ms"]["batched"] <= 5.0 for n, r in results.items()}}
    if args.cifar_model in results:
        bars["cifar_batching_ge_3x_at_max_concurrency"] = results[args.cifar_model][
            "batching_speedup_at_max_concurrency"] >= 3.0
    summary = {"models": results, "failed_requests": failed, "bars": bars, "settings": {
        "requests": args.requests, "time_limit_s": args.time_limit, "concurrency": args.concurrency,
        "server_threads": args.threads, "warmup_requests": WARMUP, "body": "multipart/form-data, one PNG"},
        "note": args.note}
    cmd = " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]])
    path = save_result(args.name, summary, command=cmd)
    print(json.dumps({"bars": bars, "speedup": {n: r["batching_speedup_at_max_concurrency"] for n, r in
                                                results.items()},
                      "overhead_ms": {n: r["overhead_p50_ms"] for n, r in results.items()}}, indent=2), "\n->", path)


if __name__ == "__main__":
    main()
