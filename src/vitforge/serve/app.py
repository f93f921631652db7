"""The HTTP application (FastAPI on uvicorn): routes, input limits, errors, metrics, one log line per request.

    GET  /              web page: drop or choose images, top-5 classes as bars (no external assets)
    POST /v1/predict    images as multipart/form-data (any field names, several files) or one raw image body
                        (Content-Type image/* or application/octet-stream) -> top-k classes per image
    GET  /v1/model      model name(s), classes, input size, preprocessing, validation metrics, parameters, limits
    GET  /healthz       liveness: 200 while the process serves
    GET  /readyz        readiness: 200 once the model is loaded and the batcher runs; 503 while shutting down
    GET  /metrics       Prometheus text format (prometheus_client)
    GET  /openapi.json  the OpenAPI schema FastAPI builds (/docs renders it with Swagger UI, which loads from a CDN)

Every client error is a 4xx JSON body {"error": "<what is wrong, naming the image or option>", "status": code}: an
empty body (400), a multipart body with no file (400), too many images (400), a body over the size limit (413, read
no further than the limit), an unsupported Content-Type (415), a file that is not a decodable image, truncated or
corrupt, or that declares more pixels than the limit (422). The server keeps serving after any of them.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitforge.data.images import ImageError, open_image
from vitforge.serve.batching import DynamicBatcher
from vitforge.serve.predictor import Predictor
from vitforge.version import __version__

access_log = logging.getLogger("vitforge.serve.access")
RAW_TYPES = ("image/", "application/octet-stream")
ROUTES = ("/", "/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


@dataclass
class Limits:
    """What one request may hold."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_images: int = 32
    max_pixels: int = 50_000_000
    max_top_k: int = 100


class ClientError(Exception):
    """A bad request: becomes {"error": message, "status": status}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _BodyTooLarge(Exception):
    pass


# ---- response schemas (OpenAPI) -------------------------------------------------------------------------------------
class ClassScore(BaseModel):
    name: str = Field(description="class name")
    index: int = Field(description="class index in the model's class list")
    probability: float


class ImagePrediction(BaseModel):
    index: int = Field(description="position of the image in the request")
    file: str | None = Field(description="file name of a multipart part (null for a raw body)")
    width: int
    height: int
    top: list[ClassScore] = Field(description="top-k classes, most probable first")
    probs: list[float] | None = Field(None, description="every class probability (with ?probs=true)")


class PredictResponse(BaseModel):
    model: str
    tta: str
    predictions: list[ImagePrediction]
    milliseconds: float = Field(description="time the server spent on the request")


class ErrorResponse(BaseModel):
    error: str
    status: int


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
ERRORS = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 503)}


class Metrics:
    """Prometheus series of one app (own registry, so several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vitforge_requests", "HTTP requests by route and status", ["path", "status"],
                                registry=r)
        self.latency = Histogram("vitforge_request_seconds", "request time in the server", ["path"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.images = Counter("vitforge_images", "images classified", registry=r)
        self.rejected = Counter("vitforge_rejected_requests", "client errors by reason", ["reason"], registry=r)
        self.batch = Histogram("vitforge_batch_images", "images per forward pass", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.forward = Histogram("vitforge_forward_seconds", "forward pass time", registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.in_flight = Gauge("vitforge_requests_in_flight", "requests being handled", registry=r)

    def on_batch(self, images: int, seconds: float) -> None:
        self.batch.observe(images)
        self.forward.observe(seconds)


class AccessLog:
    """Pure ASGI middleware: one log line per HTTP request (method, path, status, images, milliseconds) and the
    request counters. (Pure ASGI rather than `@app.middleware`: it adds no task or stream copy per request.)"""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            ms = (time.perf_counter() - t0) * 1000
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(ms / 1000)
            images = scope.get("vitforge.images")
            access_log.info("%s %s %d %s%.1f ms", scope["method"], scope["path"], status[0],
                            f"{images} image{'s' if images != 1 else ''} " if images is not None else "", ms)


def _limited(receive, limit: int):
    """`receive` that raises `_BodyTooLarge` once more than `limit` body bytes have come in."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return wrapped




async def read_uploads(request: Request, limits: Limits) -> list[tuple[str | None, bytes]]:
    """(file name or None, bytes) of every image in the request; `ClientError` for a bad body."""
    ctype = request.headers.get("content-type", "")
    length = request.headers.get("content-length")
    too_big = ClientError(413, f"request body over the limit of {limits.max_upload_bytes:,} bytes "
                               f"(--max-upload-mb); send fewer or smaller images")
    if length is not None and length.isdigit() and int(length) > limits.max_upload_bytes:
        raise too_big
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length == "0" or (length is None and not chunked):
        raise ClientError(400, "empty request body: send images as multipart/form-data (e.g. curl -F "
                               "file=@cat.jpg) or one image as the raw body with Content-Type image/*")
    body = Request(request.scope, _limited(request.receive, limits.max_upload_bytes))
    kind = ctype.split(";")[0].strip().lower()
    try:
        if kind == "multipart/form-data":
            try:
                form = await body.form(max_files=limits.max_images, max_fields=limits.max_images,
                                       max_part_size=limits.max_upload_bytes)
            except StarletteHTTPException as e:  # starlette turns python-multipart's errors into these
                if str(e.detail).startswith("Too many files"):
                    raise ClientError(400, f"too many images in one request: the limit is {limits.max_images} "
                                           "(--max-images)") from None
                raise ClientError(400, f"malformed multipart body: {e.detail}") from None
            uploads = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not uploads:
                raise ClientError(400, "no file in the multipart body: send images as file fields, e.g. "
                                       "curl -F file=@cat.jpg")
            out = [(u.filename, await u.read()) for u in uploads]
            await form.close()
        elif kind.startswith(RAW_TYPES):
            out = [(None, await body.body())]
        else:
            raise ClientError(415, f"unsupported Content-Type {kind or '(none)'!r}: send multipart/form-data, "
                                   "image/* or application/octet-stream")
    except _BodyTooLarge:
        raise too_big from None
    if out[0][0] is None and not out[0][1]:  # a raw body sent chunked, with no bytes
        raise ClientError(400, "empty request body: no image bytes received")
    return out


def decode(uploads: list[tuple[str | None, bytes]], predictor: Predictor, limits: Limits):
    """Decode and preprocess every upload (in a worker thread); ClientError 422 naming the first bad image."""
    items, sizes = [], []
    for i, (name, data) in enumerate(uploads):
        label = f"image {i + 1}" + (f" ({name!r})" if name else "")
        if not data:
            raise ClientError(422, f"{label}: empty file")
        try:
            img = open_image(data, label, max_pixels=limits.max_pixels)
        except ImageError as e:
            raise ClientError(422, str(e)) from None
        sizes.append(img.size)
        items.append(predictor.prepare(img))
    return items, sizes


def create_app(predictor: Predictor, *, max_batch: int = 32, max_wait_ms: float = 10.0,
               limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `predictor` (the batcher starts and stops with the app's lifespan)."""
    limits = limits or Limits()
    metrics = Metrics()
    batcher = DynamicBatcher(predictor.forward, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             on_batch=metrics.on_batch)
    state = {"stopping": False}
    page = (files("vitforge.serve") / "page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            state["stopping"] = True
            await batcher.stop()

    app = FastAPI(title="vitforge", version=__version__, lifespan=lifespan,
                  description="Image classification with a vitforge model. POST images to /v1/predict.")
    app.state.batcher, app.state.predictor, app.state.metrics, app.state.serving = batcher, predictor, metrics, state
    info = {**predictor.info(), "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms},
            "limits": asdict(limits), "vitforge": __version__}

    def error(status: int, message: str, reason: str) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        return JSONResponse({"error": message, "status": status}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), str(exc.status_code))

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid value')}", "parameter")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logging.getLogger("vitforge.serve").exception("request failed")
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/healthz", summary="liveness")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="readiness: model loaded and batching running", responses={503: {}})
    async def readyz():
        if state["stopping"] or not batcher.running:
            return JSONResponse({"status": "shutting down" if state["stopping"] else "starting"}, status_code=503)
        return {"status": "ready", "model": info["name"]}

    @app.get("/v1/model", summary="the served model")
    async def model_info() -> dict:
        return info

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY,
              summary="classify one or several images")
    async def predict(request: Request,
                      top_k: int = Query(5, ge=1, le=limits.max_top_k, description="classes per image"),
                      probs: bool = Query(False, description="also return every class probability")):
        t0 = time.perf_counter()
        if state["stopping"]:
            return error(503, "the server is shutting down", "stopping")
        batcher.expect()
        try:
            uploads = await read_uploads(request, limits)
            if len(uploads) > limits.max_images:
                raise ClientError(400, f"too many images in one request: {len(uploads)}, the limit is "
                                       f"{limits.max_images} (--max-images)")
            items, sizes = await run_in_threadpool(decode, uploads, predictor, limits)
        except ClientError as e:
            return error(e.status, e.message, str(e.status))
        finally:
            batcher.arrived()
        request.scope["vitforge.images"] = len(items)
        out = await batcher.submit(items)
        metrics.images.inc(len(items))
        k = min(top_k, len(predictor.classes))
        preds = []
        for i, ((name, _), (w, h), p) in enumerate(zip(uploads, sizes, out, strict=True)):
            order = p.argsort()[::-1][:k]
            preds.append({"index": i, "file": name, "width": w, "height": h,
                          "top": [{"name": predictor.classes[c], "index": int(c), "probability": float(p[c])}
                                  for c in order],
                          "probs": [float(v) for v in p] if probs else None})
        return {"model": info["name"], "tta": predictor.tta, "predictions": preds,
                "milliseconds": round((time.perf_counter() - t0) * 1000, 3)}

    app.add_middleware(AccessLog, metrics=metrics)
    return app
