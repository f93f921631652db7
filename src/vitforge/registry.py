"""Model registry: named constructors, never `getattr` lookups.

Each model family registers size-only factories with `@register_model`. `create_model` also understands the
`timm:<name>` and `tv:<name>` prefixes for library backbones (see `vitforge.models.backbones`).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import torch.nn as nn

from vitforge.errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Prefix -> factory(name_after_prefix, **kwargs). Filled by modules that wrap other libraries.
_PREFIXES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn` under its function name. Duplicate names are an error (not a warning)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered (by {_MODELS[name].__module__})")
    _MODELS[name] = fn
    return fn


def register_prefix(prefix: str, factory: Callable[..., nn.Module]) -> None:
    """Route `prefix:<name>` to `factory(name, **kwargs)` (e.g. `timm:convnext_base`)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = factory


def _ensure_loaded() -> None:
    import vitforge.models  # noqa: F401  (registers every family)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style `pattern`."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    _ensure_loaded()
    return name in _MODELS or (":" in name and name.split(":", 1)[0] in _PREFIXES)


def model_factory(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    if name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n or n in name.lower()][:8]
        hint = f" (similar: {', '.join(close)})" if close else " (see `vitforge models`)"
        raise ConfigError(f"model.name: unknown model {name!r}{hint}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown keyword arguments are a `ConfigError` naming the argument.

    Args:
        name: a registered name, or `<prefix>:<name>` for library backbones.
        **kwargs: constructor arguments (`num_classes`, `img_size`, `drop_path_rate`, ...).
    """
    _ensure_loaded()
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix not in _PREFIXES:
            raise ConfigError(f"model.name: unknown prefix {prefix!r} in {name!r}; known: {sorted(_PREFIXES)}")
        return _PREFIXES[prefix](rest, **kwargs)
    fn = model_factory(name)
    _check_kwargs(name, fn, kwargs)
    try:
        model = fn(**kwargs)
    except TypeError as e:  # a **kwargs factory forwarding an argument its class does not take
        if "unexpected keyword argument" not in str(e):
            raise
        arg = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
        raise ConfigError(f"model {name!r} does not take argument {arg!r}") from None
    model.vitforge_name = name  # type: ignore[attr-defined]
    return model


def _check_kwargs(name: str, fn: Callable, kwargs: dict) -> None:
    sig = inspect.signature(fn)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    unknown = sorted(set(kwargs) - set(sig.parameters))
    if unknown:
        raise ConfigError(
            f"model {name!r} does not take argument(s) {', '.join(unknown)}; it takes: {', '.join(sig.parameters)}"
        )
