"""Run-time budgets and ragged rows: each row keeps what its own candidate count and the budget say.

When the inputs declare a range of candidates per row (`inputs.images_per_row`), a stage's budget is
not a build-time count but a `RowBudget`, resolved per row when the model runs: a ratio of that row's
candidates (of the input, or of those reaching the stage), rounded by the stage's rule and clamped
to `min`/`max`, never above what reaches the stage; a count stays a count (capped the same way).

Rows then keep different numbers of tokens. A ragged selection returns [B, K] keep indices with K the
longest row's kept length (a size torch.export treats as data-dependent); a shorter row starts with
repeats of its first kept index, as left padding would; the inputs' own padding is dropped, so K
is the longest row's own kept count. `kept_rows` tells real entries from the
repeats, and `propagate_tokens` masks the repeats out of every attention mask as keys (and out of
the attention_mask input and the candidate masks), so they act as left padding does: each real token
sees exactly the keys it sees with the row run alone, its positions shift by a constant at most
(RoPE attention depends on position differences only), and each row ends with its own last token, so
`logits: last` is that token's. Cost follows the longest *kept* row.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Callable, Optional

import torch


ROUNDINGS = ("half_up", "half_even", "floor")


def round_count(value: float, rounding: str) -> int:
    """`value` (>= 0) to a whole count: half_up (0.5 -> 1), half_even (Python's `round`: 0.5 -> 0,
    1.5 -> 2) or floor (what `int(x)` does to a positive x). The float is taken exactly as computed,
    as the official codes compute it (`int(576 * (1 - 0.7778))` is 127)."""
    exact = Fraction(value)
    if rounding == "floor":
        return math.floor(exact)
    if rounding == "half_even":
        return round(exact)
    if rounding == "half_up":
        return math.floor(exact + Fraction(1, 2))
    raise ValueError(f"unknown rounding {rounding!r}; known: {', '.join(ROUNDINGS)}")


@dataclass(frozen=True)
class RowBudget:
    """A stage's budget as the op applies it: `ratio` of `reference` per row, or `count` when ratio < 0."""

    ratio: float
    count: int
    rounding: str
    low: int = 0
    high: int = -1  # -1: no upper clamp

    @classmethod
    def of_stage(cls, stage) -> "RowBudget":
        kind, value = stage.keep_spec
        low, high = stage.keep_clamps
        if kind == "count":
            return cls(-1.0, int(value), stage.rounding)
        return cls(float(value), 0, stage.rounding, low, high)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RowBudget":
        return cls(**json.loads(text))

    def kept(self, reference: int, reaching: int) -> int:
        """Candidates one row keeps: the budget of its `reference` count, at most `reaching`."""
        if self.ratio < 0:
            return min(self.count, reaching)
        count = round_count(self.ratio * reference, self.rounding)
        count = max(count, self.low)
        if self.high >= 0:
            count = min(count, self.high)
        return min(count, reaching)

    def formula(self) -> str:
        """How a row's kept count is computed, for manifests and `explain`."""
        if self.ratio < 0:
            return f"min({self.count}, candidates)"
        text = f"{self.rounding}({self.ratio:g} x candidates)"
        if self.low:
            text = f"max({self.low}, {text})"
        if self.high >= 0:
            text = f"min({self.high}, {text})"
        return text


def ragged_keep(candidates: torch.Tensor, live: Optional[torch.Tensor],
                choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[B, K] keep indices: per row, its live non-candidates (not padding, not an earlier stage's
    repeats) plus the candidates `choose(row, positions)` picks (local indices into that row's
    candidate `positions`), sorted; a shorter row starts with repeats of its first index, up to the
    longest row's K, so K is the longest row's own kept count."""
    rows = []
    for b in range(candidates.shape[0]):
        positions = candidates[b].nonzero()[:, 0]
        keep = ~candidates[b] if live is None else ~candidates[b] & live[b]
        keep = keep.clone()
        keep[positions[choose(b, positions)]] = True
        rows.append(keep.nonzero()[:, 0])
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r[:1].expand(width - len(r)), r]) for r in rows])


def kept_counts(budget: RowBudget, reference: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    reaching = candidates.sum(dim=1).tolist()
    return [budget.kept(int(r), int(n)) for r, n in zip(reference.tolist(), reaching)]


def ragged_fake(candidates: torch.Tensor) -> torch.Tensor:
    """[B, K] with K data-dependent; every row keeps at least 2 tokens (the inputs' shortest row holds
    its candidates plus 2)."""
    width = torch.library.get_ctx().new_dynamic_size(min=2)
    return candidates.new_empty((candidates.shape[0], width), dtype=torch.long)


@torch.library.custom_op("prunec::select_topk_rows", mutates_args=())
def select_topk_rows(scores: torch.Tensor, candidates: torch.Tensor, live: Optional[torch.Tensor],
                     reference: torch.Tensor, budget: str) -> torch.Tensor:
    """Per row, keep the `budget` highest-scoring candidates (ties: lower index) and every live
    non-candidate; ragged rows padded as `ragged_keep` says."""
    counts = kept_counts(RowBudget.from_json(budget), reference, candidates)

    def top(b, positions):
        order = torch.sort(scores[b].float()[positions], descending=True, stable=True).indices
        return order[:counts[b]]
    return ragged_keep(candidates, live, top)


@select_topk_rows.register_fake
def _(scores, candidates, live, reference, budget):
    return ragged_fake(candidates)


@torch.library.custom_op("prunec::drop_candidates_rows", mutates_args=())
def drop_candidates_rows(candidates: torch.Tensor, live: Optional[torch.Tensor]) -> torch.Tensor:
    """Keep indices of every live non-candidate (a stage keeping none), ragged."""
    return ragged_keep(candidates, live, lambda b, positions: positions[:0])


@drop_candidates_rows.register_fake
def _(candidates, live):
    return ragged_fake(candidates)


@torch.library.custom_op("prunec::kept_rows", mutates_args=())
def kept_rows(index: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: True on real entries of ragged keep indices, False on a short row's repeats (an
    entry its successor repeats)."""
    last = torch.ones_like(index[:, :1], dtype=torch.bool)
    return torch.cat([index[:, :-1] < index[:, 1:], last], dim=1)


@kept_rows.register_fake
def _(index):
    return torch.empty_like(index, dtype=torch.bool)


def row_counts_node(graph, candidates):
    """A [B] int64 node: candidates per row (no token axis, so no cut rewrites it)."""
    with graph.inserting_after(candidates):
        node = graph.call_function(torch.ops.aten.sum.dim_IntList, (candidates, [1]))
    with candidates.meta["val"].fake_mode:
        node.meta["val"] = candidates.meta["val"].sum(dim=1)
    return node
