"""Data: sources, splits, decode cache, loaders, batch augmentation on the device."""

from vitforge.data.dataset import OpenedData, Split, open_data
from vitforge.data.preprocess import Preprocess, resolve_preprocess
from vitforge.data.sources import Source, open_source
from vitforge.data.streams import StreamOptions, build_eval_stream, build_train_stream

__all__ = ["OpenedData", "Preprocess", "Source", "Split", "StreamOptions", "build_eval_stream", "build_train_stream",
           "open_data", "open_source", "resolve_preprocess"]
