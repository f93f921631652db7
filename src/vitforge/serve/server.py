"""`vitforge serve`: load the model(s), bind the socket, run uvicorn until SIGTERM or Ctrl-C.

Start-up problems (an unreadable model, a port in use, a bad option) raise `VitforgeError` before anything is served,
so the command prints one line and exits with status 2. SIGTERM and the first Ctrl-C stop gracefully: /readyz turns
503, the listening socket closes, requests in flight finish (up to `graceful_timeout` seconds), then the batcher
drains and the process exits with status 0; a second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field

import torch
import uvicorn
from PIL import Image

from vitforge.errors import CheckpointError, VitforgeError, first_line
from vitforge.serve.app import Limits, create_app
from vitforge.serve.predictor import Predictor

log = logging.getLogger("vitforge.serve")


@dataclass
class ServeOptions:
    """Where to listen and how to batch; see `vitforge serve --help`."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    max_wait_ms: float = 10.0
    limits: Limits = field(default_factory=Limits)
    graceful_timeout: float = 30.0

    def check(self) -> None:
        """VitforgeError naming the first option out of range."""
        lim = self.limits
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--max-wait-ms", self.max_wait_ms, 0),
                                 ("--max-upload-mb", lim.max_upload_bytes, 1), ("--max-images", lim.max_images, 1),
                                 ("--max-pixels", lim.max_pixels, 1), ("--graceful-timeout", self.graceful_timeout, 0)):
            if not value >= low:
                raise VitforgeError(f"{name}: must be >= {low}, got {value}")
        if not 0 <= self.port <= 65535:
            raise VitforgeError(f"--port: must be 0-65535, got {self.port}")


class Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT marking the app as stopping (/readyz 503) and no re-raise of the signal
    after the graceful shutdown (the process exits normally)."""

    def __init__(self, config: uvicorn.Config, serving: dict, announce=None):
        super().__init__(config)
        self.serving, self.announce = serving, announce
        self.stop_signal: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.announce is not None:  # signal handlers are in place: safe to tell the world
            self.announce()

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # tests run servers in threads
            yield
            return
        old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame) -> None:
        self.stop_signal = sig
        self.serving["stopping"] = True
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 = any free port); VitforgeError naming the option otherwise."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise VitforgeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    # proto=IPPROTO_TCP, not 0 (socket.create_server's): asyncio turns Nagle's algorithm off (TCP_NODELAY) only on
    # connections whose socket says TCP (asyncio/base_events.py `_set_nodelay`); with Nagle on, every response
    # written as headers + body waits for the client's delayed ACK, ~40 ms per request on Linux.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise VitforgeError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def warm_up(predictor: Predictor) -> None:
    """One forward pass on a grey image per model: the first request is not slow, and a model that cannot run
    fails at start-up (one line) instead of on every request."""
    try:
        size = max(m.inputs.pre.img_size for m in predictor.models)
        predictor.forward([predictor.prepare(Image.new("RGB", (size, size), (128, 128, 128)))])
    except Exception as e:  # any failure of the model's own code
        raise CheckpointError(f"{predictor.models[0].checkpoint}: the model fails on a test image "
                              f"({type(e).__name__}: {first_line(e)})") from None


def build_server(predictor: Predictor, options: ServeOptions, announce=None) -> tuple[Server, socket.socket]:
    """The uvicorn server for `predictor` and its bound socket (start it with `server.run(sockets=[sock])`);
    `announce()` is called once it accepts requests."""
    options.check()
    predictor.max_batch = options.max_batch
    app = create_app(predictor, max_batch=options.max_batch, max_wait_ms=options.max_wait_ms, limits=options.limits)
    sock = bind(options.host, options.port)
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                            timeout_graceful_shutdown=options.graceful_timeout, backlog=2048)
    return Server(config, app.state.serving, announce), sock


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    served = logging.getLogger("vitforge.serve")
    served.handlers[:] = [handler]
    served.setLevel(logging.INFO)
    served.propagate = False


def serve(sources: list[str], *, tta: str = "none", weights=None, device: str = "auto", threads: int | None = None,
          options: ServeOptions | None = None) -> int:
    """Serve the model(s) until stopped; returns the exit status (0 after a graceful shutdown).

    Args:
        sources: run directories, checkpoints, exported folders, .safetensors or .onnx files (several = ensemble).
        tta, weights, device: as for `vitforge predict`.
        threads: intra-op threads of the forward pass (default: PyTorch's).
        options: host, port, batching and limits.

    Raises:
        VitforgeError: the model cannot be loaded or run, the port is taken, or an option is out of range.
    """
    options = options or ServeOptions()
    options.check()  # before the model loads
    if threads is not None:
        if threads < 1:
            raise VitforgeError(f"--threads: must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    predictor = Predictor(list(sources), tta=tta, weights=weights, device=device, max_batch=options.max_batch)
    warm_up(predictor)
    batching = (f"dynamic batching up to {options.max_batch} images, {options.max_wait_ms:g} ms"
                if options.max_batch > 1 else "no batching")
    address = []

    def announce() -> None:
        host, port = address[0]
        print(f"serving {predictor.info()['name']} ({len(predictor.classes)} classes) on http://"
              f"{host if ':' not in host else f'[{host}]'}:{port} ({batching}; Ctrl-C or SIGTERM to stop)", flush=True)

    server, sock = build_server(predictor, options, announce)
    address.append(sock.getsockname()[:2])
    if options.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"vitforge: warning: listening on {options.host}, reachable from other machines", file=sys.stderr)
    _log_to_stderr()
    server.run(sockets=[sock])
    if server.stop_signal is not None:
        log.info("stopped by %s", signal.Signals(server.stop_signal).name)
    return 0
