"""`vitforge serve`: an HTTP API and a web page for a trained model (FastAPI + uvicorn, Prometheus metrics).

    from vitforge.serve import Predictor, ServeOptions, build_server, create_app, serve

    serve(["runs/demo"], options=ServeOptions(port=8000))      # blocks until SIGTERM / Ctrl-C

Library layout: `predictor` (models, preprocessing and TTA shared with `vitforge predict`), `batching` (dynamic
batching), `app` (routes, limits, errors, metrics, logging), `server` (socket, uvicorn, signals), `page.html` (the
web page at /).
"""

from vitforge.serve.app import Limits, create_app
from vitforge.serve.batching import DynamicBatcher
from vitforge.serve.predictor import Predictor
from vitforge.serve.server import ServeOptions, build_server, serve

__all__ = ["DynamicBatcher", "Limits", "Predictor", "ServeOptions", "build_server", "create_app", "serve"]
