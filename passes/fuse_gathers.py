"""Merge a stage's token-axis gathers (residual stream, position ids, masks, rotary tables) into one
`gather_tokens_many`, so the kept tokens of every tensor move in one kernel launch."""
from __future__ import annotations

import operator

import torch
from torch import fx

from prunec.context import CompileContext

_GATHER = torch.ops.prunec.gather_tokens.default
_MANY = torch.ops.prunec.gather_tokens_many.default


def fuse_gathers(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: per keep-index tensor, the batch-first dim-1 gathers whose inputs exist before the
    first of them are one `gather_tokens_many` node placed there; values, their fake values and
    order of use are unchanged."""
    graph = gm.graph
    fused = launches = 0
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if (node.op == "call_function" and node.target is _GATHER and list(node.args[2]) == [1]
                and (len(node.args) < 4 or node.args[3] == 0)):
            groups.setdefault(node.args[1], []).append(node)
    for index, gathers in groups.items():
        order = {node: i for i, node in enumerate(graph.nodes)}  # earlier fusions added nodes
        first = gathers[0]
        fusable = [g for g in gathers if order[g.args[0]] < order[first]]
        if len(fusable) < 2:
            continue
        with graph.inserting_before(first):
            many = graph.call_function(_MANY, ([g.args[0] for g in fusable], index))
            many.meta["val"] = [g.meta["val"] for g in fusable]
            many.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
            for i, gather in enumerate(fusable):
                item = graph.call_function(operator.getitem, (many, i))
                item.meta.update(gather.meta)
                gather.replace_all_uses_with(item)
        for gather in fusable:
            graph.erase_node(gather)
        fused += len(fusable)
        launches += 1
    ctx.report("fuse_gathers", gathers_fused=fused, fused_gathers=launches)
    graph.lint()
    gm.recompile()
    return gm
