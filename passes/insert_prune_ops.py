"""Insert each stage's candidates, score, selection and residual-stream gather after its cut."""
from __future__ import annotations

import json
import operator

import torch
from torch import fx

import prunec.ops  # noqa: F401  (registers torch.ops.prunec)
from prunec.adapters.base import module_path
from prunec.context import ROLE, CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.methods import get_method, terms

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


def _attention(record: StageRecord, sdpa_node: fx.Node | None, what: str):
    if sdpa_node is None:
        raise BuildError(f"site {record.stage.site}: method {record.stage.method} needs {what}, but it has no "
                         "scaled_dot_product_attention call")
    sdpa = _sdpa_args(sdpa_node)
    scale = sdpa.get("scale") or sdpa["query"].meta["val"].shape[-1] ** -0.5
    return sdpa, float(scale), bool(sdpa.get("is_causal", False))


def _row_val(like: fx.Node, dtype=torch.float32):
    """Fake [B, S] value for an inserted per-token node, on the captured shapes of `like`."""
    value = like.meta["val"]
    with value.fake_mode:
        return torch.empty(tuple(value.shape[:2]), dtype=dtype)


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


def _attention_lists(record: StageRecord, method: str):
    """(qs, ks, masks, scales, is_causal) of the layers a layer_attention method reads."""
    calls = [(_attention(record, node, "a layer's attention"), leading) for node, leading in record.layer_attention[method]]
    qs = [sdpa["query"] for (sdpa, _, _), _ in calls]
    ks = [sdpa["key"] for (sdpa, _, _), _ in calls]
    masks = [sdpa.get("attn_mask") for (sdpa, _, _), _ in calls]
    scales = [scale for (_, scale, _), _ in calls]
    return qs, ks, masks, scales, calls[-1][0][2]


def _layer_attention_scores(add: _Appender, record: StageRecord, method: str, params: dict, candidates: fx.Node,
                            valid: fx.Node | None, prior: fx.Node | None) -> fx.Node:
    stage = record.stage
    qs, ks, masks, scales, causal = _attention_lists(record, method)
    vs = ([_sdpa_args(node)["value"] for node, _ in record.layer_attention[method]]
          if get_method(method).reads_values else [])
    at_layer = stage.layer is not None
    args = (method, _params_json(method, params), qs, ks, masks, scales, causal, valid if at_layer else None,
            candidates if at_layer else None, vs, prior)
    scores = add("score", _OPS.attention_scores.default, args)
    if at_layer:
        return scores
    patches = add("score", torch.ops.aten.slice.Tensor, (scores, 1, -stage.n_candidates, 2**63 - 1))
    return add("score", _OPS.scatter_candidates.default, (patches, candidates, stage.n_candidates))


def _pixels(graph: fx.Graph, info) -> fx.Node | None:
    """The `pixel_values` input, for methods that read pixels."""
    if "pixels" not in info.signals:
        return None
    return next(n for n in graph.nodes if n.op == "placeholder" and n.target == "pixel_values")


def _params_json(method: str, params: dict) -> str:
    """A method's own parameters (not those choosing layers, which are the compiler's), as JSON."""
    skip = get_method(method).layer_params
    return json.dumps({k: v for k, v in sorted(params.items()) if k not in skip})


def _term_scores(add: _Appender, record: StageRecord, method: str, params: dict, candidates: fx.Node,
                 carried: dict, valid: fx.Node | None) -> fx.Node:
    """[B, S] scores of one registered method at the record's site (higher = keep). Accumulating
    methods add what earlier stages summed (`carried`, gathered to this stage's tokens by
    propagate_tokens) and leave their own sum there."""
    stage, info = record.stage, get_method(method)
    signal = info.signals[0]
    if signal == "transitions":
        return record.transitions
    if signal == "layer_attention":
        key = (stage.domain, method)
        scores = _layer_attention_scores(add, record, method, params, candidates, valid, carried.get(key))
        if info.accumulates:  # the next stage continues from here (gathered by propagate_tokens)
            scores.meta["val"] = _row_val(record.site_value)
            carried[key] = scores
        return scores
    if signal == "hidden":
        return add("score", _OPS.diversity_scores.default, (record.site_value, candidates, stage.n_candidates))
    if signal == "vision_importance":  # computed by the vflowopt stage before the LLM, then carried
        return carried[(stage.domain, "vision_importance")]
    if signal == "image_context":
        qs, ks, masks, scales, causal = (_attention_lists(record, method) if "layer_attention" in info.signals
                                         else ([], [], [], [], False))
        return add("score", _OPS.image_context_scores.default,
                   (method, _params_json(method, params), record.site_value, record.images, stage.n_candidates,
                    stage.query_tokens, valid, qs, ks, masks, scales, causal))
    if signal == "text_raters":  # chosen once from the LLM input, then carried (text is never pruned)
        raters = carried.get((stage.domain, "raters"))
        if raters is None:
            raters = add("score", _OPS.text_raters.default, (record.llm_input, candidates))
            raters.meta["val"] = _row_val(record.site_value, torch.bool)
            carried[(stage.domain, "raters")] = raters
        sdpa, scale, causal = _attention(record, record.attention, "the layer's attention")
        return add("score", _OPS.rater_attention.default,
                   (sdpa["query"], sdpa["key"], sdpa.get("attn_mask"), scale, causal, raters))
    if signal == "attention_qk" or (signal == "cls_attention" and stage.layer is not None):
        sdpa, scale, causal = _attention(record, record.attention, "the layer's attention")
        query = params.get("query", "last") if signal == "attention_qk" else "first"
        return add("score", _OPS.attention_received.default,
                   (sdpa["query"], sdpa["key"], sdpa.get("attn_mask"), scale, causal, query))
    if signal == "cls_attention":  # an output site: the vision feature layer's [CLS] row
        node, leading = record.feature_attention
        sdpa, scale, causal = _attention(record, node, "the vision feature layer's attention")
        row = add("score", _OPS.attention_received.default,
                  (sdpa["query"], sdpa["key"], sdpa.get("attn_mask"), scale, causal, "first"))
        patches = add("score", torch.ops.aten.slice.Tensor, (row, 1, leading, 2**63 - 1))
        return add("score", _OPS.scatter_candidates.default, (patches, candidates, stage.n_candidates))
    sdpa, scale, causal = _attention(record, record.next_attention, "the next layer's attention")
    if signal == "next_layer_qk":  # the last token's row only
        q_last = _copy_chain(add, sdpa["query"], record.next_layer, record.token_size)
        k = _copy_chain(add, sdpa["key"], record.next_layer)
        return add("score", _OPS.attention_received.default, (q_last, k, sdpa.get("attn_mask"), scale, causal, "last"))
    q = _copy_chain(add, sdpa["query"], record.next_layer)  # instruction_qk: every row
    k = _copy_chain(add, sdpa["key"], record.next_layer)
    return add("score", _OPS.instruction_attention.default, (q, k, sdpa.get("attn_mask"), scale, causal, candidates))


def _sum_transitions(add: _Appender, record: StageRecord, carried: fx.Node | None, valid: fx.Node | None,
                     cos: str) -> fx.Node:
    """TTV summed over the record's sub-blocks, on top of what earlier stages summed (`carried`,
    gathered to this stage's tokens by propagate_tokens)."""
    total = carried
    for block_in, block_out in record.transition_pairs:
        ttv = add("score", _OPS.token_transition.default, (block_in, block_out, valid, cos))
        total = ttv if total is None else add("score", torch.ops.aten.add.Tensor, (total, ttv))
        total.meta["val"] = _row_val(record.site_value)
    return total


def _proportional_attention(gm: fx.GraphModule, ctx: CompileContext, record: StageRecord, size: fx.Node) -> None:
    """Add log(size) to the attention logits of the domain's later layers, up to the next ToMe stage
    (which adds its own sizes)."""
    stage, graph = record.stage, gm.graph
    later = [s.layer for s in ctx.plan.stages if s.domain == stage.domain and s.method == "tome" and s.layer > stage.layer]
    domain = ctx.adapter.domains()[stage.domain]

    def make(target, args, kwargs=None):
        node = graph.call_function(target, args, kwargs or {})
        node.meta[ROLE] = "score"
        return node

    for layer in range(stage.layer + 1, min(later, default=domain.num_layers - 1) + 1):
        for node in [n for n in graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default
                     and f"{domain.layers_path}.{layer}." in module_path(n) + "."]:
            mask = _sdpa_args(node).get("attn_mask")
            with graph.inserting_before(node):
                bias = make(torch.ops.aten.log.default, (size,))
                bias = make(torch.ops.aten.unsqueeze.default, (make(torch.ops.aten.unsqueeze.default, (bias, 1)), 1))
                bias = make(torch.ops.aten._to_copy.default, (bias,), {"dtype": node.args[0].meta["val"].dtype})
                if mask is not None and mask.meta["val"].dtype == torch.bool:
                    bias = make(torch.ops.aten.masked_fill.Scalar,
                                (bias, make(torch.ops.aten.logical_not.default, (mask,)), float("-inf")))
                elif mask is not None:
                    bias = make(torch.ops.aten.add.Tensor, (mask, bias))
            if "attn_mask" in node.kwargs:
                node.kwargs = {**node.kwargs, "attn_mask": bias}
            else:
                args = list(node.args) + [None] * (4 - len(node.args))
                args[3] = bias
                node.args = tuple(args)


def insert_prune_ops(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: every record has index, gathered and kept_len nodes; nothing downstream changed yet."""
    graph = gm.graph
    carried: dict[tuple[str, str], fx.Node] = {}  # (domain, method) -> sum of the latest accumulating stage
    for record in ctx.records:
        stage, info = record.stage, get_method(record.stage.method)
        add = _Appender(graph, record.anchor)
        candidates = ctx.adapter.candidate_mask(graph, record.site_value, stage.protect, add.last)
        candidates.meta[ROLE] = "candidates"
        if candidates.prev is add.last:  # the adapter built it at the cut, not from the inputs
            add.last = candidates
        sizes = (stage.n_candidates, stage.n_keep)
        if info.scope:  # the stage selects among one scope of the image tokens and keeps the rest
            record.images = candidates
            candidates = add("candidates", _OPS.scope_candidates.default,
                             (candidates, stage.n_candidates, stage.query_tokens, info.scope), meta_from=candidates)
            left = stage.query_tokens if info.scope == "context" else stage.n_candidates - stage.query_tokens
            sizes = (stage.n_candidates - left, stage.n_keep - left)
        if stage.method == "vflowopt" and any(s.method == "vflowopt_llm" for s in ctx.plan.stages):
            qs, ks, masks, scales, causal = _attention_lists(record, stage.method)
            importance = add("score", _OPS.vision_importance.default,
                             (qs, ks, masks, scales, causal, candidates, stage.n_candidates,
                              stage.param_dict["threshold"], _pixels(graph, info), stage.param_dict["entropy_weight"]))
            importance.meta["val"] = _row_val(record.site_value)  # full length: propagate_tokens gathers it
            carried[(stage.domain, "vision_importance")] = importance
        valid = (ctx.adapter.validity(graph) if {"transitions", "layer_attention", "image_context"} & record.signals
                 else None)
        if "transitions" in record.signals:
            cos = next(p for m, p, _ in terms(stage.method, stage.param_dict) if m == "ttv")["cos"]
            record.transitions = _sum_transitions(add, record, carried.get((stage.domain, "ttv")), valid, cos)
            carried[(stage.domain, "ttv")] = record.transitions
        if sizes[1] == 0:  # every candidate goes: no score needed
            index = add("select", _OPS.drop_candidates.default, (candidates, sizes[0]))
        elif info.kind == "select" and "layer_attention" in info.signals:
            qs, ks, masks, scales, causal = _attention_lists(record, stage.method)
            hidden = record.site_value if "hidden" in info.signals else None
            index = add("select", _OPS.select_by_attention.default,
                        (stage.method, _params_json(stage.method, stage.param_dict), qs, ks, masks, scales, causal,
                         candidates, *sizes, hidden))
        elif stage.method == "divprune":  # its own op: the greedy loop has a Triton kernel
            index = add("select", _OPS.select_divprune.default, (record.site_value, candidates, *sizes))
        elif info.kind == "select":
            images = ctx.plan.lock["inputs"].get("images", 1) if info.per_image else 1
            index = add("select", _OPS.select_by_features.default,
                        (stage.method, _params_json(stage.method, stage.param_dict), record.site_value, candidates,
                         *sizes, images))
        elif stage.method == "tome":
            sdpa, _, _ = _attention(record, record.attention, "the layer's attention")
            merge = add("select", _OPS.tome_merge.default,
                        (record.site_value, carried.get((stage.domain, "size")), sdpa["key"], candidates, *sizes))
            index = add("select", operator.getitem, (merge, 0))
            source = add("select", operator.getitem, (merge, 1), meta_from=record.site_value)
            size = add("select", operator.getitem, (merge, 2))
            size.meta["val"] = _row_val(record.site_value)  # full length: propagate_tokens gathers it
            carried[(stage.domain, "size")] = size
            if stage.param_dict["proportional_attention"]:
                _proportional_attention(gm, ctx, record, size)
        elif info.kind == "merge" and info.signals[0] == "text_raters":  # a merge driven by scores
            scores = _term_scores(add, record, stage.method, stage.param_dict, candidates, carried, valid)
            merge = add("select", _OPS.merge_by_scores.default,
                        (stage.method, _params_json(stage.method, stage.param_dict), record.site_value, scores,
                         candidates, *sizes))
            index = add("select", operator.getitem, (merge, 0))
            source = add("select", operator.getitem, (merge, 1), meta_from=record.site_value)
        elif info.kind == "merge":
            qs, ks, masks, scales, causal = (_attention_lists(record, stage.method) if "layer_attention" in info.signals
                                             else ([], [], [], [], False))
            merge = add("select", _OPS.merge_candidates.default,
                        (stage.method, _params_json(stage.method, stage.param_dict), record.site_value, candidates,
                         *sizes, qs, ks, masks, scales, causal, _pixels(graph, info)))
            index = add("select", operator.getitem, (merge, 0))
            source = add("select", operator.getitem, (merge, 1), meta_from=record.site_value)
        else:
            fused = terms(stage.method, stage.param_dict)
            scores = [_term_scores(add, record, m, p, candidates, carried, valid) for m, p, _ in fused]
            if info.kind == "fuse":
                params = stage.param_dict
                scores = [add("score", _OPS.fuse_scores.default,
                              (scores, candidates, [w for _, _, w in fused], params["fusion"], params["normalize"]))]
            index = add("select", _OPS.select_topk.default, (scores[0], candidates, *sizes))
        record.index = index
        if info.kind != "merge":
            source = record.site_value
        record.gathered = add("gather", _OPS.gather_tokens.default, (source, index, [1]), meta_from=record.site_value)
        record.kept_len = add("kept_len", torch.ops.aten.sym_size.int, (record.gathered, 1))
        record.kept_len.meta["val"] = record.token_size
        record.block_end = add.last
    gm.recompile()
    return gm
