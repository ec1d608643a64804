"""Adapter registry: one adapter per model family, chosen by `config.model_type`."""
from __future__ import annotations

from typing import Any

from .base import Adapter, Domain, ExampleShape

_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise ValueError(f"model_type {model_type!r} already has an adapter")
        _ADAPTERS[model_type] = cls
    return cls


def adapter_for(config: Any) -> Adapter:
    try:
        return _ADAPTERS[config.model_type](config)
    except KeyError:
        raise KeyError(f"no adapter for model_type {config.model_type!r}; "
                       f"supported: {', '.join(sorted(_ADAPTERS))}") from None


def families() -> list[str]:
    return sorted({cls.family for cls in _ADAPTERS.values()})


from . import bert, llama, llava, llava_next, vision  # noqa: E402,F401  (registration, explicit list)

__all__ = ["Adapter", "Domain", "ExampleShape", "adapter_for", "families", "register_adapter"]
