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

    def copy(self, node: fx.Node, env: dict, role: str) -> fx.Node:
        with self.graph.inserting_after(self.last):
            new = self.graph.node_copy(node, lambda n: env.get(n, n))
        new.meta[ROLE] = role
        self.last = env[node] = new
        return new


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


def _copy_chain(add: _Appender, root: fx.Node, span: list[fx.Node], token_size=None) -> fx.Node:
    """Copy `root` and its ancestors inside `span` (a layer's nodes) to the insertion point.

    With `token_size`, the copy runs on the last token only: every outside tensor with token axes is
    sliced to its last entry there and the sequence-length SymInt becomes 1. That is exact for
    per-token chains (norm, projection, RoPE), which is what a layer computes before attention.
    """
    inside = set(span)
    needed: set[fx.Node] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node in inside and node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    env: dict = {}
    for node in span:  # graph order
        if node not in needed:
            continue
        if token_size is not None:
            for arg in node.all_input_nodes:
                if arg not in inside and arg not in env:
                    env[arg] = _last_token_view(add, arg, token_size)
        copied = add.copy(node, env, "score")
        if token_size is not None:
            copied.meta.pop("val", None)  # captured shapes no longer apply
    return env[root]


def _last_token_view(add: _Appender, node: fx.Node, token_size):
    value = node.meta.get("val")
    if isinstance(value, torch.SymInt) and value.node.expr == token_size.node.expr:
        return 1
    if not isinstance(value, torch.Tensor):
        return node
    for dim in range(1, value.ndim):
        size = value.shape[dim]
        if isinstance(size, torch.SymInt) and size.node.expr == token_size.node.expr:
            node = add("score", torch.ops.aten.slice.Tensor, (node, dim, -1, 2**63 - 1))
    return node


def _next_layer_scores(add: _Appender, record: StageRecord) -> fx.Node:
    """The next layer's attention from the last token, recomputed on the site's hidden states."""
    sdpa = _sdpa_args(record.next_attention)
    q_last = _copy_chain(add, sdpa["query"], record.next_layer, record.token_size)
    k = _copy_chain(add, sdpa["key"], record.next_layer)
    scale = sdpa.get("scale") or sdpa["query"].meta["val"].shape[-1] ** -0.5
    return add("score", _OPS.attention_received.default,
               (q_last, k, sdpa.get("attn_mask"), float(scale), bool(sdpa.get("is_causal", False)), "last"))


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
            scores = _next_layer_scores(add, record) if "next_layer_qk" in info.signals else _scores(add, record, candidates)
            index = add("select", _OPS.select_topk.default, (scores, candidates, *sizes))
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
