"""Score fusion: combine registered scores into one, so new combinations need no code.

`weighted_sum` adds the terms' scores after normalizing each over the row's candidates: `sum`
divides by their sum (TransPrune's TTV + IGA), `minmax` maps them to [0, 1], `none` leaves them.
`rank` (Borda-style rank fusion) replaces each term's scores by the candidates' rank under it
(0 = best, ties to the lower index) and keeps the lowest weighted rank sum, so scores on different
scales (an attention probability and a diversity pick order) combine without tuning.
"""
from __future__ import annotations

from typing import List

import torch

from ..candidates import row_scores_fake
from ..lowering import Selection
from . import MethodInfo, register_method, terms


def fuse_scores(scores: list[torch.Tensor], candidates: torch.Tensor, weights: list[float],
                fusion: str = "weighted_sum", normalize: str = "sum") -> torch.Tensor:
    """[B, S] scores per term (higher = keep) -> [B, S] fused fp32 score; non-candidates get 0."""
    fused = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
    for score, weight in zip(scores, weights):
        score = score.float()
        if fusion == "rank":
            term = -candidate_ranks(score, candidates).float()
        elif normalize == "sum":
            term = score / torch.where(candidates, score, 0.0).sum(dim=1, keepdim=True)
        elif normalize == "minmax":
            low = torch.where(candidates, score, float("inf")).amin(dim=1, keepdim=True)
            high = torch.where(candidates, score, float("-inf")).amax(dim=1, keepdim=True)
            term = (score - low) / (high - low).clamp(min=1e-12)
        else:
            term = score
        fused = fused + weight * torch.where(candidates, term, 0.0)
    return fused


def candidate_ranks(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """[B, S] rank of each candidate among its row's candidates by descending score (0 = best, ties
    to the lower index); non-candidates rank after every candidate."""
    keyed = torch.where(candidates, score.float(), float("-inf"))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


@torch.library.custom_op("prunec::fuse_scores", mutates_args=())
def fuse_scores_op(scores: List[torch.Tensor], candidates: torch.Tensor, weights: List[float], fusion: str,
                normalize: str) -> torch.Tensor:
    """Weighted sum of normalized scores, or rank fusion, over the candidates: [B, S] fp32."""
    return fuse_scores(scores, candidates, weights, fusion, normalize)


@fuse_scores_op.register_fake
def _(scores, candidates, weights, fusion, normalize):
    return row_scores_fake(candidates, candidates.shape[0], candidates.shape[1])

def _lower_select(b) -> Selection:
    """Each term's own score lowering, fused, then the top candidates."""
    fused = terms(b.stage.method, b.stage.param_dict)
    from . import get_method

    scores = [get_method(m).lower_scores(b, m, p) for m, p, _ in fused]
    params = b.stage.param_dict
    score = b.add("score", torch.ops.prunec.fuse_scores.default,
                  (scores, b.candidates, [w for _, _, w in fused], params["fusion"], params["normalize"]))
    return Selection(b.add("select", torch.ops.prunec.select_topk.default, (score, b.candidates, *b.sizes)))


_TERM = {
    "type": "object",
    "additionalProperties": False,
    "required": ["method"],
    "properties": {
        "method": {"type": "string", "description": "a registered score (or a select method with a score form)"},
        "weight": {"type": "number", "minimum": 0, "description": "default 1"},
        "params": {"type": "object"},
    },
}

register_method(MethodInfo(
    name="fuse",
    lower_select=_lower_select,
    action="prune",
    kind="fusion",
    signals=(),
    fn=fuse_scores,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "required": ["terms"],
        "properties": {
            "fusion": {"enum": ["weighted_sum", "rank"]},
            "normalize": {"enum": ["sum", "minmax", "none"], "description": "weighted_sum only"},
            "terms": {"type": "array", "items": _TERM, "minItems": 1},
        },
    },
    defaults={"fusion": "weighted_sum", "normalize": "sum"},
    default_positions="renumber",
    summary="weighted sum of normalized scores, or rank fusion, over registered scores",
    source="prunec (TransPrune's sum-normalized TTV + IGA is one instance)",
))
