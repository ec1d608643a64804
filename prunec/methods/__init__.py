"""Method registry: a method is a pure function over tensors, registered by name.

A *score* method maps signals to one score per token (higher = keep); the compiler keeps the top-k
candidates. A *select* method returns the kept candidate indices itself (e.g. DivPrune's greedy
max-min). Methods never see a model or a graph: the compiler hands them tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# attention_qk: the site layer's own post-RoPE q/k (read from its sdpa call);
# next_layer_qk: the next layer's q (last row) and k recomputed on the site's hidden states;
# hidden: the residual stream at the site.
SIGNALS = ("attention_qk", "next_layer_qk", "hidden")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    action: str                      # "prune" | "merge"
    kind: str                        # "score" | "select"
    signals: tuple[str, ...]         # what the compiler must tap at the site, from SIGNALS
    fn: Callable[..., Any]
    params_schema: dict[str, Any]    # JSON Schema of the `params:` mapping
    default_positions: str           # "keep_original" | "renumber"
    domains: tuple[str, ...] = ("llm", "vision")
    layer_sites_only: bool = False   # needs a layer's attention, so only `<domain>.layers[i]` sites
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_METHODS: dict[str, MethodInfo] = {}


def register_method(info: MethodInfo) -> MethodInfo:
    if info.name in _METHODS:
        raise ValueError(f"method {info.name!r} is already registered")
    unknown = set(info.signals) - set(SIGNALS)
    if unknown:
        raise ValueError(f"method {info.name!r} asks for unknown signals {sorted(unknown)}")
    _METHODS[info.name] = info
    return info


def get_method(name: str) -> MethodInfo:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    return sorted(_METHODS)


from . import divprune, fastv, pyramiddrop  # noqa: E402,F401  (registration side effect, explicit list)
