"""What a method's lowering gets: one stage's builder over the graph.

`insert_prune_ops` makes one `StageBuilder` per stage and hands it to the stage method's lowerings
(`MethodInfo.lower_select`, `MethodInfo.lower_scores`). The builder appends nodes after the stage's
cut, hands out signals from their registered providers (`prunec/signals.py`), and keeps what stages
carry to later ones (accumulated scores, sizes, produced signals), keyed by domain. It never looks at
a method's name: everything method-specific is in the method's file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from .errors import BuildError
from .graph_meta import CAPTURED, ROLE, captured
from .signals import get_provider, row_value

if TYPE_CHECKING:
    from .context import CompileContext, StageRecord


@dataclass
class Selection:
    """A lowering's result: [B, K] sorted keep indices over the sequence, and the tensor they gather
    (the site's hidden states, or a merge's copy with merged rows written back)."""
    index: fx.Node
    source: fx.Node | None = None


class StageBuilder:
    def __init__(self, gm: fx.GraphModule, ctx: CompileContext, record: StageRecord, carried: dict):
        self.gm, self.graph, self.ctx, self.record = gm, gm.graph, ctx, record
        self.stage = record.stage
        self.last = record.anchor
        self.carried = carried  # (domain, key) -> node, shared by all stages of a build
        self.candidates: fx.Node | None = None  # [B, S] bool, set by insert_prune_ops
        self._sizes: tuple[int, int] = (record.stage.n_candidates, record.stage.n_keep)
        self._signals: dict[tuple[str, str], Any] = {}
        self._valid: fx.Node | None = None

    # -- appending nodes -------------------------------------------------------------------------
    def add(self, role: str, target, args, meta_from: fx.Node | None = None, kwargs=None) -> fx.Node:
        with self.graph.inserting_after(self.last):
            node = self.graph.call_function(target, tuple(args), kwargs or {})
        node.meta[ROLE] = role
        if meta_from is not None:  # a value of the same shape: token axes as the source's
            node.meta["nn_module_stack"] = meta_from.meta.get("nn_module_stack", {})
            if captured(meta_from) is not None:
                node.meta[CAPTURED] = captured(meta_from)
        self.last = node
        return node

    def rows(self, node: fx.Node, dtype=torch.float32) -> fx.Node:
        """Mark `node` as [B, S] over the site's tokens, for values later stages read (propagate_tokens
        gathers them with the tokens)."""
        node.meta[CAPTURED] = row_value(self.record.site_value, dtype)
        return node

    def copy_chain(self, root: fx.Node, span: list[fx.Node], last_token: bool = False,
                   replace: dict[fx.Node, fx.Node] | None = None) -> fx.Node:
        """Copy `root` and its ancestors inside `span` (a layer's nodes) to the insertion point;
        `replace` maps outside inputs to the nodes the copy reads instead (e.g. the site's hidden states).

        With `last_token`, the copy runs on the last token only: every outside tensor with token axes
        is sliced to its last entry there and the sequence-length SymInt becomes 1. That is exact for
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
        env: dict = dict(replace or {})
        for node in span:  # graph order
            if node not in needed:
                continue
            if last_token:
                for arg in node.all_input_nodes:
                    if arg not in inside and arg not in env:
                        env[arg] = self._last_token_view(arg)
            with self.graph.inserting_after(self.last):
                copied = self.graph.node_copy(node, lambda n: env.get(n, n))
            copied.meta[ROLE] = "score"
            if last_token:  # captured shapes no longer apply
                copied.meta.pop("val", None)
                copied.meta.pop(CAPTURED, None)
            self.last = env[node] = copied
        return env[root]

    def _last_token_view(self, node: fx.Node):
        token_size = self.record.token_size
        value = captured(node)
        if isinstance(value, torch.SymInt) and value.node.expr == token_size.node.expr:
            return 1
        if not isinstance(value, torch.Tensor):
            return node
        for dim in range(value.ndim):
            size = value.shape[dim]
            if isinstance(size, torch.SymInt) and size.node.expr == token_size.node.expr:
                node = self.add("score", torch.ops.aten.slice.Tensor, (node, dim, -1, 2**63 - 1))
        return node

    # -- budgets ---------------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, int]:
        """(candidates, kept) per row the selection works on (an image scope narrows them), fixed at
        build time; a stage with run-time budgets has none."""
        self._fixed_counts()
        return self._sizes

    @sizes.setter
    def sizes(self, value: tuple[int, int]) -> None:
        self._sizes = value

    @property
    def n_candidates(self) -> int:
        """The stage's candidates per row (every image token of its domain), fixed at build time."""
        self._fixed_counts()
        return self.stage.n_candidates

    def _fixed_counts(self) -> None:
        if self.stage.ragged:  # semantics refuses such specs first; this guards the lowerings
            raise BuildError(f"site {self.stage.site}: method {self.stage.method} needs one candidate count for "
                             "every row, fixed at build time, and here rows hold different counts")

    def row_budget(self) -> tuple[fx.Node | None, fx.Node, str]:
        """A ragged selection's (live tokens, [B] counts its ratio reads, budget JSON): the real tokens
        (padding and an earlier ragged stage's repeats are not: a row keeps its own tokens only),
        and the input's or this stage's candidates per row."""
        from .ragged import RowBudget

        live = self.valid
        if self.stage.keep_of == "stage":
            reference = self.add("select", torch.ops.aten.sum.dim_IntList, (self.candidates, [1]))
        else:
            reference = self.carried[(self.stage.domain, "input_counts")]
        return live, reference, RowBudget.of_stage(self.stage).to_json()

    # -- what a lowering reads -------------------------------------------------------------------
    def signal(self, name: str, method: str | None = None):
        """The value of a signal at this stage (one provider call per signal and method)."""
        key = (name, method or self.stage.method)
        if key not in self._signals:
            self._signals[key] = get_provider(name).provide(self, key[1])
        return self._signals[key]

    def carried_signal(self, name: str) -> fx.Node:
        node = self.carried.get((self.stage.domain, name))
        if node is None:
            raise BuildError(f"site {self.stage.site}: signal {name} is produced by an earlier stage, and none did")
        return node

    @property
    def valid(self) -> fx.Node | None:
        """[B, S] bool: the real (non-padding) tokens."""
        if self._valid is None:
            self._valid = self.ctx.adapter.validity(self.graph)
        return self._valid

    @property
    def per_image(self) -> bool:
        """The selection runs within each image of a multi-image row (the method's own rule, or the
        stage's `scope: per_image`), with equal budgets."""
        from .methods import get_method

        return self.images_per_row > 1 and (get_method(self.stage.method).per_image or self.stage.scope == "per_image")

    @property
    def images_per_row(self) -> int:
        return self.ctx.plan.lock["inputs"].get("images", 1)

    def later_stages(self):
        """The plan's stages after this one, in order."""
        stages = list(self.ctx.plan.stages)
        return stages[stages.index(self.stage) + 1:]


def params_json(info, params: dict) -> str:
    """A method's own parameters (not those choosing layers, which are the compiler's), as JSON."""
    return json.dumps({k: v for k, v in sorted(params.items()) if k not in info.layer_params})
