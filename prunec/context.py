"""The state passes share: the plan, the adapter, and one record per stage. Passes read and write
only these records and the documented node meta keys, nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from .adapters.base import Adapter
from .graph_meta import ROLE  # noqa: F401  (passes import it from here)
from .spec import Plan, Stage

# Node meta written by passes (see graph_meta.py for "val" and "prunec_captured"):
#   "prunec_role": what an inserted node is ("candidates", "score", "select", "gather", "kept_len",
#                  "positions").


@dataclass
class StageRecord:
    stage: Stage
    anchor: fx.Node = None              # the pruning block is inserted right after this node
    site_value: fx.Node = None          # [B, S, D] residual stream at the cut
    token_size: Any = None              # captured sequence length at the site (a SymInt)
    attention: fx.Node | None = None    # the layer's sdpa call, for attention signals
    next_attention: fx.Node | None = None  # the next layer's sdpa call, for next-layer q/k signals
    next_layer: list[fx.Node] = field(default_factory=list)  # the next layer's nodes, in graph order
    signals: set[str] = field(default_factory=set)             # what the stage's scores read
    feature_attention: tuple[fx.Node, int] | None = None  # (sdpa, leading non-candidates) whose
                                                          # [CLS] row scores an output site's tokens
    transition_pairs: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # sub-block (in, out), layers summed
    llm_input: fx.Node | None = None    # [B, S, D] embeddings entering the LLM (text_raters)
    transitions: fx.Node | None = None  # [B, S] TTV summed up to this stage (carried across stages)
    layer_attention: dict[str, list[tuple[fx.Node, int]]] = field(default_factory=dict)  # method -> sdpa
                                        # calls (with leading non-candidate keys) of the layers it reads
    images: fx.Node | None = None       # [B, S] every image token, for image-scoped stages (their
                                        # candidates are a scope of these)
    index: fx.Node | None = None        # [B, K] sorted keep indices
    kept_valid: fx.Node | None = None   # ragged stages: [B, K] bool, False on a short row's repeated index
    gathered: fx.Node | None = None     # the pruned residual stream
    kept_len: fx.Node | None = None     # K as a SymInt node
    block_end: fx.Node | None = None    # last inserted node; the tail starts after it
    propagated: list[str] = field(default_factory=list)


@dataclass
class CompileContext:
    plan: Plan
    adapter: Adapter
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_shapes: tuple
    records: list[StageRecord] = field(default_factory=list)
    program: torch.export.ExportedProgram | None = None
    pass_reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # pass -> what it did (manifest)

    def report(self, pass_name: str, **counts: Any) -> None:
        self.pass_reports.setdefault(pass_name, {}).update(counts)
