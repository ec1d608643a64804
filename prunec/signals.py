"""Signals: what a method reads at its site, each from one registered provider.

A method declares the signals it needs (`MethodInfo.signals`); its lowering asks the stage builder
for them (`builder.signal(name, method)`), and the builder calls the provider registered here. A new
signal is one `@provider`; a method that asks for a signal nobody provides is refused when its spec
is validated, naming both. `passes/locate_sites.py` finds the graph nodes the providers read
(sdpa calls, sub-block ends, the LLM input) from the same signal names.

`tensor` providers return one graph node (a tensor), so a method's plain `fn` can be called on them
by the generic `prunec::method_scores` op with no lowering of its own; the others return structured
values that a method's own lowering unpacks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from .errors import BuildError
from .graph_meta import captured


@dataclass(frozen=True)
class Provider:
    name: str
    provide: Callable[..., Any]  # (builder, method) -> value
    tensor: bool                 # the value is one tensor node
    doc: str


@dataclass(frozen=True)
class Attention:
    """One sdpa call's inputs, as graph nodes."""
    q: fx.Node
    k: fx.Node
    mask: fx.Node | None
    scale: float
    causal: bool
    v: fx.Node | None = None


@dataclass(frozen=True)
class LayerAttention:
    """The sdpa inputs of every layer a full-map method reads, in layer order."""
    qs: list
    ks: list
    masks: list
    scales: list
    causal: bool
    vs: list

    @classmethod
    def empty(cls) -> "LayerAttention":
        return cls([], [], [], [], False, [])


_PROVIDERS: dict[str, Provider] = {}


def provider(name: str, doc: str, tensor: bool = False):
    def register(fn):
        if name in _PROVIDERS:
            raise ValueError(f"signal {name!r} already has a provider")
        _PROVIDERS[name] = Provider(name, fn, tensor, doc)
        return fn
    return register


def get_provider(name: str) -> Provider:
    try:
        return _PROVIDERS[name]
    except KeyError:
        raise KeyError(f"no provider for signal {name!r}; known: {', '.join(sorted(_PROVIDERS))}") from None


def signal_names() -> list[str]:
    return sorted(_PROVIDERS)


def sdpa_args(node: fx.Node) -> dict:
    names = [a.name for a in node.target._schema.arguments]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def attention_of(node: fx.Node | None, what: str, site: str) -> Attention:
    if node is None:
        raise BuildError(f"site {site}: the method needs {what}, but it has no scaled_dot_product_attention call")
    sdpa = sdpa_args(node)
    scale = sdpa.get("scale") or sdpa["query"].meta["val"].shape[-1] ** -0.5
    return Attention(sdpa["query"], sdpa["key"], sdpa.get("attn_mask"), float(scale),
                     bool(sdpa.get("is_causal", False)), sdpa.get("value"))


@provider("hidden", "the residual stream at the site, [B, S, D]", tensor=True)
def _hidden(b, method):
    return b.record.site_value


@provider("final_norm_hidden", "the site's hidden states through the domain's final norm (the norm after its "
          "last layer), [B, S, D]", tensor=True)
def _final_norm_hidden(b, method):
    from .adapters.base import module_paths

    path = b.ctx.adapter.domains()[b.stage.domain].norm_path
    span = [n for n in b.graph.nodes if path is not None and path in module_paths(n)]
    if not span:
        raise BuildError(f"site {b.stage.site}: the method reads the hidden states through the final norm, and "
                         f"the captured graph has no final norm for domain {b.stage.domain}")
    inside = set(span)
    outputs = [n for n in span if any(u not in inside for u in n.users)]
    inputs = {a for n in span for a in n.all_input_nodes if a not in inside and captured(a) is not None
              and getattr(captured(a), "ndim", 0) == 3}
    if len(outputs) != 1 or len(inputs) != 1:
        raise BuildError(f"site {b.stage.site}: expected the final norm {path} to read and write one [B, S, D] "
                         f"value, found {len(inputs)} and {len(outputs)}")
    return b.copy_chain(outputs[0], span, replace={inputs.pop(): b.record.site_value})


@provider("vision_features", "[images, patches, width]: the vision features the projector reads (pre-projector)",
          tensor=True)
def _vision_features(b, method):
    try:
        return b.ctx.adapter.projector_input(b.gm)
    except ValueError as exc:
        raise BuildError(f"site {b.stage.site}: the method reads the pre-projector vision features: {exc}") from None


@provider("attention_qk", "the site layer's own post-RoPE q/k/mask (its sdpa call)")
def _attention_qk(b, method):
    return attention_of(b.record.attention, "the layer's attention", b.stage.site)


@provider("cls_attention", "(attention, leading non-candidates) whose first query row is the [CLS] row scoring "
          "the site's tokens: the site layer's own, or before a VLM's LLM the vision feature layer's")
def _cls_attention(b, method):
    if b.stage.layer is not None:
        return attention_of(b.record.attention, "the layer's attention", b.stage.site), 0
    node, leading = b.record.feature_attention
    return attention_of(node, "the vision feature layer's attention", b.stage.site), leading


@provider("next_layer_qk", "the next layer's q (last token only) and k, recomputed on the site's hidden states")
def _next_layer_qk(b, method):
    base = attention_of(b.record.next_attention, "the next layer's attention", b.stage.site)
    q_last = b.copy_chain(base.q, b.record.next_layer, last_token=True)
    k = b.copy_chain(base.k, b.record.next_layer)
    return Attention(q_last, k, base.mask, base.scale, base.causal)


@provider("instruction_qk", "the next layer's q and k for every row, recomputed on the site's hidden states")
def _instruction_qk(b, method):
    base = attention_of(b.record.next_attention, "the next layer's attention", b.stage.site)
    q = b.copy_chain(base.q, b.record.next_layer)
    k = b.copy_chain(base.k, b.record.next_layer)
    return Attention(q, k, base.mask, base.scale, base.causal)


@provider("layer_attention", "q/k/mask (and v) of the layers `attention_layers(params, scoring layer)` names")
def _layer_attention(b, method):
    calls = [attention_of(node, "a layer's attention", b.stage.site) for node, _ in b.record.layer_attention[method]]
    return LayerAttention([c.q for c in calls], [c.k for c in calls], [c.mask for c in calls],
                          [c.scale for c in calls], calls[-1].causal, [c.v for c in calls])


@provider("transitions", "(input, output) of each sub-block (attention, FFN) of the layers the stage sums")
def _transitions(b, method):
    return list(b.record.transition_pairs)


@provider("text_raters", "the LLM input embeddings [B, S, D] (rater tokens are chosen from them)", tensor=True)
def _text_raters(b, method):
    return b.record.llm_input


@provider("image_context", "(hidden states, every image token [B, S] bool, the query image's token count)")
def _image_context(b, method):
    return b.record.site_value, b.record.images, b.stage.query_tokens


@provider("pixels", "the image input as the vision tower receives it", tensor=True)
def _pixels(b, method):
    node = next((n for n in b.graph.nodes if n.op == "placeholder" and n.target == "pixel_values"), None)
    if node is None:
        raise BuildError(f"site {b.stage.site}: the method reads pixels, and the model takes no pixel_values")
    return node


@provider("vision_importance", "[B, S] scores an earlier stage produced for this signal, carried with the tokens",
          tensor=True)
def _carried(b, method):
    return b.carried_signal("vision_importance")


def row_value(like: fx.Node, dtype=torch.float32):
    """Fake [B, S] value on the captured shapes of `like` (a [B, S, ...] node)."""
    from .graph_meta import captured

    value = captured(like)
    with value.fake_mode:
        return torch.empty(tuple(value.shape[:2]), dtype=dtype)
