"""Model registry: named constructors, never `getattr` lookups.

Each model family registers size-only factories with `@register_model`. `create_model` also understands the
`timm:<name>` and `tv:<name>` prefixes for library backbones (see `vitforge.models.backbones`).
This module lives inside `vitforge.models`, so importing it (or anything from `vitforge.models`) first runs
`vitforge/models/__init__.py`, which imports every family and so fills the registry (as in timm).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable

import torch.nn as nn

from vitforge.errors import ConfigError, first_line

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


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching a shell-style `pattern`."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS or (":" in name and name.split(":", 1)[0] in _PREFIXES)


def _library_name(name: str) -> str | None:
    """`tv:<name>` or `timm:<name>` when a library has a model called `name` (no network, no weights)."""
    import torchvision.models

    if name in torchvision.models.list_models(torchvision.models):
        return f"tv:{name}"
    try:
        import timm

        if timm.is_model(name):
            return f"timm:{name}"
    except ImportError:  # timm is optional for the names vitforge registers itself
        pass
    return None


def model_factory(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n or n in name.lower()][:8]
        hint = f" (similar: {', '.join(close)})" if close else " (see `vitforge models`)"
        library = _library_name(name)
        if library:
            hint = f"; did you mean {library!r}?"
        raise ConfigError(f"model.name: unknown model {name!r}{hint}")
    return _MODELS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown keyword arguments are a `ConfigError` naming the argument.

    Args:
        name: a registered name, or `<prefix>:<name>` for library backbones.
        **kwargs: constructor arguments (`num_classes`, `img_size`, `drop_path_rate`, ...).
    """
    if ":" in name:
        prefix, rest = name.split(":", 1)
        if prefix not in _PREFIXES:
            raise ConfigError(f"model.name: unknown prefix {prefix!r} in {name!r}; known: {sorted(_PREFIXES)}")
        model = _PREFIXES[prefix](rest, **kwargs)
        model.vitforge_name = name  # type: ignore[attr-defined]
        return model
    fn = model_factory(name)
    _check_kwargs(name, fn, kwargs)
    try:
        model = fn(**kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):  # a **kwargs factory forwarding an argument its class lacks
            arg = str(e).split("unexpected keyword argument")[-1].strip(" '\"")
            raise ConfigError(f"model {name!r} does not take argument {arg!r}") from None
        raise _build_error(name, kwargs, e) from e
    except (ValueError, IndexError, KeyError, AssertionError) as e:  # constructors validate their arguments
        raise _build_error(name, kwargs, e) from e
    model.vitforge_name = name  # type: ignore[attr-defined]  (the registered name; checkpoints store it)
    return model


def _build_error(name: str, kwargs: dict, e: Exception) -> ConfigError:
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "its defaults"
    return ConfigError(f"model {name!r} cannot be built with {args}: {first_line(e)}")


_SCALARS = (bool, int, float, str)


def _check_kwargs(name: str, fn: Callable, kwargs: dict) -> None:
    sig = inspect.signature(fn)
    params = sig.parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise ConfigError(
                f"model {name!r} does not take argument(s) {', '.join(unknown)}; it takes: {', '.join(params)}"
            )
    for key, value in kwargs.items():  # a text default wants text, a number or flag wants one (`img_size=abc`)
        default = params[key].default if key in params else None
        if not isinstance(default, _SCALARS) or value is None:
            continue
        if isinstance(default, str) != isinstance(value, str):
            kind = "text" if isinstance(default, str) else type(default).__name__
            raise ConfigError(f"model {name!r} argument {key}: expected {kind} (default {default!r}), got {value!r}")
