"""Carry each stage's shorter sequence to everything downstream of its cut.

Every value defined before the cut and read after it is rewritten for the tail: the residual stream
becomes the gathered one; any tensor with token axes (rotary cos/sin, 4-D masks on rows and
columns, position ids, candidate masks of later stages, mRoPE tables `[3, B, S, d]`) is gathered
along those axes, wherever its batch axis sits; the sequence-length SymInt becomes K. Under
`positions: renumber`, the position ids the rotary module reads become renumbered ones
(`renumber_positions`: each row's first position, then one more per kept token), and the tensors
the rotary module computes are computed again from them by a copy of its nodes, as if the pruned
sequence had been the input. A value that depends on the sequence length in any other way stops the build.

Token axes are recognised by the captured sequence symbol (`graph_meta.captured`), on any axis; the
batch axis by the captured batch symbol (or a leading 1 that broadcasts).
"""
from __future__ import annotations

import torch
from torch import fx

from prunec.adapters.base import module_paths
from prunec.context import ROLE, CompileContext, StageRecord
from prunec.errors import BuildError
from prunec.graph_meta import CAPTURED, captured, refresh_fake_values

_OPS = torch.ops.prunec
POSITIONS_TABLE = "prunec_positions_table"  # meta: the model's own full-length value a positional one came from


def _same_symbol(size, symbol) -> bool:
    return isinstance(size, torch.SymInt) and isinstance(symbol, torch.SymInt) and size.node.expr == symbol.node.expr


def _mentions_tokens(value, token_size) -> bool:
    return isinstance(value, torch.SymInt) and bool(value.node.expr.free_symbols & token_size.node.expr.free_symbols)


def token_axes(value: torch.Tensor, token_size, batch_size, name: str, site: str) -> tuple[list[int], int | None]:
    """(token axes, batch axis) of a captured value: token axes by the sequence symbol on any axis;
    the batch axis by the batch symbol, else a leading 1 (broadcast). No token axes: ([], None)."""
    dims = [d for d in range(value.ndim) if _same_symbol(value.shape[d], token_size)]
    odd = [d for d in range(value.ndim) if d not in dims and _mentions_tokens(value.shape[d], token_size)]
    if odd:
        raise BuildError(f"site {site}: {name} has shape {tuple(value.shape)}, whose dims {odd} depend on the "
                         "sequence length in a way prunec cannot rewrite")
    if not dims:
        return [], None
    batch = [d for d in range(value.ndim) if d not in dims and _same_symbol(value.shape[d], batch_size)]
    if batch:
        return dims, batch[0]
    if 0 not in dims and value.shape[0] == 1:
        return dims, 0
    raise BuildError(f"site {site}: {name} has shape {tuple(value.shape)}: token axes {dims} but no batch axis, so "
                     "rows cannot keep different tokens")


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


def _is_position_ids(node: fx.Node, value: torch.Tensor, rotary_path: str | None) -> bool:
    """Integer per-token values the rotary module reads: the model's position ids."""
    return (not value.is_floating_point() and value.dtype != torch.bool and not _is_positional(node, rotary_path)
            and any(_is_positional(user, rotary_path) for user in node.users))


class _Tail:
    """Inserts a stage's rewrites one after another after its block."""

    def __init__(self, graph: fx.Graph, record: StageRecord):
        self.graph, self.record, self.last = graph, record, record.block_end
        self.batch_size = captured(record.site_value).shape[0]
        self.added: list[fx.Node] = []
        self.renumbered: dict[fx.Node, fx.Node] = {}  # model's positional node -> its recomputation

    def add(self, target, args, like: fx.Node | None, role: str = "gather") -> fx.Node:
        with self.graph.inserting_after(self.last):
            node = self.graph.call_function(target, tuple(args))
        if like is not None:
            node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", CAPTURED)})
        node.meta[ROLE] = role
        self.last = node
        self.added.append(node)
        return node

    def mask_repeats(self, gathered: fx.Node, value: torch.Tensor, dims: list[int], batch_dim: int) -> fx.Node:
        """`gathered` with a ragged stage's repeated entries masked out along its last token axis (the
        keys, for a [.., queries, keys] mask): False, 0, or -inf for an additive float mask."""
        valid, key_dim = self.record.kept_valid, dims[-1]
        for axis in range(value.ndim):  # [B, K] -> broadcastable to the value, B and K on their axes
            if axis not in (batch_dim, key_dim):
                valid = self.add(torch.ops.aten.unsqueeze.default, (valid, axis), None, role="mask")
        if value.dtype == torch.bool:
            return self.add(torch.ops.aten.logical_and.default, (gathered, valid), gathered, role="mask")
        if value.is_floating_point():
            repeats = self.add(torch.ops.aten.logical_not.default, (valid,), None, role="mask")
            return self.add(torch.ops.aten.masked_fill.Scalar, (gathered, repeats, float("-inf")), gathered,
                            role="mask")
        return self.add(torch.ops.aten.mul.Tensor, (gathered, valid), gathered, role="mask")

    def renumber(self, node: fx.Node, rotary_path: str) -> fx.Node:
        """The model's own positional value `node`, computed again from renumbered position ids by a
        copy of the rotary module's nodes it depends on."""
        if node in self.renumbered:
            return self.renumbered[node]
        site, token_size = self.record.stage.site, self.record.token_size
        span = [n for n in self.graph.nodes if _is_positional(n, rotary_path) and ROLE not in n.meta]
        inside, needed, stack = set(span), set(), [node]
        while stack:
            current = stack.pop()
            if current in inside and current not in needed:
                needed.add(current)
                stack.extend(current.all_input_nodes)
        env: dict[fx.Node, object] = {}
        for original in span:  # graph order
            if original not in needed:
                continue
            for arg in original.all_input_nodes:
                if arg in inside or arg in env:
                    continue
                value = captured(arg)
                if isinstance(value, torch.SymInt) and _same_symbol(value, token_size):
                    env[arg] = self.record.kept_len
                elif isinstance(value, torch.Tensor):
                    dims, _ = token_axes(value, token_size, self.batch_size, arg.name, site)
                    if dims and value.is_floating_point():
                        raise BuildError(f"site {site}: positions: renumber recomputes {node.name} from the "
                                         f"position ids, but it also reads {arg.name}, a per-token tensor")
                    if len(dims) > 1:
                        raise BuildError(f"site {site}: positions: renumber needs one token axis in {arg.name}, "
                                         f"found {dims}")
                    if dims:
                        env[arg] = self.add(_OPS.renumber_positions.default, (arg, self.record.kept_len, dims),
                                            arg, role="positions")
            with self.graph.inserting_after(self.last):
                copy = self.graph.node_copy(original, lambda n: env.get(n, n))
            copy.meta[ROLE] = "positions"
            self.last = env[original] = copy
            self.added.append(copy)
            self.renumbered[original] = copy
        return env[node]


def _is_mask(node: fx.Node, value: torch.Tensor, dims: list[int]) -> bool:
    """Values that say which tokens count: bool masks (attention, candidates, validity), float
    attention masks over query and key tokens, and the attention_mask input."""
    if value.dtype == torch.bool:
        return True
    if value.is_floating_point():
        return len(dims) == 2
    return node.op == "placeholder" and node.target == "attention_mask"


def _propagate_stage(gm: fx.GraphModule, record: StageRecord, rotary_path: str | None) -> list[fx.Node]:
    graph, stage = gm.graph, record.stage
    externals, tail = _tail_inputs(graph, record)
    in_tail = tail.__contains__
    rewrite = _Tail(graph, record)
    for node in externals:
        if node is record.site_value:
            node.replace_all_uses_with(record.gathered, delete_user_cb=in_tail)
            record.propagated.append(f"{node.name}: residual stream")
            continue
        value = captured(node)
        if isinstance(value, torch.SymInt):
            if _same_symbol(value, record.token_size):
                node.replace_all_uses_with(record.kept_len, delete_user_cb=in_tail)
                record.propagated.append(f"{node.name}: sequence length")
            elif _mentions_tokens(value, record.token_size):
                raise BuildError(f"site {stage.site}: {node.name} = {value.node.expr} depends on the sequence "
                                 "length in a way prunec cannot rewrite")
            continue
        if not isinstance(value, torch.Tensor):
            continue
        dims, batch_dim = token_axes(value, record.token_size, rewrite.batch_size, node.name, stage.site)
        if not dims:
            continue
        positional = _is_positional(node, rotary_path)
        if stage.positions == "renumber" and _is_position_ids(node, value, rotary_path):
            new = rewrite.add(_OPS.renumber_positions.default, (node, record.kept_len, dims), node, role="positions")
            how = "renumbered position ids"
        elif stage.positions == "renumber" and positional:
            new = rewrite.renumber(node.meta.get(POSITIONS_TABLE, node), rotary_path)
            how = "recomputed from renumbered positions"
        else:
            new = rewrite.add(_OPS.gather_tokens.default, (node, record.index, dims, batch_dim), node)
            how = f"gathered on dims {dims}" + (f" (batch axis {batch_dim})" if batch_dim else "")
            if record.kept_valid is not None and _is_mask(node, value, dims):
                new = rewrite.mask_repeats(new, value, dims, batch_dim or 0)
                how += ", a short row's repeated entries masked"
        if positional:
            new.meta[POSITIONS_TABLE] = node.meta.get(POSITIONS_TABLE, node)
        node.replace_all_uses_with(new, delete_user_cb=in_tail)
        record.propagated.append(f"{node.name}: {how}")
    return rewrite.added


def propagate_tokens(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: no node after a cut reads a pre-cut value of the full sequence length; every
    node's `meta["val"]` holds its pruned shape."""
    domains = ctx.adapter.domains()
    added: list[fx.Node] = []
    for record in ctx.records:  # in graph order, so a later stage sees the earlier stage's tensors
        added += _propagate_stage(gm, record, domains[record.stage.domain].rotary_path)
    changed = added + [r.gathered for r in ctx.records] + [r.kept_len for r in ctx.records]
    recomputed = refresh_fake_values(gm, changed)
    ctx.report("propagate_tokens", values_rewritten=sum(len(r.propagated) for r in ctx.records),
               nodes_added=len(added), fake_values_recomputed=recomputed)
    gm.recompile()
    return gm
