"""`vitforge serve` (issue 16): served predictions equal `vitforge predict`, every bad input is a 4xx JSON error
after which the server still answers correctly, dynamic batching, the web page in headless Chromium, metrics, logs,
start-up failures and a graceful SIGTERM.

Servers run in-process (uvicorn in a thread, port 0 on 127.0.0.1), except the SIGTERM test, which starts
`python -m vitforge serve` as a subprocess. The browser test needs Debian's chromium + chromium-driver (CI installs
them, `.ci/system-deps.sh`); without them it is skipped and says so. With VITFORGE_SERVE_SCREENSHOT=path it also
saves the page as it looks on a phone (the README's picture).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits
from urllib3 import encode_multipart_formdata

from vitforge.commands.cli import main
from vitforge.config import load_config
from vitforge.eval.ensemble import predict_ensemble
from vitforge.eval.loading import load_for_inference
from vitforge.export import export_checkpoint
from vitforge.serve import DynamicBatcher, Limits, Predictor, ServeOptions, build_server
from vitforge.train.trainer import train

SRC = Path(__file__).resolve().parents[2] / "src"


# ---- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    return train(load_config(None, [
        "model.name=vit_demo", "data.train=digits", "data.val_split=0.2", "train.epochs=3", "schedule.warmup_epochs=0",
        "optim.lr=0.003", "data.aug.crop_padding=0", f"run.dir={root}", "run.name=r", "run.progress=none",
        "train.device=cpu", "train.threads=1"]))


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def samples() -> dict[str, bytes]:
    """Encoded test images: 8x8 digits (the model's own size), a 40x30 PNG (small-image path, resized) and a
    100x70 JPEG (large-image path: shorter side resize + centre crop)."""
    d = load_digits()
    grey = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    out = {f"digit{i}.png": png_bytes(Image.fromarray(grey[i * 7])) for i in range(4)}
    out["small.png"] = png_bytes(Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)))
    big = np.kron(grey[3], np.ones((9, 13)))[:70, :100].astype(np.uint8)
    out["large.jpg"] = png_bytes(Image.fromarray(np.stack([big] * 3, -1)), "JPEG")
    return out


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    return Predictor([str(run)], device="cpu")


@contextlib.contextmanager
def running(predictor: Predictor, **options):
    """An in-process server on 127.0.0.1:<free port>; yields its base URL, stops it (graceful) afterwards."""
    server, sock = build_server(predictor, ServeOptions(port=0, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def base(predictor) -> str:
    limits = Limits(max_upload_bytes=64 * 1024, max_images=3, max_pixels=1_000_000)
    with running(predictor, limits=limits, max_batch=8, max_wait_ms=5) as url:
        yield url


# ---- HTTP helpers ----------------------------------------------------------------------------------------------------
def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         chunks: list[bytes] | None = None) -> tuple[int, dict, bytes]:
    u = urlsplit(url)
    conn = HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        path = u.path + (f"?{u.query}" if u.query else "")
        if chunks is not None:
            conn.request(method, path, body=iter(chunks), headers=headers or {}, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def post_files(base: str, files: list[tuple[str, bytes]], query: str = "") -> tuple[int, dict]:
    body, ctype = encode_multipart_formdata([("files", (name, data, "application/octet-stream"))
                                             for name, data in files])
    status, _, data = call(f"{base}/v1/predict{query}", "POST", body, {"Content-Type": ctype})
    return status, json.loads(data)


def post_raw(base: str, data: bytes, ctype: str = "image/png", query: str = "") -> tuple[int, dict]:
    status, _, out = call(f"{base}/v1/predict{query}", "POST", data, {"Content-Type": ctype})
    return status, json.loads(out)


def predict_file(models: list, folder: Path, name: str, data: bytes, **kw) -> np.ndarray:
    """`vitforge predict`'s probabilities for one file alone in a folder."""
    one = folder / name.replace(".", "_")
    one.mkdir(parents=True, exist_ok=True)
    (one / name).write_bytes(data)
    return predict_ensemble(models, str(one), device="cpu", **kw)["probs"][0]


# ---- parity with `vitforge predict` ----------------------------------------------------------------------------------
def test_served_predictions_equal_vitforge_predict(run, samples, base, tmp_path):
    status, r = post_files(base, list(samples.items())[:3], "?probs=true&top_k=10")
    assert status == 200 and r["model"] == "vit_demo" and len(r["predictions"]) == 3
    served = {p["file"]: p for p in r["predictions"]}
    for name, data in samples.items():
        if name not in served:  # the rest as raw bodies, one image per request
            status, one = post_raw(base, data, "image/jpeg" if name.endswith(".jpg") else "image/png",
                                   "?probs=true&top_k=10")
            assert status == 200, one
            served[name] = one["predictions"][0]
        p = served[name]
        expected = predict_file([run], tmp_path, name, data)
        np.testing.assert_allclose(p["probs"], expected, atol=1e-5, err_msg=name)
        order = np.argsort(-np.asarray(p["probs"]), kind="stable")
        assert [c["index"] for c in p["top"]] == order.tolist()  # top-10 = every class, most probable first
        assert [c["name"] for c in p["top"]] == [str(i) for i in order]
        assert [c["probability"] for c in p["top"]] == [p["probs"][i] for i in order]
    assert (served["large.jpg"]["width"], served["large.jpg"]["height"]) == (100, 70)


def test_cli_predict_csv_equals_served_probabilities(run, samples, base, tmp_path, capsys):
    folder = tmp_path / "digits"
    folder.mkdir()
    digits = {k: v for k, v in samples.items() if k.startswith("digit")}
    for name, data in digits.items():
        (folder / name).write_bytes(data)
    assert main(["predict", str(run), "--images", str(folder), "--out", str(tmp_path / "p.csv"), "--device",
                 "cpu"]) == 0
    rows = {r["file"]: r for r in csv.DictReader((tmp_path / "p.csv").open())}
    status, r = post_files(base, list(digits.items())[:3], "?probs=true")
    assert status == 200
    for p in r["predictions"]:
        row = rows[p["file"]]
        np.testing.assert_allclose(p["probs"], [float(row[f"prob_{c}"]) for c in range(10)], atol=1e-5)
        assert p["top"][0]["name"] == row["pred"]


def test_ensemble_with_tta_equals_predict_ensemble(run, samples, tmp_path):
    models = [str(run), str(run / "checkpoints" / "last.pt")]
    p = Predictor(models, tta="flip", weights=[2, 1], device="cpu")
    assert [len(m.views) for m in p.models] == [2, 2]  # trained with flips: both views kept
    with running(p) as url:
        status, r = post_files(url, [("digit1.png", samples["digit1.png"]), ("large.jpg", samples["large.jpg"])],
                               "?probs=true")
        status_info, _, info = call(f"{url}/v1/model")
    assert status == 200 and r["model"] == "ensemble(vit_demo, vit_demo)" and r["tta"] == "flip"
    for pred in r["predictions"]:
        expected = predict_file(models, tmp_path, pred["file"], samples[pred["file"]], tta="flip", weights=[2, 1])
        np.testing.assert_allclose(pred["probs"], expected, atol=1e-5)
    info = json.loads(info)
    assert [m["weight"] for m in info["models"]] == pytest.approx([2 / 3, 1 / 3])
    assert info["models"][0]["tta_views"] == ["centre", "flip"] and info["metrics"] is None


def test_exported_folder_and_onnx_serve_the_same_predictions(run, samples, tmp_path, capsys):
    folder = tmp_path / "model"
    assert main(["export", str(run), "--format", "folder", "--out", str(folder), "--no-eval"]) == 0
    onnx = export_checkpoint(run, "onnx", tmp_path / "m.onnx")
    assert onnx["ok"] and onnx["exporter"] == "dynamo"
    files = [("digit0.png", samples["digit0.png"]), ("large.jpg", samples["large.jpg"])]
    results = {}
    for src in (run, folder, tmp_path / "m.onnx"):
        with running(Predictor([str(src)], device="cpu")) as url:
            status, r = post_files(url, files, "?probs=true")
            _, _, info = call(f"{url}/v1/model")
        assert status == 200
        results[src] = np.array([p["probs"] for p in r["predictions"]])
        info = json.loads(info)
        assert info["name"] == "vit_demo" and info["params"] == 136_650 and info["input_size"] == 8
    np.testing.assert_allclose(results[folder], results[run], atol=1e-6)  # same weights, same code
    np.testing.assert_allclose(results[tmp_path / "m.onnx"], results[run], atol=1e-5)  # onnxruntime


# ---- endpoints -------------------------------------------------------------------------------------------------------
def test_model_health_ready_openapi(run, base):
    status, _, body = call(f"{base}/v1/model")
    info = json.loads(body)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=False)
    assert status == 200 and info["name"] == "vit_demo" and info["classes"] == [str(i) for i in range(10)]
    assert info["input_size"] == 8 and info["params"] == 136_650 and info["num_classes"] == 10
    assert info["preprocess"] == best["preprocess"] and info["metrics"] == best["metrics"]
    assert info["limits"] == {"max_upload_bytes": 65536, "max_images": 3, "max_pixels": 1_000_000, "max_top_k": 100}
    assert info["batching"] == {"max_batch": 8, "max_wait_ms": 5}
    assert call(f"{base}/healthz")[:3:2] == (200, b'{"status":"ok"}')
    status, _, body = call(f"{base}/readyz")
    assert status == 200 and json.loads(body) == {"status": "ready", "model": "vit_demo"}
    schema = json.loads(call(f"{base}/openapi.json")[2])
    post = schema["paths"]["/v1/predict"]["post"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(post["requestBody"]["content"])
    assert {"200", "400", "413", "415", "422"} <= set(post["responses"])
    assert {"/v1/model", "/healthz", "/readyz"} <= set(schema["paths"])


def test_metrics_count_requests_and_images(base, samples):
    def scrape() -> str:
        return call(f"{base}/metrics")[2].decode()

    def value(text: str, series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    before = scrape()
    assert post_files(base, [("a.png", samples["digit0.png"]), ("b.png", samples["digit1.png"])])[0] == 200
    assert post_raw(base, b"", "image/png")[0] == 400
    after = scrape()
    assert value(after, "vitforge_images_total") - value(before, "vitforge_images_total") == 2
    ok = 'vitforge_requests_total{path="/v1/predict",status="200"}'
    bad = 'vitforge_requests_total{path="/v1/predict",status="400"}'
    assert value(after, ok) - value(before, ok) == 1 and value(after, bad) - value(before, bad) == 1
    assert value(after, "vitforge_batch_images_count") > value(before, "vitforge_batch_images_count")
    assert "# TYPE vitforge_request_seconds histogram" in after


def test_one_log_line_per_request(base, samples, caplog):
    with caplog.at_level(logging.INFO, logger="vitforge.serve.access"):
        post_files(base, [("a.png", samples["digit0.png"]), ("b.png", samples["digit1.png"])])
        post_raw(base, b"not an image")
        call(f"{base}/healthz")
        deadline = time.monotonic() + 10
        while len(caplog.records) < 3 and time.monotonic() < deadline:  # the line is written after the response
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "vitforge.serve.access"]
    assert len(lines) == 3, lines
    assert re.fullmatch(r"POST /v1/predict 200 2 images \d+\.\d ms", lines[0])
    assert re.fullmatch(r"POST /v1/predict 422 \d+\.\d ms", lines[1])
    assert re.fullmatch(r"GET /healthz 200 \d+\.\d ms", lines[2])


# ---- bad input -------------------------------------------------------------------------------------------------------
def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with almost no data: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                           b"")


def multipart(files: list[tuple[str, bytes]], fields: list[tuple[str, str]] = ()) -> tuple[bytes, dict]:
    body, ctype = encode_multipart_formdata([*fields, *[("files", (n, d, "image/png")) for n, d in files]])
    return body, {"Content-Type": ctype}


def bad_requests(samples: dict[str, bytes]) -> list[tuple[str, dict, int, str]]:
    """(what, request, expected status, expected error message (regex))."""
    good = samples["digit0.png"]
    jpg = samples["large.jpg"]
    noise = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)), "JPEG")
    third = len(noise) // 3
    corrupt = noise[:third] + bytes(range(256)) * 2 + noise[third + 512:]  # entropy-coded data overwritten
    return [
        ("not an image", dict(files=[("notes.txt", b"hello, this is text")]), 422,
         r"image 1 \('notes.txt'\): cannot decode image \(not in an image format PIL recognises\)"),
        ("truncated file", dict(files=[("half.jpg", jpg[: len(jpg) // 2])]), 422,
         r"image 1 \('half.jpg'\): cannot decode image \(image file is truncated .*\)"),
        ("corrupt JPEG", dict(raw=corrupt, ctype="image/jpeg"), 422,
         r"image 1: cannot decode image \(broken data stream when reading image file\)"),
        ("decompression bomb", dict(files=[("ok.png", good), ("bomb.png", bomb_png(10_000, 10_000))]), 422,
         r"image 2 \('bomb.png'\): 10000x10000 = 100,000,000 pixels declared, over the limit of 1,000,000 "
         r"\(decompression-bomb guard\)"),
        ("decompression bomb beyond PIL's own limit", dict(raw=bomb_png(100_000, 100_000)), 422,
         r"image 1: cannot decode image \(Image size \(10000000000 pixels\) exceeds limit .*\)"),
        ("oversized upload", dict(raw=b"\x89PNG" + bytes(70_000)), 413,
         r"request body over the limit of 65,536 bytes \(--max-upload-mb\); send fewer or smaller images"),
        ("oversized chunked upload", dict(chunks=[bytes(30_000)] * 3), 413,
         r"request body over the limit of 65,536 bytes .*"),
        ("empty body", dict(raw=b""), 400, r"empty request body: send images as multipart/form-data .*"),
        ("empty chunked body", dict(chunks=[]), 400, r"empty request body: no image bytes received"),
        ("empty file", dict(files=[("ok.png", good), ("empty.png", b"")]), 422, r"image 2 \('empty.png'\): empty file"),
        ("wrong content type", dict(raw=b'{"image": "cat.jpg"}', ctype="application/json"), 415,
         r"unsupported Content-Type 'application/json': send multipart/form-data, image/\* or "
         r"application/octet-stream"),
        ("too many images", dict(files=[(f"{i}.png", good) for i in range(4)]), 400,
         r"too many images in one request: the limit is 3 \(--max-images\)"),
        ("multipart without a file", dict(files=[], fields=[("text", "hello")]), 400,
         r"no file in the multipart body: send images as file fields, e\.g\. curl -F file=@cat\.jpg"),
        ("bad top_k", dict(files=[("a.png", good)], query="?top_k=0"), 422, r"top_k: Input should be greater .*"),
    ]


def send(base: str, req: dict) -> tuple[int, dict]:
    url = f"{base}/v1/predict{req.get('query', '')}"
    if "chunks" in req:
        status, _, out = call(url, "POST", headers={"Content-Type": "image/png"}, chunks=req["chunks"])
    elif "files" in req:
        body, headers = multipart(req["files"], req.get("fields", ()))
        status, _, out = call(url, "POST", body, headers)
    else:
        status, _, out = call(url, "POST", req["raw"], {"Content-Type": req.get("ctype", "image/png")})
    return status, json.loads(out)


def test_every_bad_input_is_a_4xx_json_error_and_the_next_request_works(base, samples):
    ok_status, ok = post_files(base, [("d.png", samples["digit2.png"])], "?probs=true")
    assert ok_status == 200
    for what, req, status, message in bad_requests(samples):
        got_status, got = send(base, req)
        assert got_status == status and got["status"] == status, (what, got)
        assert re.fullmatch(message, got["error"]), (what, got["error"])
        again_status, again = post_files(base, [("d.png", samples["digit2.png"])], "?probs=true")
        assert again_status == 200, (what, again)
        np.testing.assert_allclose(again["predictions"][0]["probs"], ok["predictions"][0]["probs"], atol=1e-6)
    status, _, body = call(f"{base}/v2/predict")
    assert status == 404 and json.loads(body) == {"error": "Not Found", "status": 404}
    status, _, body = call(f"{base}/v1/predict")
    assert status == 405 and json.loads(body)["status"] == 405


# ---- dynamic batching ------------------------------------------------------------------------------------------------
class Recorder:
    """A stand-in forward pass that records its batch sizes and can be held until released."""

    def __init__(self):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list) -> np.ndarray:
        self.gate.wait(30)
        self.batches.append(len(items))
        return np.asarray(items, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)


def test_batcher_gathers_concurrent_requests_and_returns_each_its_rows():
    async def scenario():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch=8, max_wait_ms=50)
        b.start()
        rec.gate.clear()  # the first request occupies the forward pass, the next ones queue up behind it
        first = asyncio.ensure_future(b.submit([0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(b.submit([10 * i + 1, 10 * i + 2])) for i in range(5)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        out = await asyncio.gather(first, *rest)
        await b.stop()
        return rec.batches, out

    batches, out = asyncio.run(scenario())
    assert batches == [1, 8, 2]  # whole requests, up to 8 images, in arrival order
    assert out[0][:, 0].tolist() == [0] and [o[:, 0].tolist() for o in out[1:]] == [
        [10 * i + 1, 10 * i + 2] for i in range(5)]


def test_batching_off_runs_one_request_per_forward_pass():
    async def scenario():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch=1, max_wait_ms=50)
        b.start()
        rec.gate.clear()
        futures = [asyncio.ensure_future(b.submit([i])) for i in range(4)]
        await asyncio.sleep(0.05)
        rec.gate.set()
        await asyncio.gather(*futures)
        await b.stop()
        return rec.batches

    assert asyncio.run(scenario()) == [1, 1, 1, 1]


def test_a_lone_request_never_waits_but_an_announced_one_is_waited_for():
    async def scenario():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch=8, max_wait_ms=60_000)  # a wait would time the test out
        b.start()
        await asyncio.wait_for(b.submit([1]), 10)  # nobody else on the way: runs at once
        b.expect()  # a second request is being received while the first is submitted
        b.expect()
        first = asyncio.ensure_future(b.submit([2]))
        b.arrived()
        await asyncio.sleep(0.05)
        assert not first.done()  # held open for the announced request
        second = asyncio.ensure_future(b.submit([3]))
        b.arrived()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        await b.stop()
        return rec.batches

    assert asyncio.run(scenario()) == [1, 2]


def test_concurrent_http_requests_are_batched_and_answered_correctly(predictor, samples, monkeypatch):
    names = [n for n in samples if n.startswith("digit")]
    forward, calls = predictor.forward, []

    def slow_first(items):  # the first concurrent request holds the model while the others queue up
        calls.append(len(items))
        if len(calls) == len(names) + 1:
            time.sleep(0.5)
        return forward(items)

    monkeypatch.setattr(predictor, "forward", slow_first)
    with running(predictor, max_batch=16, max_wait_ms=200) as url:
        alone = {n: post_raw(url, samples[n], query="?probs=true")[1]["predictions"][0]["probs"] for n in names}
        results: dict[int, tuple] = {}

        def client(i: int):
            n = names[i % len(names)]
            results[i] = (n, post_raw(url, samples[n], query="?probs=true"))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        text = call(f"{url}/metrics")[2].decode()
    assert len(results) == 16
    for n, (status, r) in results.values():
        assert status == 200
        np.testing.assert_allclose(r["predictions"][0]["probs"], alone[n], atol=1e-5)
    passes = float(re.search(r"^vitforge_batch_images_count (\S+)$", text, re.M).group(1))
    images = float(re.search(r"^vitforge_batch_images_sum (\S+)$", text, re.M).group(1))
    assert images == sum(calls) == 16 + len(names) and passes == len(calls)
    assert calls[: len(names)] == [1] * len(names) and max(calls) > 1  # requests one by one, then batched


# ---- start-up and shutdown -------------------------------------------------------------------------------------------
def test_startup_failures_are_one_line_and_exit_2(run, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vitforge: error: checkpoint not found: {tmp_path / 'nope'}"
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty")]) == 2
    assert "neither a run directory (checkpoints/) nor an exported model folder" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    assert main(["serve", str(tmp_path / "bad.onnx")]) == 2
    assert re.fullmatch(r"vitforge: error: .*bad\.onnx: not a readable ONNX model \(.*\)\n",
                        capsys.readouterr().err)
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        assert main(["serve", str(run), "--port", str(port), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vitforge: error: --port {port}: cannot listen on 127.0.0.1:{port} (") and \
            err.count("\n") == 1
    finally:
        taken.close()
    assert main(["serve", str(run), "--max-wait-ms", "-1", "--port", "0"]) == 2
    assert "--max-wait-ms: must be >= 0, got -1.0" in capsys.readouterr().err
    assert main(["serve", str(run), "--tta", "flip-flop"]) == 2
    assert "--tta: unknown view set 'flip-flop'" in capsys.readouterr().err


def test_sigterm_lets_the_request_in_flight_finish(run, samples):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "vitforge", "serve", str(run), "--port", "0", "--device", "cpu",
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        port = int(m.group(1))
        data = samples["digit3.png"]
        conn = socket.create_connection(("127.0.0.1", port), timeout=60)
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        conn.sendall(head + data[:10])  # the request is in flight: headers and part of the body
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still finishing the request
        conn.sendall(data[10:])
        response = conn.makefile("rb").read()
        conn.close()
        assert response.startswith(b"HTTP/1.1 200 "), response[:200]
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        assert body["predictions"][0]["width"] == 8
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert re.search(r"POST /v1/predict 200 1 image [\d.]+ ms", err) and "stopped by SIGTERM" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the web page in a real browser ----------------------------------------------------------------------------------
def browser_tools() -> tuple[str, str] | None:
    binary = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


def test_web_page_has_no_external_assets(base):
    status, headers, body = call(f"{base}/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page) and "@import" not in page
    assert 'name="viewport"' in page and 'type="file"' in page and "multiple" in page


def test_web_page_in_headless_chromium(base, samples, tmp_path):
    tools = browser_tools()
    if tools is None:
        pytest.skip("no chromium + chromedriver (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files = []
    for name in ("digit1.png", "digit2.png", "large.jpg"):
        (tmp_path / name).write_bytes(samples[name])
        files.append(str(tmp_path / name))
    expected = {n: post_raw(base, samples[n])[1]["predictions"][0]["top"] for n in ("digit1.png", "digit2.png",
                                                                                    "large.jpg")}
    opts = webdriver.ChromeOptions()
    opts.binary_location = tools[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    # A phone: 390 x 844 CSS pixels (desktop Chromium will not make a window that narrow), 2 device pixels each.
    opts.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844, "pixelRatio": 2}})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=tools[1]))
    try:
        driver.get(f"{base}/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == "vit_demo")
        assert "10 classes · 8 px input · 136,650 parameters · validation top-1" in driver.find_element(
            By.ID, "about").text
        driver.find_element(By.ID, "file").send_keys("\n".join(files))
        WebDriverWait(driver, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card[data-state=done]")) == 3)
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
            name = card.find_element(By.CSS_SELECTOR, ".file").text
            rows = card.find_elements(By.CSS_SELECTOR, ".row")
            assert len(rows) == 5
            shown = [(r.find_element(By.CSS_SELECTOR, ".name").text, r.find_element(By.CSS_SELECTOR, ".pct").text)
                     for r in rows]
            assert shown == [(c["name"], f"{100 * c['probability']:.1f}%") for c in expected[name]], name
            widths = [r.find_element(By.CSS_SELECTOR, ".fill").size["width"] for r in rows]
            assert widths == sorted(widths, reverse=True) and widths[0] > 0  # bars drawn to scale
            assert card.size["width"] <= 390  # fits a phone screen
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390  # no sideways scroll
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    with Image.open(shot) as im:
        assert im.size == (780, 1688) and np.asarray(im.convert("L")).std() > 10
        target = os.environ.get("VITFORGE_SERVE_SCREENSHOT")
        if target:  # the README picture: half size, 64-colour palette PNG, a few tens of kB
            im.convert("RGB").resize((390, 844), Image.LANCZOS).quantize(64).save(target, optimize=True)


# ---- the exported folder is a model repository that predict / eval / serve read --------------------------------------
def test_folder_export_is_a_model_repository(run, samples, tmp_path, capsys):
    out = tmp_path / "share"
    assert main(["export", str(run), "--format", "folder", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "parity (model rebuilt from share/ vs original" in said and "-> ok" in said
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert names == ["README.md", "config.json", "figures/confusion_normalized.png", "figures/per_class_accuracy.png",
                     "figures/training_curves.png", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "vitforge-export" and config["model_name"] == "vit_demo"
    assert config["id2label"]["3"] == "3" and config["label2id"]["9"] == 9 and config["num_labels"] == 10
    assert config["config"]["data"]["train"] == "digits" and config["params"] == 136_650
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    summary = json.loads((run / "summary.json").read_text())
    assert front["library_name"] == "vitforge" and front["pipeline_tag"] == "image-classification"
    acc = front["model-index"][0]["results"][0]["metrics"][0]
    assert acc["value"] == pytest.approx(summary["best_val_top1"], abs=0.01)  # the folder, on the same split
    for words in ("## Use it", "vitforge serve . --port 8000", "## Training recipe", "`optim.lr` | `0.003`",
                  "## Validation metrics", "### Per class", "| 9 | ", "![Training curves](figures/training_curves.png)",
                  "hf upload <user>/<repo> . .", "huggingface-cli upload"):
        assert words in card, words
    assert main(["eval", str(out), "--data", "digits", "--device", "cpu", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 1797 and m["model"] == "vit_demo" and m["checkpoint"] == str(out)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(samples["digit1.png"])
    assert main(["predict", str(out), "--images", str(images), "--out", str(tmp_path / "p.csv"), "--device",
                 "cpu"]) == 0
    row = next(csv.DictReader((tmp_path / "p.csv").open()))
    expected = predict_file([run], tmp_path / "one", "a.png", samples["digit1.png"])
    np.testing.assert_allclose([float(row[f"prob_{c}"]) for c in range(10)], expected, atol=1e-6)
    assert main(["export", str(run), "--format", "folder", "--out", str(out), "--no-eval"]) == 2
    assert f"--out {out}: exists and is not empty; pass --overwrite" in capsys.readouterr().err


def test_loading_a_folder_reads_only_json_and_safetensors(run, tmp_path, monkeypatch):
    out = tmp_path / "share"
    export_checkpoint(run, "folder", out, evaluate=False)

    def no_pickle(*a, **k):
        raise AssertionError("torch.load called while loading an exported folder")

    monkeypatch.setattr(torch, "load", no_pickle)
    model, meta = load_for_inference(out)
    assert meta["source"] == "folder" and meta["model_name"] == "vit_demo" and not model.training
    (out / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(Exception, match=r"config\.json: not a vitforge export config"):
        load_for_inference(out)
