"""Find each stage's cut point, residual-stream value and (for attention signals) sdpa calls."""
from __future__ import annotations

import torch
from torch import fx

from prunec.adapters.base import module_paths
from prunec.context import CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.graph_meta import captured, stamp_captured
from prunec.methods import NEXT_LAYER_SIGNALS, get_method, stage_signals, terms

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _layer_span(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if path in module_paths(n)]


def _outputs(span: list[fx.Node]) -> list[fx.Node]:
    """The span's [B, S, D] values that later nodes read, in graph order."""
    inside = set(span)
    return [n for n in span if any(u not in inside for u in n.users) and getattr(n.meta.get("val"), "ndim", 0) == 3]


def _layer_output(span: list[fx.Node]) -> fx.Node:
    """The layer's residual stream output: its one [B, S, D] value that later nodes read."""
    outs = _outputs(span)
    if len(outs) != 1:
        raise BuildError(f"expected one [B, S, D] output of the layer, found {[n.name for n in outs]}")
    return outs[0]


def _transition_pairs(gm: fx.GraphModule, ctx: CompileContext, stage, first: int) -> list[tuple[fx.Node, fx.Node]]:
    """(input, output) of each sub-block (attention, FFN) of layers first..site layer."""
    layers_path = ctx.adapter.domains()[stage.domain].layers_path
    pairs = []
    for layer in range(first, stage.layer + 1):
        for source, block in ctx.adapter.sub_blocks:
            ends = []
            for name in (source, block):
                path = f"{layers_path}.{layer}.{name}"
                span = _layer_span(gm, path)
                if not span:
                    raise BuildError(f"site {stage.site}: no node of module {path} in the captured graph")
                outs = _outputs(span)  # a norm's no-op dtype cast may be shared with the residual
                if not outs:
                    raise BuildError(f"site {stage.site}: module {path} has no [B, S, D] output")
                ends.append(outs[-1])
            pairs.append(tuple(ends))
    return pairs


def _feature_layer(ctx: CompileContext, stage) -> int:
    try:
        return ctx.adapter.vision_feature_layer()
    except ValueError as exc:
        raise BuildError(f"site {stage.site}: {exc}") from None


def _attention_at(gm: fx.GraphModule, ctx: CompileContext, stage, layer: int) -> tuple[fx.Node, int]:
    """(sdpa call of `layer`, leading non-candidate keys): in the site's domain for a layer site,
    in the vision tower for a pre-LLM site."""
    if stage.layer is None:
        try:
            return ctx.adapter.vision_attention(gm, layer)
        except ValueError as exc:
            raise BuildError(f"site {stage.site}: {exc}") from None
    path = f"{ctx.adapter.domains()[stage.domain].layers_path}.{layer}"
    sdpa = [n for n in _layer_span(gm, path) if n.target is _SDPA]
    if not sdpa:
        raise BuildError(f"site {stage.site}: layer {path} has no scaled_dot_product_attention call")
    return sdpa[-1], 0


def locate_sites(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: one StageRecord per stage, with anchor, site value and token size set."""
    stamp_captured(gm)
    domains = ctx.adapter.domains()
    checked: set[str] = set()
    summed_through: dict[tuple[str, str], int] = {}  # (domain, method) -> last layer an earlier stage summed
    for stage in ctx.plan.stages:
        record = StageRecord(stage, signals=stage_signals(stage.method, stage.param_dict))
        for method, params, _ in terms(stage.method, stage.param_dict):
            info = get_method(method)
            layers = None
            if info.accumulates:  # this stage sums the layers after what the previous one summed
                key = (stage.domain, method)
                first = max(params.get("accumulate_from", stage.layer), summed_through.get(key, -1) + 1)
                layers = list(range(first, stage.layer + 1))
                summed_through[key] = stage.layer
            if "transitions" in info.signals:
                record.transition_pairs = _transition_pairs(gm, ctx, stage, layers[0])
            elif "layer_attention" in info.signals:
                scoring = stage.layer if stage.layer is not None else _feature_layer(ctx, stage)
                layers = layers if layers is not None else info.attention_layers(params, scoring)
                record.layer_attention[method] = [_attention_at(gm, ctx, stage, i) for i in layers]
        if "text_raters" in record.signals:
            try:
                record.llm_input = ctx.adapter.output_cut(gm, "projector.output")[1]
            except (NotImplementedError, ValueError) as exc:
                raise BuildError(f"site {stage.site}: text raters need the LLM input embeddings: {exc}") from None
        if "cls_attention" in record.signals and stage.layer is None:
            record.feature_attention = _attention_at(gm, ctx, stage, _feature_layer(ctx, stage))
        if stage.layer is not None:
            path = f"{domains[stage.domain].layers_path}.{stage.layer}"
            span = _layer_span(gm, path)
            if not span:
                raise BuildError(f"site {stage.site}: no node of module {path} in the captured graph "
                                 "(the layer's output may be unused by the model)")
            record.anchor = span[-1]
            record.site_value = _layer_output(span)
            sdpa = [n for n in span if n.target is _SDPA]
            record.attention = sdpa[-1] if sdpa else None
            if NEXT_LAYER_SIGNALS & record.signals:
                record.next_layer = _layer_span(gm, f"{domains[stage.domain].layers_path}.{stage.layer + 1}")
                sdpa = [n for n in record.next_layer if n.target is _SDPA]
                if not sdpa:
                    raise BuildError(f"site {stage.site}: method {stage.method} needs the next layer's "
                                     "scaled_dot_product_attention call, and none was found")
                record.next_attention = sdpa[0]
        else:
            record.anchor, record.site_value = ctx.adapter.output_cut(gm, stage.site)
        record.token_size = captured(record.site_value).shape[1]
        if not isinstance(record.token_size, torch.SymInt):
            raise BuildError(f"site {stage.site}: the token axis is static in the captured graph, so "
                             "it cannot be told apart from other sizes")
        if stage.domain not in checked:
            checked.add(stage.domain)
            try:
                ctx.adapter.check_candidates(gm, stage.n_candidates // ctx.plan.lock["inputs"].get("images", 1))
            except ValueError as exc:
                raise BuildError(f"site {stage.site}: {exc}") from None
        ctx.records.append(record)
    ctx.report("locate_sites", sites=len(ctx.records))
    return gm
