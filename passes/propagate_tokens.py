"""Carry each stage's shorter sequence to everything downstream of its cut.

Every value defined before the cut and read after it is rewritten for the tail: the residual stream
becomes the gathered one; any tensor with token axes (rotary cos/sin, 4-D masks on rows and
columns, position ids, candidate masks of later stages) is gathered along those axes, or, for
position-derived tensors under `positions: renumber`, cut to its first K entries; the sequence-length
SymInt becomes K. A value that depends on the sequence length in any other way stops the build.
"""
from __future__ import annotations

import torch
from torch import fx

from prunec.adapters.base import module_paths
from prunec.context import ROLE, CompileContext, StageRecord
from prunec.errors import BuildError

_OPS = torch.ops.prunec
POSITIONS_TABLE = "prunec_positions_table"  # meta: the model's full-length table a positional value came from


def _is_token_size(size, token_size) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr == token_size.node.expr


def _mentions_tokens(value, token_size) -> bool:
    return isinstance(value, torch.SymInt) and bool(value.node.expr.free_symbols & token_size.node.expr.free_symbols)


def _tail_inputs(graph: fx.Graph, record: StageRecord) -> tuple[list[fx.Node], set[fx.Node]]:
    nodes = list(graph.nodes)
    start = nodes.index(record.block_end) + 1
    tail = set(nodes[start:])
    before = set(nodes[:start])
    externals: dict[fx.Node, None] = {}
    for node in nodes[start:]:
        for arg in node.all_input_nodes:
            if arg in before:
                externals[arg] = None
    return list(externals), tail


def _is_positional(node: fx.Node, rotary_path: str | None) -> bool:
    return rotary_path is not None and any(p.startswith(rotary_path) for p in module_paths(node))


def _propagate_stage(gm: fx.GraphModule, record: StageRecord, rotary_path: str | None) -> None:
    graph, stage = gm.graph, record.stage
    externals, tail = _tail_inputs(graph, record)
    in_tail = tail.__contains__
    last = record.block_end
    for node in externals:
        if node is record.site_value:
            node.replace_all_uses_with(record.gathered, delete_user_cb=in_tail)
            record.propagated.append(f"{node.name}: residual stream")
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt):
            if _is_token_size(value, record.token_size):
                node.replace_all_uses_with(record.kept_len, delete_user_cb=in_tail)
                record.propagated.append(f"{node.name}: sequence length")
            elif _mentions_tokens(value, record.token_size):
                raise BuildError(f"site {stage.site}: {node.name} = {value.node.expr} depends on the sequence "
                                 "length in a way prunec cannot rewrite")
            continue
        if not isinstance(value, torch.Tensor):
            continue
        dims = [d for d in range(1, value.ndim) if _is_token_size(value.shape[d], record.token_size)]
        odd = [d for d in range(value.ndim) if d not in dims and _mentions_tokens(value.shape[d], record.token_size)]
        if odd:
            raise BuildError(f"site {stage.site}: {node.name} has shape {tuple(value.shape)}, whose dims {odd} "
                             "depend on the sequence length in a way prunec cannot rewrite")
        if not dims:
            continue
        positional = _is_positional(node, rotary_path)
        with graph.inserting_after(last):
            if stage.positions == "renumber" and positional:
                # positions 0..K-1: the first K rows of the table the model built for 0..S-1 (not of
                # a table an earlier keep_original stage already gathered)
                new = node.meta.get(POSITIONS_TABLE, node)
                for dim in dims:
                    with graph.inserting_after(last):
                        new = graph.call_function(torch.ops.aten.slice.Tensor, (new, dim, 0, record.kept_len))
                    last = new
                how = "first K positions"
            else:
                new = graph.call_function(_OPS.gather_tokens.default, (node, record.index, dims))
                how = f"gathered on dims {dims}"
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
        if positional:
            new.meta[POSITIONS_TABLE] = node.meta.get(POSITIONS_TABLE, node)
        new.meta[ROLE] = "gather"
        last = new
        node.replace_all_uses_with(new, delete_user_cb=in_tail)
        record.propagated.append(f"{node.name}: {how}")


def propagate_tokens(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: no node after a cut reads a pre-cut value of the full sequence length."""
    domains = ctx.adapter.domains()
    for record in ctx.records:  # in graph order, so a later stage sees the earlier stage's tensors
        _propagate_stage(gm, record, domains[record.stage.domain].rotary_path)
    gm.recompile()
    return gm
