"""Method registry: a method is a pure function over tensors, registered by name.

A *score* method maps signals to one score per token (higher = keep); the compiler keeps the top-k
candidates. A *select* method returns the kept candidate indices itself (e.g. DivPrune's greedy
max-min) and may offer a score form (`score_fn`) so it can take part in a fusion. The *fuse* method
combines other methods' scores (`methods/fuse.py`). Methods never see a model or a graph: the
compiler hands them tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# attention_qk: the site layer's own post-RoPE q/k (read from its sdpa call);
# next_layer_qk: the next layer's q (last row) and k recomputed on the site's hidden states;
# instruction_qk: the same for every query row (the method picks the instruction rows);
# cls_attention: q/k of the attention whose [CLS] row scores the site's tokens (the site layer's own,
#   or, before a VLM's LLM, the vision tower's feature layer);
# layer_attention: q/k/mask of the layers `attention_layers(params, scoring layer)` names, for
#   methods that read full attention maps (the scoring layer: the site's, or before a VLM's LLM the
#   vision tower's feature layer);
# transitions: each layer's sub-block inputs and outputs (attention and FFN), summed over layers;
# text_raters: the site layer's q/k plus rater tokens chosen once from the LLM input embeddings;
# hidden: the residual stream at the site;
# pixels: the image input as the vision tower receives it (per-patch pixel statistics);
# vision_importance: what a `vflowopt` stage before the LLM scored each image token, carried with the tokens;
# image_context: the site's hidden states with every image token marked, the query image's token count and
#   the validity mask (plus `layer_attention` where the method also names layers).
SIGNALS = ("attention_qk", "next_layer_qk", "instruction_qk", "cls_attention", "layer_attention", "transitions",
           "text_raters", "hidden", "image_context", "vision_importance", "pixels")
QK_SIGNALS = frozenset({"attention_qk", "next_layer_qk", "instruction_qk", "cls_attention", "layer_attention",
                        "text_raters"})
NEXT_LAYER_SIGNALS = frozenset({"next_layer_qk", "instruction_qk"})


@dataclass(frozen=True)
class MethodInfo:
    name: str
    action: str                      # "prune" | "merge"
    kind: str                        # "score" | "select" | "fuse" | "merge"
    signals: tuple[str, ...]         # what the compiler must tap at the site, from SIGNALS
    fn: Callable[..., Any]
    params_schema: dict[str, Any]    # JSON Schema of the `params:` mapping
    default_positions: str           # "keep_original" | "renumber"
    domains: tuple[str, ...] = ("llm", "vision", "encoder")
    layer_sites_only: bool = False   # needs a layer's attention, so only `<domain>.layers[i]` sites
    layer_domains: tuple[str, ...] | None = None  # domains whose layer sites work (default: domains)
    summary: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""                 # paper / official file the default variant follows
    variants: dict[str, str] = field(default_factory=dict)  # param -> "official / other" choices
    score_fn: Callable[..., Any] | None = None  # select methods: a score form for fusion
    # layer_attention methods: the layers whose attention they read, from (params, scoring layer)
    attention_layers: Callable[[dict[str, Any], int], list[int]] | None = None
    accumulates: bool = False        # combines per-layer scores from `accumulate_from`, carried across stages
    reads_values: bool = False       # layer_attention methods that also read the layers' values
    layer_params: tuple[str, ...] = ()  # params that choose layers: the compiler reads them, fn never sees them
    paired_text: bool = False        # select methods that also take the mean embedding of the text after the image
    per_image: bool = False          # with several images per row, selects within each image (equal budgets)
    scope: str | None = None         # "context" | "query": the stage's candidates are the tokens of every image
                                     # but the last (the in-context demonstrations), or of the last (the query)


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


def catalog() -> list[dict[str, Any]]:
    """One row per registered method: what `prunec methods` prints."""
    rows = []
    for name in method_names():
        info = _METHODS[name]
        sites = [f"{d}.layers[i]" for d in (info.domains if info.layer_domains is None else info.layer_domains)]
        if not info.layer_sites_only:
            sites.append("pre-LLM / output sites")
        rows.append({
            "method": name, "action": info.action, "kind": info.kind, "sites": sites,
            "signals": list(info.signals) or ["(its terms')"], "positions": info.default_positions,
            "variants": info.variants, "params": sorted(info.params_schema.get("properties", {})),
            "fusable": (info.kind == "score" or info.score_fn is not None) and info.action == "prune" and not info.scope,
            "summary": info.summary, "source": info.source,
        })
    return rows


def terms(method: str, params: dict[str, Any]) -> list[tuple[str, dict[str, Any], float]]:
    """The scores a stage computes: (method, params with defaults, weight), one per fused term."""
    if get_method(method).kind != "fuse":
        return [(method, params, 1.0)]
    return [(t["method"], {**get_method(t["method"]).defaults, **t.get("params", {})}, float(t.get("weight", 1.0)))
            for t in params["terms"]]


def stage_signals(method: str, params: dict[str, Any]) -> set[str]:
    """Every signal a stage needs, over its fused terms."""
    return {s for name, _, _ in terms(method, params) for s in get_method(name).signals}


from . import (a2sf, aim, aim_merge, catp, divprune, fastervlm, fastv, flowcut, fopru, fuse,  # noqa: E402,F401
               hiprune, holov, lazyllm, pyramiddrop, recoverable, sparsevlm, spatten, todre, tome, transprune,
               vflowopt, visionzip, vtc_cls, zero_tprune)  # registration
