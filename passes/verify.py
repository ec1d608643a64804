"""Lint the rewritten graph and export it again, which re-runs fake-tensor shape propagation
through every node (including the prunec ops' fake kernels) with the dynamic shapes."""
from __future__ import annotations

from torch import fx

from prunec.capture import reexport
from prunec.context import ROLE, CompileContext
from prunec.errors import BuildError


def verify(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: the graph lints, every selection feeds a gather, and it exports with dynamic shapes."""
    gm.graph.lint()
    for node in gm.graph.nodes:
        if node.meta.get(ROLE) == "select" and not node.users:
            raise BuildError(f"selection {node.name} is used by nothing: its stage was lost")
    ctx.program = reexport(gm, ctx.example_inputs, ctx.dynamic_shapes)
    ctx.report("verify", nodes=len(ctx.program.graph_module.graph.nodes))
    return gm
