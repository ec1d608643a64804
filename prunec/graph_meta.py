"""Node metadata the passes keep truthful.

- `meta["val"]`: the node's fake value at the shapes it has *now* (pruned, symbolic). Passes that
  change shapes call `refresh_fake_values` with the nodes they added or rewired; everything
  downstream of those is propagated again through the ops' fake kernels, so torch.fx utilities
  see real shapes after every pass.
- `meta["prunec_captured"]` (`CAPTURED`): the value the node had at capture (or when a pass created
  it, before any cut it sits behind took effect). Token axes are recognised by the captured sequence
  symbol there, which no cut changes.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

CAPTURED = "prunec_captured"
ROLE = "prunec_role"  # what a node a pass inserted is: "candidates", "score", "select", "gather", "kept_len", ...


def captured(node: fx.Node) -> Any:
    """The node's captured value: token axes carry the captured sequence symbol."""
    return node.meta.get(CAPTURED, node.meta.get("val"))


def stamp_captured(gm: fx.GraphModule) -> None:
    """Record the current value as the captured one on every node that has none yet."""
    for node in gm.graph.nodes:
        if CAPTURED not in node.meta and "val" in node.meta:
            node.meta[CAPTURED] = node.meta["val"]


def _fake_inputs(gm: fx.GraphModule) -> list:
    return [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]


class _Downstream(FakeTensorProp):
    """FakeTensorProp that recomputes only the `dirty` nodes and their users, transitively."""

    def __init__(self, gm: fx.GraphModule, mode, dirty: set[fx.Node]):
        super().__init__(gm, mode)
        self.dirty, self.recomputed = dirty, 0

    def run_node(self, n: fx.Node):
        if n.op in ("placeholder", "output"):
            return super().run_node(n)
        if n not in self.dirty and not any(a in self.dirty for a in n.all_input_nodes) and "val" in n.meta:
            return n.meta["val"]
        self.dirty.add(n)
        self.recomputed += 1
        return super().run_node(n)


def refresh_fake_values(gm: fx.GraphModule, changed: Iterable[fx.Node]) -> int:
    """Propagate fake values again from `changed` downstream; returns how many nodes were recomputed."""
    inputs = _fake_inputs(gm)
    changed = set(changed)
    prop = _Downstream(gm, detect_fake_mode(inputs), set(changed))
    try:  # the plain dispatcher is faster; some symbolic ops need the Python one
        prop.propagate_dont_convert_inputs(*inputs)
    except RuntimeError:
        prop = _Downstream(gm, detect_fake_mode(inputs), set(changed))
        with enable_python_dispatcher():
            prop.propagate_dont_convert_inputs(*inputs)
    return prop.recomputed


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return str(value)


def fake_value_mismatches(gm: fx.GraphModule) -> list[str]:
    """Nodes whose `meta["val"]` differs from a fresh fake-tensor propagation of the whole graph
    (tensor shapes and dtypes, shape scalars; not data-dependent scalars); `meta["val"]` is left as
    it was."""
    recorded = {n: n.meta.get("val") for n in gm.graph.nodes}
    inputs = _fake_inputs(gm)
    try:
        with enable_python_dispatcher():
            FakeTensorProp(gm, detect_fake_mode(inputs)).propagate_dont_convert_inputs(*inputs)
        fresh = {n: n.meta.get("val") for n in gm.graph.nodes}
    finally:
        for node, value in recorded.items():
            if value is None:
                node.meta.pop("val", None)
            else:
                node.meta["val"] = value
    return [f"{n.name}: recorded {_describe(recorded[n])}, fresh {_describe(fresh[n])}" for n in gm.graph.nodes
            if n.op != "output" and fresh[n] is not None and not _data_dependent(fresh[n])
            and _describe(recorded[n]) != _describe(fresh[n])]


def _data_dependent(value) -> bool:
    """A scalar computed from tensor data (`.item()` and what follows from it): each trace names it
    with a new unbacked symbol, so two propagations cannot be compared on it."""
    if isinstance(value, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return bool(torch.fx.experimental.symbolic_shapes.free_unbacked_symbols(value))
    return False
