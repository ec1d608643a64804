"""The compiler: a plan and a model in, a rewritten and re-exported program out.

The pass list is `prunec.passes.PIPELINE`; each pass is one function over the GraphModule.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters.base import ExampleShape
from .capture import capture
from .context import CompileContext
from .errors import BuildError, PrunecError
from .passes import PIPELINE
from .schedule import min_tokens
from .spec import Plan


@dataclass
class Compiled:
    plan: Plan
    program: torch.export.ExportedProgram
    context: CompileContext
    timings: dict[str, float]
    generation: dict[str, torch.export.ExportedProgram] = field(default_factory=dict)  # prefill, decode


def example_shape(plan: Plan) -> ExampleShape:
    """Capture shapes. Batch is at least 2: torch.export specializes a dimension whose example is 1,
    and the emitted module must accept any batch."""
    inputs = plan.lock["inputs"]
    return ExampleShape(max(2, inputs["batch"]), inputs.get("seq_len"), inputs.get("image_size"), inputs.get("images", 1))


def _check_fake_values(gm, done: list[str]) -> None:
    from .graph_meta import fake_value_mismatches

    wrong = fake_value_mismatches(gm)
    if wrong:
        raise BuildError(f"after {done[-1] if done else 'capture'}: {len(wrong)} nodes hold stale fake values, "
                         f"e.g. {wrong[0]}")


def compile_plan(plan: Plan, model: torch.nn.Module, on_step: Callable[[str], None] | None = None) -> Compiled:
    """Capture, then run the pass pipeline; `on_step(name)` is called as each step starts."""
    step = on_step or (lambda name: None)
    timings: dict[str, float] = {}
    step("capture")
    start = time.perf_counter()
    captured = capture(model, plan.adapter, example_shape(plan), plan.lock["inputs"]["seed"],
                       min_tokens=min_tokens(plan), output=plan.lock.get("output"))
    timings["capture"] = time.perf_counter() - start
    ctx = CompileContext(plan, plan.adapter, captured.example_inputs, captured.dynamic_shapes)
    gm = captured.graph_module
    done: list[str] = []
    check_meta = os.environ.get("PRUNEC_CHECK_META") == "1"  # tests: the rewritten graph's fake values are true
    for graph_pass in PIPELINE:
        if check_meta and graph_pass is PIPELINE[-1]:
            _check_fake_values(gm, done)
        step(graph_pass.__name__)
        start = time.perf_counter()
        try:
            gm = graph_pass(gm, ctx)
        except PrunecError as exc:
            raise BuildError(f"pass {graph_pass.__name__} (after {', '.join(done) or 'capture'}): {exc}") from exc
        except Exception as exc:
            raise BuildError(f"pass {graph_pass.__name__} (after {', '.join(done) or 'capture'}) failed: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                             ) from exc
        timings[graph_pass.__name__] = time.perf_counter() - start
        done.append(graph_pass.__name__)
    compiled = Compiled(plan, ctx.program, ctx, timings)
    if "decode" in plan.lock:
        from .decode import export_decode, export_prefill

        for name, export in (("prefill", lambda: export_prefill(gm, ctx)), ("decode", lambda: export_decode(model, plan))):
            step(f"export_{name}")
            start = time.perf_counter()
            compiled.generation[name] = export()
            timings[f"export_{name}"] = time.perf_counter() - start
    return compiled
