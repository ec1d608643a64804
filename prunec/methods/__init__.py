"""Method registry: a method is a pure function over tensors, registered by name.

A *score* method maps signals to one score per token (higher = keep); the compiler keeps the top-k
candidates. A *select* method returns the kept candidate indices itself (e.g. DivPrune's greedy
max-min) and may offer a score form (`lower_scores`) so it can take part in a fusion. The *fuse* method
combines other methods' scores (`methods/fuse.py`). Method functions never see a model or a graph:
they get tensors.

How a method becomes graph nodes is the method's own business: `lower_scores` / `lower_select`
(`methods/lowerings.py` has the shared ones and the defaults by kind), `check_budget` for budget
rules of its own, `produces` / `produce` for signals it computes for later stages. The compiler, the
validator, the FLOPs count and the kernel dispatch call these; none of them names a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..ragged import ROUNDINGS

# Signal names (each has a provider in prunec/signals.py):
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
QK_SIGNALS = frozenset({"attention_qk", "next_layer_qk", "instruction_qk", "cls_attention", "layer_attention",
                        "text_raters"})
NEXT_LAYER_SIGNALS = frozenset({"next_layer_qk", "instruction_qk"})


@dataclass(frozen=True)
class MethodInfo:
    name: str
    action: str                      # "prune" | "merge"
    kind: str                        # "score" | "select" | "fusion" | "merge"
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
    # layer_attention methods: the layers whose attention they read, from (params, scoring layer)
    attention_layers: Callable[[dict[str, Any], int], list[int]] | None = None
    accumulates: bool = False        # combines per-layer scores from `accumulate_from`, carried across stages
    reads_values: bool = False       # layer_attention methods that also read the layers' values
    layer_params: tuple[str, ...] = ()  # params that choose layers: the compiler reads them, fn never sees them
    paired_text: bool = False        # select methods that also take the mean embedding of the text after the image
    per_image: bool = False          # with several images per row, selects within each image (equal budgets)
    per_image_scope: bool = False    # its own lower_select honours `scope: per_image` (StageBuilder.per_image)
    scope: str | None = None         # "context" | "query": the stage's candidates are the tokens of every image
                                     # but the last (the in-context demonstrations), or of the last (the query)
    # lowering: (builder, method, params) -> [B, S] score node; (builder) -> Selection (methods/lowerings.py)
    lower_scores: Callable[..., Any] | None = None
    lower_select: Callable[..., Any] | None = None
    # (params, available, n_keep, adapter, protect, images per row) -> None, or (message, "keep" | "site") for a
    # budget it cannot take
    check_budget: Callable[..., Any] | None = None
    produces: tuple[str, ...] = ()   # signals it computes for later stages that ask for them
    produce: Callable[..., Any] | None = None  # (builder, signal) -> [B, S] node, carried with the tokens
    kernel: bool = False             # its scoring and selection run as Triton kernels on GPU
    rounding: str = "half_up"        # ratio -> count, as its official code does: half_up | half_even | floor
    # (params, requested) -> the count its official code keeps for a budget of `requested` tokens (a
    # count, or ratio x candidates unrounded), where that differs from the budget (DART keeps its pivots
    # on top); its docstring's first line says the rule (`prunec explain`)
    kept_count: Callable[[dict[str, Any], float], int] | None = None
    row_budgets: bool = False        # its lowering resolves budgets per row at run time (rows of different
                                     # candidate counts, `inputs.images_per_row`); tests/test_ragged.py checks it
    rounding_source: str = ""        # where that rule comes from
    eager_way: str | None = None     # how `prunec bench`'s eager-attention baseline scores it, if it can:
                                     # "attention_probabilities" | "next_layer_rows" | "select_before_llm"


_METHODS: dict[str, MethodInfo] = {}



def register_method(info: MethodInfo) -> MethodInfo:
    """Register `info`, filling in the default lowerings of its kind. Signals are checked against
    their providers when a spec using the method is validated (a provider may register later)."""
    from . import lowerings

    if info.name in _METHODS:
        raise ValueError(f"method {info.name!r} is already registered")
    if info.rounding not in ROUNDINGS:
        raise ValueError(f"method {info.name!r}: rounding {info.rounding!r} is not one of {', '.join(ROUNDINGS)}")
    defaults = {
        "score": (lowerings.generic_scores, lowerings.keep_top_scores),
        "select": (None, lowerings.select_by_features),
        "merge": (None, lowerings.merge_candidates),
        "fusion": (None, None),
    }[info.kind]
    info = replace(info, lower_scores=info.lower_scores or defaults[0], lower_select=info.lower_select or defaults[1])
    _METHODS[info.name] = info
    return info


def takes_per_image_scope(info: MethodInfo) -> bool:
    """Whether a stage of this method can select within each image (`scope: per_image`): the generic
    top-k and feature selections can; a method with its own selection says so."""
    from . import lowerings

    return info.per_image or info.per_image_scope or (
        info.scope is None and info.lower_select in (lowerings.keep_top_scores, lowerings.select_by_features))


def unregister_method(name: str) -> None:
    """Remove a method (tests and plugins that register their own)."""
    _METHODS.pop(name, None)


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
            "rounding": info.rounding, "row_budgets": info.row_budgets,
            "scopes": ["per_image"] if info.per_image else ["all", "per_image"] if takes_per_image_scope(info) else
            ["all"],
            "fusable": info.lower_scores is not None and info.action == "prune" and not info.scope,
            "summary": info.summary, "source": info.source,
        })
    return rows


def _param_type(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(map(str, schema["enum"]))
    if "type" in schema:
        kind = schema["type"]
        return "/".join(kind) if isinstance(kind, list) else kind
    if "oneOf" in schema or "anyOf" in schema:
        return " or ".join(_param_type(s) for s in schema.get("oneOf", schema.get("anyOf")))
    return "any"


def method_detail(name: str) -> dict[str, Any]:
    """Everything `prunec methods NAME` shows: the catalog row, each parameter's type, default and
    description, the rounding rule and the preset specs that use the method."""
    from pathlib import Path

    info = get_method(name)
    row = next(r for r in catalog() if r["method"] == name)
    schema = info.params_schema
    params = []
    for param, spec in schema.get("properties", {}).items():
        entry = {"name": param, "type": _param_type(spec), "required": param in schema.get("required", []),
                 "description": spec.get("description", "")}
        if param in info.defaults:
            entry["default"] = info.defaults[param]
        params.append(entry)
    specs = Path(__file__).resolve().parents[2] / "specs"
    presets = sorted(str(p.relative_to(specs)) for p in specs.rglob("*.yaml")
                     if f"method: {name}\n" in p.read_text() or f"method: {name} " in p.read_text()) \
        if specs.is_dir() else []
    return {**row, "params_detail": params, "rounding_source": info.rounding_source, "presets": presets}


def terms(method: str, params: dict[str, Any]) -> list[tuple[str, dict[str, Any], float]]:
    """The scores a stage computes: (method, params with defaults, weight), one per fused term."""
    if get_method(method).kind != "fusion":
        return [(method, params, 1.0)]
    return [(t["method"], {**get_method(t["method"]).defaults, **t.get("params", {})}, float(t.get("weight", 1.0)))
            for t in params["terms"]]


def stage_signals(method: str, params: dict[str, Any]) -> set[str]:
    """Every signal a stage needs, over its fused terms."""
    return {s for name, _, _ in terms(method, params) for s in get_method(name).signals}


from . import (a2sf, aim, aim_merge, catp, cdpruner, dart, divprune, evs, fastervlm, fastv,  # noqa: E402,F401
               flowcut, fopru, fuse, hiprune, holov, lazyllm, pool, pyramiddrop, random_baseline, recoverable,
               sparsevlm, spatten, todre, tome, transprune, vflowopt, vidcom2, vispruner, visionzip, vtc_cls,
               zero_tprune)  # registration
