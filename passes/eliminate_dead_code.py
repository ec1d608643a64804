"""Remove nodes whose values nothing reads any more (e.g. full-length tensors replaced by gathers)."""
from __future__ import annotations

from torch import fx

from prunec.context import CompileContext


def eliminate_dead_code(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: every non-side-effecting node has a user."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    ctx.report("eliminate_dead_code", nodes_removed=before - len(gm.graph.nodes))
    gm.recompile()
    return gm
