"""Capture a Hugging Face model as an FX GraphModule with torch.export (non-strict, no KV cache).

Batch and sequence (or image side) are dynamic, so every token axis in the graph is a symbol
rather than a baked-in size. Guaranteed on the returned module's nodes:
- `meta["val"]`: fake tensors / SymInts of the *captured* shapes;
- `meta["nn_module_stack"]`: the module path each node came from (wrapper root, HF model at `hf`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from .adapters.base import Adapter, ExampleShape
from .errors import BuildError, first_line


@dataclass
class Captured:
    graph_module: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple


def capture(model: torch.nn.Module, adapter: Adapter, shape: ExampleShape, seed: int,
            min_tokens: int = 2, output: dict | None = None) -> Captured:
    wrapper = adapter.wrap(model, output).eval()
    inputs = adapter.example_inputs(shape, seed)
    dynamic = adapter.dynamic_shapes(min_tokens)
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # export errors are long; keep the first line and the model family
        first = first_line(exc)
        raise BuildError(f"capture: torch.export failed for family {adapter.family}: {first}") from exc
    return Captured(program.module(), inputs, dynamic)


def reexport(gm: fx.GraphModule, inputs: tuple, dynamic_shapes: tuple) -> torch.export.ExportedProgram:
    """Export a rewritten module again: full fake-tensor shape propagation through the new graph."""
    with torch.no_grad():
        return torch.export.export(gm, inputs, dynamic_shapes=dynamic_shapes, strict=False)
