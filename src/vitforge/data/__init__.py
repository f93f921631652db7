"""Data: sources, splits, decode cache, loaders, batch augmentation on the device."""

from vitforge.data.pipeline import (
    OpenedData,
    Preprocess,
    Split,
    StreamOptions,
    build_eval_stream,
    build_train_stream,
    open_data,
    resolve_preprocess,
)
from vitforge.data.sources import Source, open_source

__all__ = ["OpenedData", "Preprocess", "Source", "Split", "StreamOptions", "build_eval_stream", "build_train_stream",
           "open_data", "open_source", "resolve_preprocess"]
