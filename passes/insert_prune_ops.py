"""Insert each stage's candidates, scores, selection and residual-stream gather after its cut.

The pass knows no method: it builds the stage's candidate mask (narrowed to the method's image
scope, if it has one), lets earlier stages produce the signals later ones ask for, and hands the
stage to its method's `lower_select` (`prunec/methods/lowerings.py` and the method files), which
returns the keep indices and the tensor they gather.
"""
from __future__ import annotations

import torch
from torch import fx

import prunec.ops  # noqa: F401  (registers torch.ops.prunec)
from prunec.context import ROLE, CompileContext
from prunec.graph_meta import CAPTURED, refresh_fake_values, stamp_captured
from prunec.lowering import StageBuilder
from prunec.methods import get_method, stage_signals
from prunec.ragged import row_counts_node

_OPS = torch.ops.prunec


def _produce_signals(b: StageBuilder, info) -> None:
    """Compute what this stage's method produces for later stages of the domain that ask for it."""
    wanted = {s for later in b.later_stages() if later.domain == b.stage.domain
              for s in stage_signals(later.method, later.param_dict)}
    for signal in info.produces:
        if signal in wanted:
            b.carried[(b.stage.domain, signal)] = info.produce(b, signal)


def insert_prune_ops(gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
    """Guarantees: every record has index, gathered and kept_len nodes, inserted right after its
    anchor; nothing downstream of a cut reads them yet (propagate_tokens does that)."""
    graph = gm.graph
    carried: dict[tuple[str, str], fx.Node] = {}  # (domain, key) -> what a stage leaves for later ones
    before_all = set(graph.nodes)
    for record in ctx.records:
        stage, info = record.stage, get_method(record.stage.method)
        b = StageBuilder(gm, ctx, record, carried)
        candidates = ctx.adapter.candidate_mask(graph, record.site_value, stage.protect, b.last)
        candidates.meta[ROLE] = "candidates"
        if candidates.prev is b.last:  # the adapter built it at the cut, not from the inputs
            b.last = candidates
        if stage.ragged and (stage.domain, "input_counts") not in carried:  # what `of: input` ratios read
            carried[(stage.domain, "input_counts")] = row_counts_node(graph, candidates)
        if info.scope:  # the stage selects among one scope of the image tokens and keeps the rest
            record.images = candidates
            candidates = b.add("candidates", _OPS.scope_candidates.default,
                               (candidates, stage.n_candidates, stage.query_tokens, info.scope), meta_from=candidates)
            left = stage.query_tokens if info.scope == "context" else stage.n_candidates - stage.query_tokens
            b.sizes = (stage.n_candidates - left, stage.n_keep - left)
        b.candidates = candidates
        _produce_signals(b, info)
        if stage.ragged and stage.keep_spec == ("count", 0):
            index, source = b.add("select", _OPS.drop_candidates_rows.default, (candidates, b.valid)), None
        elif not stage.ragged and b.sizes[1] == 0:  # every candidate goes: no score needed
            index, source = b.add("select", _OPS.drop_candidates.default, (candidates, b.sizes[0])), None
        else:
            selection = info.lower_select(b)
            index, source = selection.index, selection.source
        record.index = index
        if stage.ragged:  # rows keep different counts: which entries are real (propagate_tokens masks the rest)
            record.kept_valid = b.add("select", _OPS.kept_rows.default, (index,))
        record.gathered = b.add("gather", _OPS.gather_tokens.default, (source or record.site_value, index, [1]),
                                meta_from=record.site_value)
        record.kept_len = b.add("kept_len", torch.ops.aten.sym_size.int, (record.gathered, 1))
        record.kept_len.meta[CAPTURED] = record.token_size  # later stages read it as "the sequence length"
        record.block_end = b.last
    inserted = [n for n in graph.nodes if n not in before_all]
    refresh_fake_values(gm, inserted)  # nothing reads the new values yet: only they change
    stamp_captured(gm)  # ... and they sit before every cut, so their values are the captured ones
    ctx.report("insert_prune_ops", stages=len(ctx.records), nodes_inserted=len(inserted))
    gm.recompile()
    return gm
