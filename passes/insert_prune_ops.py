"""Insert each stage's candidates, score, selection and residual-stream gather after its cut."""
from __future__ import annotations

import torch
from torch import fx

import prunec.ops  # noqa: F401  (registers torch.ops.prunec)
from prunec.context import ROLE, CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.methods import get_method

_OPS = torch.ops.prunec


class _Appender:
    """Appends nodes one after another starting after `anchor`, tagging each with a role."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        self.graph, self.last = graph, anchor

    def __call__(self, role: str, target, args, meta_from: fx.Node | None = None) -> fx.Node:
        with self.graph.inserting_after(self.last):
            node = self.graph.call_function(target, args)
        node.meta[ROLE] = role
        if meta_from is not None:
            node.meta["nn_module_stack"] = meta_from.meta.get("nn_module_stack", {})
            if "val" in meta_from.meta:
                node.meta["val"] = meta_from.meta["val"]
        self.last = node
        return node


def _sdpa_args(node: fx.Node) -> dict:
    names = [a.name for a in node.target._schema.arguments]
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _scores(add: _Appender, record: StageRecord, candidates: fx.Node) -> fx.Node:
    stage = record.stage
    if record.attention is None:
        raise BuildError(f"site {stage.site}: method {stage.method} needs the layer's attention, but the "
                         "layer has no scaled_dot_product_attention call")
    sdpa = _sdpa_args(record.attention)
    q, k = sdpa["query"], sdpa["key"]
    scale = sdpa.get("scale") or q.meta["val"].shape[-1] ** -0.5
    return add("score", _OPS.attention_received.default,
               (q, k, sdpa.get("attn_mask"), float(scale), bool(sdpa.get("is_causal", False)),
                stage.param_dict["query"]))


def insert_prune_ops(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: every record has index, gathered and kept_len nodes; nothing downstream changed yet."""
    graph = gm.graph
    for record in ctx.records:
        stage, info = record.stage, get_method(record.stage.method)
        add = _Appender(graph, record.anchor)
        candidates = ctx.adapter.candidate_mask(graph, record.site_value, stage.protect, add.last)
        candidates.meta[ROLE] = "candidates"
        if candidates.prev is add.last:  # the adapter built it at the cut, not from the inputs
            add.last = candidates
        sizes = (stage.n_candidates, stage.n_keep)
        if info.kind == "score":
            index = add("select", _OPS.select_topk.default, (_scores(add, record, candidates), candidates, *sizes))
        else:
            index = add("select", _OPS.select_divprune.default, (record.site_value, candidates, *sizes))
        record.index = index
        record.gathered = add("gather", _OPS.gather_tokens.default, (record.site_value, index, [1]),
                              meta_from=record.site_value)
        record.kept_len = add("kept_len", torch.ops.aten.sym_size.int, (record.gathered, 1))
        record.kept_len.meta["val"] = record.token_size
        record.block_end = add.last
    gm.recompile()
    return gm
