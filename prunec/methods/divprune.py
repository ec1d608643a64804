"""DivPrune: keep a max-min diverse subset of the visual tokens (CVPR 2025).

Official code (vbdi/divprune, `llava_arch.py::DivPrune`): cosine distance D = 1 - cos between the
projected visual tokens; the first pick is the token whose nearest other token is farthest (the
code reads the second-smallest distance per column, the smallest being the token itself); then
repeatedly add the token whose minimum distance to the chosen set is largest. Kept tokens return in
their original order; the LLM sees a shorter sequence, so positions are renumbered.
Ties go to the lower index. A chosen token is never picked again (its score is set to -inf).

Deviation, on purpose: with exact duplicate tokens and a budget above the number of distinct
tokens, every remaining token is at distance 0 from the chosen set and the official greedy (argmax
over all tokens, chosen ones included) re-picks an already chosen token, so it keeps fewer distinct
tokens than its budget. prunec picks the lowest-index token not yet chosen, so a stage always keeps
exactly its budget of distinct tokens; on inputs without such ties the two agree.
Ratio budgets round as the official code does: `round(SUBSET_RATIO * N)`, half to even.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..candidates import (candidate_positions, candidate_rows, keep_indices, keep_shape, row_scores_fake,
                          scatter_rows)
from ..kernels import use_triton
from ..lowering import Selection
from ..ragged import RowBudget, kept_counts, ragged_fake, ragged_keep
from . import MethodInfo, register_method
from .lowerings import select_by_features


def divprune_keep(features: torch.Tensor, n_keep: int, greedy=None) -> torch.Tensor:
    """Greedy max-min diversity selection.

    Args:
        features: [B, N, D] candidate token features. n_keep: tokens to keep, 0 < n_keep <= N.
        greedy: the greedy loop to use (`greedy_max_min`, or a kernel with its signature).
    Returns: [B, n_keep] int64 indices into N, sorted ascending.
    """
    return divprune_keep_order(features, n_keep, greedy).sort(dim=1).values


def greedy_max_min(distance: torch.Tensor, first: torch.Tensor, n_keep: int) -> torch.Tensor:
    """From `first`, repeatedly add the token farthest from the chosen set: [B, n_keep] in pick order.

    A chosen token's distance to the set is set to -inf, which `minimum` keeps, so no separate taken
    mask is needed (three small ops per step: the loop is launch-bound on CPU)."""
    batch = distance.shape[0]
    rows = torch.arange(batch, device=distance.device)
    chosen = torch.empty(batch, n_keep, dtype=torch.long, device=distance.device)
    chosen[:, 0] = first
    min_to_chosen = distance[rows, first].clone()  # [B, N]
    min_to_chosen[rows, first] = float("-inf")
    for step in range(1, n_keep):
        nxt = min_to_chosen.argmax(dim=1)
        chosen[:, step] = nxt
        torch.minimum(min_to_chosen, distance[rows, nxt], out=min_to_chosen)
        min_to_chosen[rows, nxt] = float("-inf")
    return chosen


def second_smallest(distance: torch.Tensor) -> torch.Tensor:
    """[B, N, N] -> [B, N]: each column's second-smallest entry, as `kthvalue(2, dim=1)` gives it (one
    occurrence of the minimum removed), in two min reductions instead of a selection per column."""
    smallest = distance.argmin(dim=1, keepdim=True)  # [B, 1, N]
    return distance.scatter(1, smallest, float("inf")).amin(dim=1)


def diversity_order_scores(features: torch.Tensor) -> torch.Tensor:
    """DivPrune's score form, for fusion: run the greedy over all N tokens; a token picked at step t
    scores -t (the first pick 0, the last -(N-1)). [B, N, D] -> [B, N] float32."""
    order = divprune_keep_order(features, features.shape[1])
    steps = torch.arange(features.shape[1], device=features.device, dtype=torch.float32)
    return torch.empty_like(steps).expand_as(order).clone().scatter_(1, order, -steps.expand_as(order))


def divprune_keep_order(features: torch.Tensor, n_keep: int, greedy=None) -> torch.Tensor:
    """Like `divprune_keep`, in pick order instead of sorted."""
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # [B, N, N]
    if features.shape[1] == 1:
        first = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    else:
        first = second_smallest(distance).argmax(dim=1)  # farthest nearest other token
    return (greedy or greedy_max_min)(distance, first, n_keep)


@torch.library.custom_op("prunec::select_divprune", mutates_args=())
def select_divprune(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int, n_keep: int) -> torch.Tensor:
    """DivPrune over the candidates' hidden states; keeps every non-candidate."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    greedy = None
    if use_triton(hidden):
        from ..kernels.max_min_greedy import max_min_greedy as greedy
    return keep_indices(candidates, positions, divprune_keep(features, n_keep, greedy))


@select_divprune.register_fake
def _(hidden, candidates, n_candidates, n_keep):
    return keep_shape(candidates, n_candidates, n_keep)


@torch.library.custom_op("prunec::diversity_scores", mutates_args=())
def diversity_scores(hidden: torch.Tensor, candidates: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """DivPrune's score form over the candidates (-pick step of the full greedy order): [B, S] fp32."""
    positions = candidate_positions(candidates, n_candidates)
    features = candidate_rows(hidden, positions)
    return scatter_rows(diversity_order_scores(features), positions, candidates.shape[1])


@diversity_scores.register_fake
def _(hidden, candidates, n_candidates):
    return row_scores_fake(hidden, candidates.shape[0], candidates.shape[1])


@torch.library.custom_op("prunec::select_divprune_rows", mutates_args=())
def select_divprune_rows(hidden: torch.Tensor, candidates: torch.Tensor, live: Optional[torch.Tensor],
                         reference: torch.Tensor, budget: str) -> torch.Tensor:
    """DivPrune per row with a run-time budget (rows may hold different candidate counts)."""
    counts = kept_counts(RowBudget.from_json(budget), reference, candidates)
    greedy = None
    if use_triton(hidden):
        from ..kernels.max_min_greedy import max_min_greedy as greedy
    return ragged_keep(candidates, live,
                       lambda b, positions: divprune_keep(hidden[b:b + 1, positions], counts[b], greedy)[0])


@select_divprune_rows.register_fake
def _(hidden, candidates, live, reference, budget):
    return ragged_fake(candidates)


ops.keep_index_op("select_divprune")
ops.keep_index_op("select_divprune_rows")


def _lower_select(b) -> Selection:
    """Its own op: the greedy loop has a Triton kernel (per image, the generic feature selection)."""
    if b.per_image:
        return select_by_features(b)
    if b.stage.ragged:
        return Selection(b.add("select", torch.ops.prunec.select_divprune_rows.default,
                               (b.signal("hidden"), b.candidates, *b.row_budget())))
    return Selection(b.add("select", torch.ops.prunec.select_divprune.default, (b.signal("hidden"), b.candidates,
                                                                                 *b.sizes)))


def _lower_scores(b, method, params):
    return b.add("score", torch.ops.prunec.diversity_scores.default,
                 (b.signal("hidden", method), b.candidates, b.n_candidates))


register_method(MethodInfo(
    row_budgets=True,
    name="divprune",
    action="prune",
    kind="select",
    signals=("hidden",),
    fn=divprune_keep,
    params_schema={"type": "object", "additionalProperties": False, "properties": {}},
    default_positions="renumber",
    summary="greedy max-min cosine diversity over the candidate tokens' hidden states",
    source="vbdi/divprune LLaVA/llava/model/llava_arch.py::DivPrune",
    variants={"(duplicates)": "the code re-picks a chosen token once only duplicates remain / prunec keeps "
                              "distinct tokens (not a parameter)"},
    lower_select=_lower_select,
    per_image_scope=True,
    lower_scores=_lower_scores,
    kernel=True,
    eager_way="select_before_llm",
    rounding="half_even",
    rounding_source="official llava_arch.py: round(SUBSET_RATIO * N) (Python's round, half to even)",
))
