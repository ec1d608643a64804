"""Lowerings shared by several methods: how a method's scoring and selection become graph nodes.

A method names its lowerings in its `MethodInfo` (`lower_scores`, `lower_select`); the defaults by
kind are `generic_scores` + `keep_top_scores` (score), `select_by_features` (select) and
`merge_candidates` (merge). A lowering gets the stage's `StageBuilder` (`prunec/lowering.py`) and
returns a [B, S] score node (`lower_scores(builder, method, params)`) or a `Selection`
(`lower_select(builder)`); `builder.signal(name, method)` hands out the method's signals.
"""
from __future__ import annotations

import operator

import torch

from ..lowering import Selection, StageBuilder, params_json

_OPS = torch.ops.prunec


def _info(method: str):
    from . import get_method

    return get_method(method)


# -- scores ([B, S] fp32, higher = keep) --------------------------------------------------------------
def generic_scores(b: StageBuilder, method: str, params: dict):
    """`fn(*signal tensors, **params)` through `prunec::method_scores`; every signal must be a tensor."""
    info = _info(method)
    inputs = [b.signal(name, method) for name in info.signals]
    return b.add("score", _OPS.method_scores.default, (method, params_json(info, params), b.candidates, inputs))


def attention_row_scores(b: StageBuilder, method: str, params: dict):
    """Attention each token receives at the site layer from the `query` rows (`attention_qk`)."""
    a = b.signal("attention_qk", method)
    return b.add("score", _OPS.attention_received.default,
                 (a.q, a.k, a.mask, a.scale, a.causal, params.get("query", "last")))


def next_layer_row_scores(b: StageBuilder, method: str, params: dict):
    """Attention each token receives from the last token under the next layer's q/k (`next_layer_qk`)."""
    a = b.signal("next_layer_qk", method)
    return b.add("score", _OPS.attention_received.default, (a.q, a.k, a.mask, a.scale, a.causal, "last"))


def cls_row_scores(b: StageBuilder, method: str, params: dict):
    """The [CLS] row (`cls_attention`): the site layer's own, or the vision feature layer's, whose
    patch columns are mapped onto the candidates."""
    a, leading = b.signal("cls_attention", method)
    row = b.add("score", _OPS.attention_received.default, (a.q, a.k, a.mask, a.scale, a.causal, "first"))
    if b.stage.layer is not None:
        return row
    patches = b.add("score", torch.ops.aten.slice.Tensor, (row, 1, leading, 2**63 - 1))
    return b.ctx.adapter.patch_scores(b, patches)


def attention_map_scores(b: StageBuilder, method: str, params: dict):
    """A full-attention-map method's `fn` over the layers it reads (`layer_attention`); accumulating
    methods continue what the domain's previous stage of the same method summed."""
    info = _info(method)
    a = b.signal("layer_attention", method)
    at_layer = b.stage.layer is not None
    key = (b.stage.domain, f"accumulated:{method}")
    args = (method, params_json(info, params), a.qs, a.ks, a.masks, a.scales, a.causal,
            b.valid if at_layer else None, b.candidates if at_layer else None,
            a.vs if info.reads_values else [], b.carried.get(key))
    scores = b.add("score", _OPS.attention_scores.default, args)
    if info.accumulates:  # the next stage continues from here (gathered by propagate_tokens)
        b.carried[key] = b.rows(scores)
    if at_layer:
        return scores
    patches = b.add("score", torch.ops.aten.slice.Tensor, (scores, 1, -b.n_candidates, 2**63 - 1))
    return b.add("score", _OPS.scatter_candidates.default, (patches, b.candidates, b.n_candidates))


def image_context_scores(b: StageBuilder, method: str, params: dict):
    """A method over the site's hidden states with every image token marked (`image_context`),
    plus the layers' attention when it also reads `layer_attention`."""
    info = _info(method)
    hidden, images, query_tokens = b.signal("image_context", method)
    a = b.signal("layer_attention", method) if "layer_attention" in info.signals else None
    a = a or _no_attention()
    return b.add("score", _OPS.image_context_scores.default,
                 (method, params_json(info, params), hidden, images, b.n_candidates, query_tokens, b.valid,
                  a.qs, a.ks, a.masks, a.scales, a.causal))


def _no_attention():
    from ..signals import LayerAttention

    return LayerAttention.empty()


# -- selections ---------------------------------------------------------------------------------------
def keep_top_scores(b: StageBuilder) -> Selection:
    """Keep the highest-scoring candidates of the method's own scores."""
    info = _info(b.stage.method)
    scores = info.lower_scores(b, info.name, b.stage.param_dict)
    if b.stage.ragged:
        return Selection(b.add("select", _OPS.select_topk_rows.default, (scores, b.candidates, *b.row_budget())))
    if b.per_image:
        return Selection(b.add("select", _OPS.select_topk_per_image.default,
                               (scores, b.candidates, *b.sizes, b.images_per_row)))
    return Selection(b.add("select", _OPS.select_topk.default, (scores, b.candidates, *b.sizes)))


def select_by_features(b: StageBuilder) -> Selection:
    """`fn(features [B*images, N, D], n_keep, [text], **params)` over the candidates' hidden states;
    per image for `per_image` methods and `scope: per_image` stages."""
    info = _info(b.stage.method)
    images = b.images_per_row if b.per_image else 1
    return Selection(b.add("select", _OPS.select_by_features.default,
                           (info.name, params_json(info, b.stage.param_dict), b.signal("hidden"), b.candidates,
                            *b.sizes, images)))


def select_by_attention(b: StageBuilder) -> Selection:
    """`fn(qs, ks, masks, scales, causal, n_candidates, n_keep, [features, text], **params)`."""
    info = _info(b.stage.method)
    a = b.signal("layer_attention")
    hidden = b.signal("hidden") if "hidden" in info.signals else None
    return Selection(b.add("select", _OPS.select_by_attention.default,
                           (info.name, params_json(info, b.stage.param_dict), a.qs, a.ks, a.masks, a.scales,
                            a.causal, b.candidates, *b.sizes, hidden)))


def merge_candidates(b: StageBuilder) -> Selection:
    """`fn(features, n_keep, [attention...], [pixels=], **params)` -> (kept, merged rows)."""
    info = _info(b.stage.method)
    a = b.signal("layer_attention") if "layer_attention" in info.signals else _no_attention()
    pixels = b.signal("pixels") if "pixels" in info.signals else None
    merge = b.add("select", _OPS.merge_candidates.default,
                  (info.name, params_json(info, b.stage.param_dict), b.signal("hidden"), b.candidates, *b.sizes,
                   a.qs, a.ks, a.masks, a.scales, a.causal, pixels))
    return _merge_result(b, merge)


def merge_by_scores(b: StageBuilder) -> Selection:
    """`fn(features, scores, n_keep, **params)` with the method's own scores -> (kept, merged rows)."""
    info = _info(b.stage.method)
    scores = info.lower_scores(b, info.name, b.stage.param_dict)
    merge = b.add("select", _OPS.merge_by_scores.default,
                  (info.name, params_json(info, b.stage.param_dict), b.record.site_value, scores, b.candidates,
                   *b.sizes))
    return _merge_result(b, merge)


def _merge_result(b: StageBuilder, merge) -> Selection:
    index = b.add("select", operator.getitem, (merge, 0))
    source = b.add("select", operator.getitem, (merge, 1), meta_from=b.record.site_value)
    return Selection(index, source)
