"""Find each stage's cut point, residual-stream value and (for attention signals) sdpa calls."""
from __future__ import annotations

import torch
from torch import fx

from prunec.adapters.base import module_paths
from prunec.context import CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.methods import get_method

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _layer_span(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if path in module_paths(n)]


def _layer_output(span: list[fx.Node]) -> fx.Node:
    """The span's value that later nodes read and that looks like a residual stream [B, S, D]."""
    inside = set(span)
    outs = [n for n in span if any(u not in inside for u in n.users)
            and getattr(n.meta.get("val"), "ndim", 0) == 3]
    if len(outs) != 1:
        raise BuildError(f"expected one [B, S, D] output of the layer, found {[n.name for n in outs]}")
    return outs[0]


def locate_sites(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: one StageRecord per stage, with anchor, site value and token size set."""
    domains = ctx.adapter.domains()
    checked: set[str] = set()
    for stage in ctx.plan.stages:
        record = StageRecord(stage)
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
            if "next_layer_qk" in get_method(stage.method).signals:
                record.next_layer = _layer_span(gm, f"{domains[stage.domain].layers_path}.{stage.layer + 1}")
                sdpa = [n for n in record.next_layer if n.target is _SDPA]
                if not sdpa:
                    raise BuildError(f"site {stage.site}: method {stage.method} needs the next layer's "
                                     "scaled_dot_product_attention call, and none was found")
                record.next_attention = sdpa[0]
        else:
            record.anchor, record.site_value = ctx.adapter.output_cut(gm, stage.site)
        record.token_size = record.site_value.meta["val"].shape[1]
        if not isinstance(record.token_size, torch.SymInt):
            raise BuildError(f"site {stage.site}: the token axis is static in the captured graph, so "
                             "it cannot be told apart from other sizes")
        if stage.domain not in checked:
            checked.add(stage.domain)
            try:
                ctx.adapter.check_candidates(gm, stage.n_candidates)
            except ValueError as exc:
                raise BuildError(f"site {stage.site}: {exc}") from None
        ctx.records.append(record)
    return gm
