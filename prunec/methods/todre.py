"""ToDRE stage 1: a diverse subset by greedy k-center (farthest-point) selection (arXiv 2505.18757).

Paper (v1): right after the vision encoder, keep ~10% of the visual tokens as a greedy k-center
subset; stage 2 removes every remaining visual token at a decoder layer ("information migration"),
which in prunec is any in-LLM stage with `keep: {count: 0}`. No official code was found: the
distance (cosine here), the feature space (the projected tokens at `projector.output` here) and the
initial pivot are unclear, so the pivot is a parameter: `first` (Gonzalez's k-center greedy starts
from an arbitrary point: the first token) or `farthest_nearest` (DivPrune's rule). v2's max-sum
diversification is not implemented.
"""
from __future__ import annotations

import torch

from . import MethodInfo, register_method
from .divprune import greedy_max_min


def k_center_keep(features: torch.Tensor, n_keep: int, pivot: str = "first") -> torch.Tensor:
    """[B, N, D] candidate features -> [B, n_keep] sorted indices of a greedy k-center subset."""
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1.0 - normed @ normed.transpose(1, 2)
    if pivot == "first" or features.shape[1] == 1:
        first = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    else:
        first = distance.kthvalue(2, dim=1).values.argmax(dim=1)
    return greedy_max_min(distance, first, n_keep).sort(dim=1).values


register_method(MethodInfo(
    name="todre",
    action="prune",
    kind="select",
    signals=("hidden",),
    fn=k_center_keep,
    params_schema={
        "type": "object",
        "additionalProperties": False,
        "properties": {"pivot": {"enum": ["first", "farthest_nearest"],
                                 "description": "initial pivot (unclear in the paper)"}},
    },
    defaults={"pivot": "first"},
    default_positions="renumber",
    summary="greedy k-center (farthest point, cosine distance) over the candidates' hidden states",
    source="ToDRE paper (arXiv 2505.18757) stage 1; no official code found",
    variants={"pivot": "first / farthest_nearest (both unclear in the paper)"},
))
